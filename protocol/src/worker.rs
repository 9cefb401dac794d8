//! Messages between a node daemon and the worker processes of its slots.
//!
//! They travel over a Unix socket with the same frame codec as [`crate::Message`].

use serde::{Deserialize, Serialize};

use crate::{ChunkId, InputChunk, InputIndex};

/// Node daemon to worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    /// Load the job's function; the worker answers `Ready` or `LoadFailed`.
    /// The first message a worker gets.
    Load {
        #[serde(with = "serde_bytes")]
        function: Vec<u8>,
        settings: WorkerSettings,
    },
    /// Run every input of a chunk; the worker answers `Done`.
    ///
    /// After a worker died on a chunk, the daemon runs it again `isolated`:
    /// the worker says `Started` before each input, so that the next death
    /// names its input, and the inputs in `crashed` are not run again but
    /// fail with the given reason.
    Run {
        chunk: InputChunk,
        isolated: bool,
        crashed: Vec<CrashedInput>,
    },
}

/// What a worker needs to know about its job and node. It travels in the
/// protocol, not in environment variables, so that the daemon and the
/// worker cannot disagree on a default.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WorkerSettings {
    /// The node's name, for errors the worker raises.
    pub node: String,
    /// The caller's Python `major.minor`: cloudpickle needs the same on
    /// both ends, so a worker of another version refuses the function.
    pub caller_python: String,
    /// The job's `func_ram` in bytes (WebAssembly calls cap their memory at it).
    pub memory_limit_bytes: u64,
    /// The most bytes of pickled outputs one chunk may return (the message
    /// limit less room for the envelope).
    pub max_output_bytes: u64,
    /// Environment variables the job's calls see, set before its function
    /// is unpickled (`CUDA_VISIBLE_DEVICES`, `OMP_NUM_THREADS`): a warm
    /// worker started for no job in particular gets its job's here.
    pub environment: Vec<(String, String)>,
    /// The job's source bundle on this node (a zip the worker puts first on
    /// `sys.path`), if it has one.
    pub sources: Option<String>,
}

/// An input whose call killed its worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CrashedInput {
    pub input: InputIndex,
    pub kind: CrashKind,
    /// What happened, for the user: the limit, the peak, the node, the signal.
    pub message: String,
}

/// How a call killed its worker.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashKind {
    /// The slot's memory limit was exceeded and the OOM killer struck.
    OutOfMemory,
    /// Any other death: a signal, `os._exit`, a crash in native code.
    Died,
}

/// Worker to node daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum FromWorker {
    Ready {
        pid: u32,
    },
    LoadFailed {
        error: String,
    },
    /// In an isolated run: the call on `input` starts now.
    Started {
        input: InputIndex,
    },
    Done {
        chunk: ChunkId,
        failed: u32,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
}

impl crate::WireSize for ToWorker {
    fn wire_size(&self) -> usize {
        64 + match self {
            ToWorker::Load { function, .. } => function.len(),
            ToWorker::Run { chunk, .. } => chunk.payload.len(),
        }
    }
}
