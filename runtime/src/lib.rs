//! fleetmap's execution runtime: what runs inside a slot's worker process.
//!
//! [`WorkerChannel`] is the worker's end of the channel to its node daemon
//! (blocking, framed). With the `python` feature, [`python::worker_main`] is
//! the Python executor: it runs inside a CPython worker process (through
//! pyo3), loads the job's function once with cloudpickle and runs chunk
//! after chunk of inputs through it. With the `wasm` feature,
//! [`wasm::WasmModule`] runs a WASI command module (wasmtime) once per
//! input, in a fresh instance each time.
//!
//! This crate must not depend on QUIC, the coordinator or the node daemon:
//! a worker talks only to its daemon, over the channel it inherited.

#[cfg(feature = "python")]
pub mod python;
#[cfg(feature = "wasm")]
pub mod wasm;

use std::io::{Read, Write};

use fleetmap_protocol::{
    encode_frame,
    worker::{FromWorker, ToWorker},
    DecodeError, EncodeError, FrameDecoder,
};

/// Why the channel to the daemon failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    #[error("worker channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("worker channel: {0}")]
    Decode(#[from] DecodeError),
    #[error("worker channel: {0}")]
    Encode(#[from] EncodeError),
}

/// The worker's end of its channel to the node daemon.
pub struct WorkerChannel<S> {
    stream: S,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    out: Vec<u8>,
    max_message: usize,
}

impl<S: Read + Write> WorkerChannel<S> {
    pub fn new(stream: S, max_message: usize) -> Self {
        Self {
            stream,
            decoder: FrameDecoder::new(max_message),
            buf: vec![0; 256 << 10],
            out: Vec::new(),
            max_message,
        }
    }

    /// The next request; `None` when the daemon closed the channel.
    pub fn recv(&mut self) -> Result<Option<ToWorker>, ChannelError> {
        loop {
            if let Some(msg) = self.decoder.decode()? {
                return Ok(Some(msg));
            }
            let n = self.stream.read(&mut self.buf)?;
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
            self.decoder.extend(&self.buf[..n]);
        }
    }

    pub fn send(&mut self, msg: &FromWorker) -> Result<(), ChannelError> {
        self.out.clear();
        encode_frame(msg, self.max_message, &mut self.out)?;
        self.stream.write_all(&self.out)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use fleetmap_protocol::{ChunkId, InputChunk, InputIndex, DEFAULT_MAX_MESSAGE};

    use super::*;

    #[test]
    fn requests_and_replies_cross_the_channel() {
        let (daemon, worker) = UnixStream::pair().unwrap();
        let mut worker = WorkerChannel::new(worker, DEFAULT_MAX_MESSAGE);
        let run = ToWorker::Run {
            chunk: InputChunk {
                chunk: ChunkId(1),
                first_input: InputIndex(10),
                count: 2,
                payload: vec![7; 100_000],
            },
            isolated: false,
            crashed: vec![],
        };
        let mut frame = Vec::new();
        encode_frame(&run, DEFAULT_MAX_MESSAGE, &mut frame).unwrap();
        (&daemon).write_all(&frame).unwrap();
        assert_eq!(worker.recv().unwrap(), Some(run));
        worker.send(&FromWorker::Ready { pid: 5 }).unwrap();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_MESSAGE);
        let mut buf = [0u8; 64];
        let n = (&daemon).read(&mut buf).unwrap();
        decoder.extend(&buf[..n]);
        assert_eq!(
            decoder.decode::<FromWorker>().unwrap(),
            Some(FromWorker::Ready { pid: 5 })
        );
        drop(daemon);
        assert_eq!(worker.recv().unwrap(), None);
    }

    #[test]
    fn garbage_from_the_daemon_is_an_error() {
        let (daemon, worker) = UnixStream::pair().unwrap();
        let mut worker = WorkerChannel::new(worker, 1024);
        (&daemon).write_all(&[0xff; 16]).unwrap();
        assert!(matches!(worker.recv(), Err(ChannelError::Decode(_))));
    }
}
