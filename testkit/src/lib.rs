//! fleetmap's test kit: the pieces that the integration tests (`tests/all`)
//! and the fleet emulator (`benches`) both need to stand up a fleet on
//! loopback and talk to it over the real protocol.
//!
//! - [`start_coordinator`]: a real coordinator on loopback with fresh
//!   credentials, and the [`CoordinatorAccess`] that admits peers to it.
//! - [`Peer`]: a typed raw connection that joins with any [`Role`] through
//!   the one session layer (`fleetmap_net::dial`); [`node_role`] is the role
//!   every emulated node joins with.
//! - [`job_spec`] and [`ONE_CORE`]: the jobs they submit.
//! - [`EchoNode`]: a node that answers every chunk with its own payload, at
//!   once or after an emulated time per input, and can die on purpose.
//!
//! Nothing here stands in for the component under test: the coordinator and
//! the client are the real ones, and an echo node speaks the real protocol.
//! This crate is for tests and benches only (`publish = false`), so it may
//! use `anyhow` and panic in helpers whose names say so; no crate that ships
//! may depend on it (`tests/all/dependencies.rs` checks).
//!
//! [`Role`]: fleetmap_protocol::Role

mod coordinator;
mod echo;
mod peer;
mod spec;

pub use coordinator::{connect_client, start_coordinator, start_coordinator_with, CoordinatorAccess};
pub use echo::{EchoNode, EchoStats, SlotsStarted};
pub use peer::{node_key, node_role, node_role_with_key, open_raw, open_raw_from, ClientPeer, NodePeer, Peer};
pub use spec::{job_spec, ONE_CORE};
