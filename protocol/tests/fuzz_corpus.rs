//! The fuzz targets' checked-in seeds (`fuzz/corpus/`) are valid streams of
//! today's protocol: a seed of an older protocol version would stop at the
//! version check and leave the fuzzer exploring nothing past it.
//! Regenerate them with `cargo run -p fleetmap-protocol --example fuzz_seeds
//! -- fuzz/corpus` after changing a message.

use std::path::Path;

use fleetmap_protocol::{
    worker::{FromWorker, ToWorker},
    ClientToCoordinator, CoordinatorToClient, CoordinatorToNode, FrameDecoder, Hello, HelloReply, NodeToCoordinator,
    DEFAULT_MAX_MESSAGE,
};
use serde::de::DeserializeOwned;

/// How many messages the stream holds; panics if any frame does not decode.
fn messages<T: DeserializeOwned>(stream: &[u8], seed: &Path) -> usize {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_MESSAGE);
    decoder.extend(stream);
    let mut n = 0;
    while let Some(_msg) = decoder
        .decode::<T>()
        .unwrap_or_else(|e| panic!("{}: {e}; regenerate the seeds", seed.display()))
    {
        n += 1;
    }
    decoder.finish().unwrap();
    n
}

#[test]
fn every_seed_is_a_valid_stream_of_todays_protocol() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut seen = 0;
    for target in ["frames", "handshake", "worker"] {
        for entry in std::fs::read_dir(corpus.join(target)).unwrap() {
            let seed = entry.unwrap().path();
            let bytes = std::fs::read(&seed).unwrap();
            let (which, stream) = (bytes[0], &bytes[2..]);
            let n = match (target, which % 4) {
                ("frames", 0) => messages::<ClientToCoordinator>(stream, &seed),
                ("frames", 1) => messages::<CoordinatorToClient>(stream, &seed),
                ("frames", 2) => messages::<NodeToCoordinator>(stream, &seed),
                ("frames", _) => messages::<CoordinatorToNode>(stream, &seed),
                ("handshake", w) if w % 2 == 0 => messages::<Hello>(stream, &seed),
                ("handshake", _) => messages::<HelloReply>(stream, &seed),
                (_, w) if w % 2 == 0 => messages::<FromWorker>(stream, &seed),
                _ => messages::<ToWorker>(stream, &seed),
            };
            assert!(n > 0, "{} holds no message", seed.display());
            seen += 1;
        }
    }
    assert!(seen >= 9, "the seeds are where they should be");
}
