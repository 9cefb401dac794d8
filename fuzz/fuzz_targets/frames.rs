//! Frames from a peer after the handshake, in each of the four directions
//! between clients, the coordinator and nodes.
#![no_main]

use fleetmap_protocol::{ClientToCoordinator, CoordinatorToClient, CoordinatorToNode, NodeToCoordinator};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

/// Large enough for every path through the decoder, small enough that the
/// fuzzer never waits on a real gigabyte.
const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => common::decode_stream::<ClientToCoordinator>(rest, MAX, |_| {}),
        1 => common::decode_stream::<CoordinatorToClient>(rest, MAX, |_| {}),
        2 => common::decode_stream::<NodeToCoordinator>(rest, MAX, |_| {}),
        _ => common::decode_stream::<CoordinatorToNode>(rest, MAX, |_| {}),
    }
});
