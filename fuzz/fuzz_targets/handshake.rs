//! What an unauthenticated peer sends: its `Hello`, under the handshake
//! limit, then the bounds check the coordinator runs before reading it.
//! And what a node or client reads back: the `HelloReply`.
#![no_main]

use fleetmap_protocol::{Hello, HelloReply, HANDSHAKE_MAX_MESSAGE};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        common::decode_stream::<Hello>(rest, HANDSHAKE_MAX_MESSAGE, |hello| {
            let _ = hello.check();
        });
    } else {
        common::decode_stream::<HelloReply>(rest, HANDSHAKE_MAX_MESSAGE, |_| {});
    }
});
