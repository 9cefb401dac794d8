//! The frame codec.
//!
//! A message is postcard-encoded and sent as one or more frames:
//! `u32 length (LE) | u16 protocol version (LE) | u8 flags | piece`, where
//! `length` counts the version, the flags and the piece, and the flag
//! [`MORE`] says that another piece of the same message follows. A message
//! larger than one frame (a big input, output or function) thus travels in
//! pieces of at most [`FRAGMENT_BYTES`], and what limits it is the message
//! limit of the reader (a setting, 1 GiB by default), not the frame size.
//!
//! postcard (a maintained, stable format) decodes from the message's bytes
//! only: every length it reads must be backed by bytes in the message, and
//! serde preallocates at most about 1 MiB for a declared sequence, so what a
//! message can make the decoder allocate is bounded by its size, not by the
//! lengths it declares. Every frame's length is checked against the limits
//! before its bytes are buffered.

use serde::{de::DeserializeOwned, Serialize};

use crate::PROTOCOL_VERSION;

const HEADER: usize = 4;
/// The version and the flags.
const PREFIX: usize = 3;
/// The flag that says another piece of the message follows.
pub const MORE: u8 = 1;
/// The largest frame: pieces of larger messages are this big.
pub const FRAGMENT_BYTES: usize = 4 << 20;

/// Why bytes from a peer could not be turned into a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes; this peer does not speak fleetmap's protocol")]
    FrameTooLarge { len: usize, max: usize },
    #[error(
        "message of {len} bytes or more exceeds the limit of {max} bytes; send smaller values or raise the limit on both ends"
    )]
    MessageTooLarge { len: usize, max: usize },
    #[error("frame of {len} bytes is too short to hold a protocol version")]
    FrameTooShort { len: usize },
    #[error("peer speaks protocol version {got}, this build speaks version {supported}; install the same fleetmap version on clients, coordinator and nodes")]
    UnknownVersion { got: u16, supported: u16 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("peer closed the stream in the middle of a message ({left} bytes left undecoded)")]
    Truncated { left: usize },
}

/// Why a message could not be turned into frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("message could not be encoded: {0}")]
    Serialize(String),
}

/// The largest frame a reader with message limit `max_message` accepts.
fn frame_limit(max_message: usize) -> usize {
    // At least room for one byte of message, so that any limit can be met.
    FRAGMENT_BYTES.min(max_message).max(PREFIX + 1)
}

/// Appends the frames holding `msg` to `out`; refuses messages whose
/// encoding is larger than `max_message` bytes, leaving `out` as it was.
pub fn encode_frame<T: Serialize>(msg: &T, max_message: usize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER + PREFIX]);
    if let Err(e) = postcard::to_io(msg, &mut *out) {
        out.truncate(start);
        return Err(EncodeError::Serialize(e.to_string()));
    }
    let len = out.len() - start - HEADER - PREFIX;
    if len > max_message {
        out.truncate(start);
        return Err(EncodeError::TooLarge { len, max: max_message });
    }
    let piece = frame_limit(max_message) - PREFIX;
    if len <= piece {
        write_header(&mut out[start..], len, 0);
        return Ok(());
    }
    // A large message: one copy to cut it into pieces, each with a header.
    let body = out.split_off(start + HEADER + PREFIX);
    out.truncate(start);
    let mut pieces = body.chunks(piece).peekable();
    while let Some(p) = pieces.next() {
        let at = out.len();
        out.extend_from_slice(&[0; HEADER + PREFIX]);
        let flags = if pieces.peek().is_some() { MORE } else { 0 };
        write_header(&mut out[at..], p.len(), flags);
        out.extend_from_slice(p);
    }
    Ok(())
}

fn write_header(at: &mut [u8], piece: usize, flags: u8) {
    // A piece is at most FRAGMENT_BYTES, far below u32::MAX.
    at[..HEADER].copy_from_slice(&((piece + PREFIX) as u32).to_le_bytes());
    at[HEADER..HEADER + 2].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    at[HEADER + 2] = flags;
}

/// An incremental decoder: feed it bytes as they arrive, take messages out.
/// The async reader (`fleetmap_net`) and the blocking one (the worker's
/// channel) share it, and with it every check on a peer's bytes.
///
/// After an error the stream is out of sync; the caller closes the connection.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max_message: usize,
    /// The pieces received so far of a message sent in several frames.
    partial: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder that accepts messages of up to `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max_message,
            partial: Vec::new(),
        }
    }

    /// Changes the message limit, e.g. from the handshake's small limit to
    /// the session's once the peer has authenticated.
    pub fn set_max_message(&mut self, max: usize) {
        self.max_message = max;
    }

    /// Adds bytes received from the peer.
    pub fn extend(&mut self, bytes: &[u8]) {
        // Reclaim consumed space before growing, so the buffer stays about
        // one frame large however long the connection lives.
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// How many received bytes are not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start + self.partial.len()
    }

    /// How many more bytes the next frame needs, if its header is known.
    /// Lets a reader size its next read.
    pub fn needed(&self) -> Option<usize> {
        let len = self.frame_len()?;
        Some((HEADER + len).saturating_sub(self.buf.len() - self.start))
    }

    /// The peer ended its stream: fine between messages, an error inside one.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.buffered() {
            0 => Ok(()),
            left => Err(DecodeError::Truncated { left }),
        }
    }

    fn frame_len(&self) -> Option<usize> {
        let pending = &self.buf[self.start..];
        let header: [u8; HEADER] = pending.get(..HEADER)?.try_into().ok()?;
        Some(u32::from_le_bytes(header) as usize)
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn decode<T: DeserializeOwned>(&mut self) -> Result<Option<T>, DecodeError> {
        loop {
            let Some(len) = self.frame_len() else {
                return Ok(None);
            };
            let limit = frame_limit(self.max_message);
            if len > limit {
                return Err(DecodeError::FrameTooLarge { len, max: limit });
            }
            if len < PREFIX {
                return Err(DecodeError::FrameTooShort { len });
            }
            if self.buf.len() - self.start < HEADER + len {
                return Ok(None);
            }
            let frame = &self.buf[self.start + HEADER..self.start + HEADER + len];
            let version = u16::from_le_bytes([frame[0], frame[1]]);
            if version != PROTOCOL_VERSION {
                return Err(DecodeError::UnknownVersion {
                    got: version,
                    supported: PROTOCOL_VERSION,
                });
            }
            let flags = frame[2];
            if flags & !MORE != 0 {
                return Err(DecodeError::Malformed(format!("unknown frame flags {flags:#04x}")));
            }
            let piece = &frame[PREFIX..];
            let so_far = self.partial.len() + piece.len();
            if so_far > self.max_message {
                return Err(DecodeError::MessageTooLarge {
                    len: so_far,
                    max: self.max_message,
                });
            }
            let result = if flags & MORE != 0 {
                self.partial.extend_from_slice(piece);
                None
            } else if self.partial.is_empty() {
                Some(decode_body(piece))
            } else {
                self.partial.extend_from_slice(piece);
                let r = decode_body(&self.partial);
                // Keep no more than a frame's worth of memory between messages.
                if self.partial.capacity() > 2 * FRAGMENT_BYTES {
                    self.partial = Vec::new();
                } else {
                    self.partial.clear();
                }
                Some(r)
            };
            self.start += HEADER + len;
            if self.start == self.buf.len() {
                self.buf.clear();
                self.start = 0;
            }
            if let Some(r) = result {
                return r.map(Some);
            }
        }
    }
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    let (msg, rest) = postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the message inside its frame",
            rest.len()
        )));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng};

    use super::*;
    use crate::{ChunkId, ClientToCoordinator as Message, InputChunk, InputIndex, JobId, DEFAULT_MAX_MESSAGE};

    fn sample() -> Message {
        Message::Inputs {
            job: JobId(7),
            chunk: InputChunk {
                chunk: ChunkId(3),
                first_input: InputIndex(300),
                count: 100,
                payload: (0..=255).collect(),
            },
        }
    }

    fn frame(msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(msg, DEFAULT_MAX_MESSAGE, &mut out).unwrap();
        out
    }

    #[test]
    fn round_trips_messages_split_at_every_byte() {
        let mut bytes = frame(&sample());
        bytes.extend(frame(&Message::CancelJob { job: JobId(9) }));
        for split in 0..bytes.len() {
            let mut dec = FrameDecoder::new(DEFAULT_MAX_MESSAGE);
            let mut got = Vec::new();
            for part in [&bytes[..split], &bytes[split..]] {
                dec.extend(part);
                while let Some(m) = dec.decode::<Message>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(
                got,
                vec![sample(), Message::CancelJob { job: JobId(9) }],
                "split at {split}"
            );
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn truncated_frame_waits_for_more_bytes() {
        let bytes = frame(&sample());
        let mut dec = FrameDecoder::new(DEFAULT_MAX_MESSAGE);
        dec.extend(&bytes[..bytes.len() - 1]);
        assert_eq!(dec.decode::<Message>(), Ok(None));
        assert_eq!(dec.needed(), Some(1));
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let mut dec = FrameDecoder::new(1024);
        dec.extend(&(1_000_000u32).to_le_bytes());
        assert_eq!(
            dec.decode::<Message>(),
            Err(DecodeError::FrameTooLarge {
                len: 1_000_000,
                max: 1024
            })
        );
    }

    #[test]
    fn encoder_refuses_frames_above_the_limit() {
        let mut out = vec![1, 2, 3];
        let err = encode_frame(&sample(), 64, &mut out).unwrap_err();
        assert!(matches!(err, EncodeError::TooLarge { max: 64, .. }), "{err}");
        assert_eq!(out, vec![1, 2, 3], "a refused frame leaves the buffer as it was");
    }

    #[test]
    fn unknown_version_names_both_versions() {
        let mut bytes = frame(&sample());
        bytes[4..6].copy_from_slice(&99u16.to_le_bytes());
        let mut dec = FrameDecoder::new(DEFAULT_MAX_MESSAGE);
        dec.extend(&bytes);
        let err = dec.decode::<Message>().unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnknownVersion {
                got: 99,
                supported: PROTOCOL_VERSION
            }
        );
        assert!(err.to_string().contains("version 99"));
    }

    #[test]
    fn too_short_frame_is_an_error() {
        let mut dec = FrameDecoder::new(DEFAULT_MAX_MESSAGE);
        dec.extend(&1u32.to_le_bytes());
        dec.extend(&[0]);
        assert_eq!(dec.decode::<Message>(), Err(DecodeError::FrameTooShort { len: 1 }));
    }

    #[test]
    fn malformed_body_is_an_error() {
        let mut bytes = Vec::new();
        bytes.extend(&7u32.to_le_bytes());
        bytes.extend(&PROTOCOL_VERSION.to_le_bytes());
        bytes.push(0);
        bytes.extend(&[250, 255, 255, 255]);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_MESSAGE);
        dec.extend(&bytes);
        assert!(matches!(dec.decode::<Message>(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_malformed() {
        let mut bytes = frame(&Message::CancelJob { job: JobId(1) });
        bytes.push(0);
        let len = (bytes.len() - HEADER) as u32;
        bytes[..HEADER].copy_from_slice(&len.to_le_bytes());
        let mut dec = FrameDecoder::new(DEFAULT_MAX_MESSAGE);
        dec.extend(&bytes);
        assert!(matches!(dec.decode::<Message>(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn huge_declared_vector_length_does_not_allocate() {
        // A body that claims a payload of 2^60 bytes inside a small frame must
        // fail for want of bytes rather than try to allocate.
        let mut body = PROTOCOL_VERSION.to_le_bytes().to_vec();
        body.push(0); // flags
        body.push(1); // ClientToCoordinator::Inputs
        body.extend(&[1, 1, 1, 1]); // job, chunk, first_input, count
                                    // A varint payload length of 2^60.
        let mut n = 1u64 << 60;
        while n >= 0x80 {
            body.push((n as u8) | 0x80);
            n >>= 7;
        }
        body.push(n as u8);
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend(body);
        let mut dec = FrameDecoder::new(4096);
        dec.extend(&bytes);
        assert!(matches!(dec.decode::<Message>(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xf1ee7);
        for _ in 0..20_000 {
            let len = rng.random_range(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if rng.random_bool(0.5) && bytes.len() > 6 {
                // Make the header plausible so the body decoder gets exercised.
                let body = (bytes.len() - HEADER) as u32;
                bytes[..HEADER].copy_from_slice(&body.to_le_bytes());
                bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                if rng.random_bool(0.5) {
                    bytes[6] &= MORE;
                }
            }
            let mut dec = FrameDecoder::new(1 << 16);
            dec.extend(&bytes);
            while let Ok(Some(_)) = dec.decode::<Message>() {}
        }
    }
}

#[cfg(test)]
mod stream_end {
    use super::*;

    #[test]
    fn the_end_of_a_stream_is_fine_between_frames_only() {
        let mut dec = FrameDecoder::new(1024);
        assert_eq!(dec.finish(), Ok(()));
        dec.extend(&[10, 0, 0, 0, 2]);
        assert_eq!(dec.finish(), Err(DecodeError::Truncated { left: 5 }));
    }

    #[test]
    fn a_declared_list_of_a_million_gpus_needs_the_bytes_to_back_it() {
        // Resources { cores, memory_bytes, gpus: Vec<Gpu> } declaring 10^6
        // GPUs in a 16-byte body: refused for want of bytes.
        let mut body = PROTOCOL_VERSION.to_le_bytes().to_vec();
        body.push(0); // flags
        body.extend(&[2, 2]); // cores, memory_bytes
        body.extend(&[0xc0, 0x84, 0x3d]); // 1,000,000 as a varint
        body.extend(&[0; 8]);
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend(body);
        let mut dec = FrameDecoder::new(1024);
        dec.extend(&bytes);
        assert!(matches!(
            dec.decode::<crate::Resources>(),
            Err(DecodeError::Malformed(_))
        ));
    }
}

#[cfg(test)]
mod pieces {
    use super::*;
    use crate::{ChunkId, ClientToCoordinator, InputChunk, InputIndex, JobId};

    fn big(len: usize) -> ClientToCoordinator {
        ClientToCoordinator::Inputs {
            job: JobId(1),
            chunk: InputChunk {
                chunk: ChunkId(0),
                first_input: InputIndex(0),
                count: 1,
                payload: (0..len).map(|i| (i % 251) as u8).collect(),
            },
        }
    }

    #[test]
    fn a_message_larger_than_a_frame_travels_in_pieces() {
        let msg = big(2 * FRAGMENT_BYTES + 12345);
        let mut bytes = Vec::new();
        encode_frame(&msg, 64 << 20, &mut bytes).unwrap();
        assert!(bytes.len() > 2 * FRAGMENT_BYTES + 12345, "every piece has a header");
        // Fed in odd-sized reads, as a socket would deliver it.
        let mut dec = FrameDecoder::new(64 << 20);
        let mut got = None;
        for part in bytes.chunks(1 << 19 | 7) {
            dec.extend(part);
            if let Some(m) = dec.decode::<ClientToCoordinator>().unwrap() {
                assert!(got.is_none());
                got = Some(m);
            }
        }
        assert_eq!(got, Some(msg));
        assert_eq!(dec.buffered(), 0);
        assert_eq!(dec.finish(), Ok(()));
    }

    #[test]
    fn the_message_limit_holds_across_pieces() {
        let msg = big(FRAGMENT_BYTES * 3);
        let mut bytes = Vec::new();
        let err = encode_frame(&msg, FRAGMENT_BYTES * 2, &mut bytes).unwrap_err();
        assert!(matches!(err, EncodeError::TooLarge { .. }), "{err}");
        assert!(bytes.is_empty());
        // A sender with a larger limit: the reader refuses once the pieces
        // it has buffered pass its own limit, not after the whole message.
        encode_frame(&msg, 1 << 30, &mut bytes).unwrap();
        let mut dec = FrameDecoder::new(FRAGMENT_BYTES * 2);
        dec.extend(&bytes);
        match dec.decode::<ClientToCoordinator>() {
            Err(DecodeError::MessageTooLarge { len, max }) => {
                assert_eq!(max, FRAGMENT_BYTES * 2);
                assert!(len <= FRAGMENT_BYTES * 3, "{len}");
            }
            other => panic!("expected MessageTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn a_stream_cut_between_pieces_is_truncated() {
        let msg = big(FRAGMENT_BYTES + 1);
        let mut bytes = Vec::new();
        encode_frame(&msg, 64 << 20, &mut bytes).unwrap();
        let mut dec = FrameDecoder::new(64 << 20);
        dec.extend(&bytes[..FRAGMENT_BYTES + HEADER]);
        assert_eq!(dec.decode::<ClientToCoordinator>(), Ok(None));
        assert!(matches!(dec.finish(), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn unknown_flags_are_malformed() {
        let mut bytes = Vec::new();
        encode_frame(&big(3), 1 << 20, &mut bytes).unwrap();
        bytes[HEADER + 2] = 0x80;
        let mut dec = FrameDecoder::new(1 << 20);
        dec.extend(&bytes);
        assert!(matches!(
            dec.decode::<ClientToCoordinator>(),
            Err(DecodeError::Malformed(_))
        ));
    }
}
