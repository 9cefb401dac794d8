//! Ids as newtypes: a `JobId` cannot be passed where a `NodeId` is meant,
//! and two maps can no longer share a key space by accident.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$inner> for $name {
            fn from(v: $inner) -> Self {
                Self(v)
            }
        }
    };
}

id!(
    /// A node connection, unique for the life of a coordinator.
    NodeId(u64)
);
id!(
    /// A client connection, unique for the life of a coordinator.
    ClientId(u64)
);
id!(
    /// A job, unique for the life of a coordinator.
    JobId(u64)
);
id!(
    /// A slot within a job: slot ids of one job are unique across nodes.
    SlotId(u32)
);
id!(
    /// The sequence number of a chunk of inputs within its job.
    ChunkId(u64)
);
id!(
    /// The position of an input in the caller's `inputs`.
    InputIndex(u64)
);
id!(
    /// A client's request number, echoed in the coordinator's answer.
    RequestId(u64)
);

impl InputIndex {
    /// The index `n` places after this one.
    pub fn offset(self, n: u64) -> InputIndex {
        InputIndex(self.0 + n)
    }
}
