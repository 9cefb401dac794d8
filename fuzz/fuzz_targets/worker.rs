//! The worker channel: what a daemon reads from a worker (which runs user
//! code, so may send anything) and what a worker reads from its daemon.
#![no_main]

use fleetmap_protocol::worker::{FromWorker, ToWorker};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        common::decode_stream::<FromWorker>(rest, MAX, |_| {});
    } else {
        common::decode_stream::<ToWorker>(rest, MAX, |_| {});
    }
});
