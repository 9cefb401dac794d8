//! Messages between a node daemon and the worker processes of its slots.
//!
//! They travel over a Unix socket with the same frame codec as [`crate::Message`].

use serde::{Deserialize, Serialize};

use crate::{ChunkId, InputChunk};

/// Node daemon to worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    /// Load the job's function; the worker answers `Ready` or `LoadFailed`.
    Load {
        #[serde(with = "serde_bytes")]
        function: Vec<u8>,
    },
    /// Run every input of a chunk; the worker answers `Done`.
    Run { chunk: InputChunk },
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
    Done {
        chunk: ChunkId,
        failed: u32,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
}
