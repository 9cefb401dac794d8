//! Throughput of the wire codec: encoding and decoding `Inputs` frames of
//! several payload sizes, the per-chunk cost every message pays on each hop.

use std::time::Instant;

use fleetmap_protocol::{
    encode_frame, ChunkId, ClientToCoordinator as Message, FrameDecoder, InputChunk, InputIndex, JobId,
    DEFAULT_MAX_MESSAGE,
};

fn main() {
    println!(
        "{:>12} {:>14} {:>14} {:>12}",
        "payload", "encode/s", "decode/s", "decode MB/s"
    );
    for payload in [64usize, 4 << 10, 256 << 10, 4 << 20] {
        let msg = Message::Inputs {
            job: JobId(1),
            chunk: InputChunk {
                chunk: ChunkId(1),
                first_input: InputIndex(0),
                count: 100,
                payload: vec![7; payload],
            },
        };
        let iterations = (256 << 20) / (payload + 64);
        let mut buf = Vec::new();
        let start = Instant::now();
        for _ in 0..iterations {
            buf.clear();
            encode_frame(&msg, DEFAULT_MAX_MESSAGE, &mut buf).expect("frame within the limit");
        }
        let encode = iterations as f64 / start.elapsed().as_secs_f64();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_MESSAGE);
        let start = Instant::now();
        for _ in 0..iterations {
            decoder.extend(&buf);
            let decoded: Message = decoder.decode().expect("valid frame").expect("whole frame");
            std::hint::black_box(decoded);
        }
        let decode = iterations as f64 / start.elapsed().as_secs_f64();
        println!(
            "{:>12} {:>14.0} {:>14.0} {:>12.0}",
            payload,
            encode,
            decode,
            decode * buf.len() as f64 / 1e6
        );
    }
}
