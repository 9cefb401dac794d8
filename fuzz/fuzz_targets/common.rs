//! What every target checks: a byte stream, cut into frames however it
//! comes, decodes into messages of type `T` or into a `DecodeError`, never
//! a panic, a hang or an allocation beyond the limit; and every message
//! that decodes encodes again and decodes to itself.

use fleetmap_protocol::{encode_frame, FrameDecoder};
use serde::{de::DeserializeOwned, Serialize};

pub fn decode_stream<T>(data: &[u8], max_message: usize, mut each: impl FnMut(&T))
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    // The first byte says where the stream is cut, so pieces of frames
    // arrive across reads as they do from a socket.
    let (cut, bytes) = match data.split_first() {
        Some((&cut, rest)) => (usize::from(cut).max(1), rest),
        None => return,
    };
    let mut decoder = FrameDecoder::new(max_message);
    for piece in bytes.chunks(cut) {
        decoder.extend(piece);
        loop {
            match decoder.decode::<T>() {
                Ok(Some(msg)) => {
                    each(&msg);
                    let mut frame = Vec::new();
                    encode_frame(&msg, max_message, &mut frame).expect("a decoded message encodes");
                    let mut again = FrameDecoder::new(max_message);
                    again.extend(&frame);
                    let back: T = again.decode().expect("it decodes").expect("whole");
                    assert_eq!(back, msg);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
}
