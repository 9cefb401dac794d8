//! The frame codec: `u32 length | u16 version | postcard body`.
//!
//! postcard (a maintained, stable format) decodes from the frame's bytes
//! only: every length it reads must be backed by bytes in the frame, and
//! serde preallocates at most about 1 MiB for a declared sequence, so what a
//! frame can make the decoder allocate is bounded by the frame's size, not
//! by the lengths it declares.

use serde::{de::DeserializeOwned, Serialize};

use crate::PROTOCOL_VERSION;

const HEADER: usize = 4;
const VERSION: usize = 2;

/// Why bytes from a peer could not be turned into a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    #[error(
        "frame of {len} bytes exceeds the limit of {max} bytes; send smaller chunks or raise the limit on both ends"
    )]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame of {len} bytes is too short to hold a protocol version")]
    FrameTooShort { len: usize },
    #[error("peer speaks protocol version {got}, this build speaks version {supported}; install the same fleetmap version on clients, coordinator and nodes")]
    UnknownVersion { got: u16, supported: u16 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("peer closed the stream in the middle of a frame ({left} bytes left undecoded)")]
    Truncated { left: usize },
}

/// Why a message could not be turned into a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("message of {len} bytes exceeds the frame limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("message could not be encoded: {0}")]
    Serialize(String),
}

/// Appends one frame holding `msg` to `out`; refuses frames above `max`.
pub fn encode_frame<T: Serialize>(msg: &T, max: usize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    if let Err(e) = postcard::to_io(msg, &mut *out) {
        out.truncate(start);
        return Err(EncodeError::Serialize(e.to_string()));
    }
    let len = out.len() - start - HEADER;
    if len > max || len > u32::MAX as usize {
        out.truncate(start);
        return Err(EncodeError::TooLarge { len, max });
    }
    // `len` fits in u32: checked just above.
    out[start..start + HEADER].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
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
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max,
        }
    }

    /// Changes the frame limit, e.g. from the handshake's small limit to
    /// the session's once the peer has authenticated.
    pub fn set_max_frame(&mut self, max: usize) {
        self.max = max;
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
        self.buf.len() - self.start
    }

    /// How many more bytes the next frame needs, if its header is known.
    /// Lets a reader size its next read.
    pub fn needed(&self) -> Option<usize> {
        let len = self.frame_len()?;
        Some((HEADER + len).saturating_sub(self.buffered()))
    }

    /// The peer ended its stream: fine between frames, an error inside one.
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
        let Some(len) = self.frame_len() else {
            return Ok(None);
        };
        if len > self.max {
            return Err(DecodeError::FrameTooLarge { len, max: self.max });
        }
        if len < VERSION {
            return Err(DecodeError::FrameTooShort { len });
        }
        if self.buffered() < HEADER + len {
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
        let (msg, rest) =
            postcard::take_from_bytes(&frame[VERSION..]).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DecodeError::Malformed(format!(
                "{} bytes after the message inside its frame",
                rest.len()
            )));
        }
        self.start += HEADER + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::{ChunkId, ClientToCoordinator as Message, InputChunk, InputIndex, JobId, DEFAULT_MAX_FRAME};

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
        encode_frame(msg, DEFAULT_MAX_FRAME, &mut out).unwrap();
        out
    }

    #[test]
    fn round_trips_messages_split_at_every_byte() {
        let mut bytes = frame(&sample());
        bytes.extend(frame(&Message::CancelJob { job: JobId(9) }));
        for split in 0..bytes.len() {
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
            let mut got = Vec::new();
            for part in [&bytes[..split], &bytes[split..]] {
                dec.extend(part);
                while let Some(m) = dec.decode::<Message>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, vec![sample(), Message::CancelJob { job: JobId(9) }], "split at {split}");
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn truncated_frame_waits_for_more_bytes() {
        let bytes = frame(&sample());
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
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
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
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
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.extend(&1u32.to_le_bytes());
        dec.extend(&[0]);
        assert_eq!(dec.decode::<Message>(), Err(DecodeError::FrameTooShort { len: 1 }));
    }

    #[test]
    fn malformed_body_is_an_error() {
        let mut bytes = Vec::new();
        bytes.extend(&6u32.to_le_bytes());
        bytes.extend(&PROTOCOL_VERSION.to_le_bytes());
        bytes.extend(&[250, 255, 255, 255]);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.extend(&bytes);
        assert!(matches!(dec.decode::<Message>(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_malformed() {
        let mut bytes = frame(&Message::CancelJob { job: JobId(1) });
        bytes.push(0);
        let len = (bytes.len() - HEADER) as u32;
        bytes[..HEADER].copy_from_slice(&len.to_le_bytes());
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.extend(&bytes);
        assert!(matches!(dec.decode::<Message>(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn huge_declared_vector_length_does_not_allocate() {
        // A body that claims a payload of 2^60 bytes inside a small frame must
        // fail for want of bytes rather than try to allocate.
        let mut body = PROTOCOL_VERSION.to_le_bytes().to_vec();
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
            let len = rng.gen_range(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if rng.gen_bool(0.5) && bytes.len() >= 6 {
                // Make the header plausible so the body decoder gets exercised.
                let body = (bytes.len() - HEADER) as u32;
                bytes[..HEADER].copy_from_slice(&body.to_le_bytes());
                bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
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
