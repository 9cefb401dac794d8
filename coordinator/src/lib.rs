//! fleetmap's coordinator: a QUIC server that admits node daemons and
//! clients, places each job's slots on nodes, feeds chunks of inputs to the
//! slots as they free up and streams the outputs back to the client.
//!
//! All decisions live in [`scheduler`], a state machine without I/O; the
//! server in [`server`] only moves messages between connections and it.
//! This crate must not depend on `sandbox`, `runtime` or pyo3: the
//! coordinator never runs user code and never unpickles anything.

pub mod credentials;
pub mod keys;
mod metrics;
pub mod nodes;
pub mod results;
pub mod scheduler;
pub mod server;
pub mod statefile;

pub use credentials::Credentials;
pub use keys::{KeyStore, Quota};
pub use nodes::NodeRegistry;
pub use scheduler::Grace;
pub use server::{serve, CoordinatorConfig, Limits, LiveSettings, NodeLimit, RunningCoordinator};
