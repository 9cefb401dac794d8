//! `fleetmap._native`: the Python binding. It converts types between Python
//! and the Rust crates and holds the process's tokio runtime; it makes no
//! decisions of its own. Blocking calls release the GIL.
//!
//! This file only registers the module; each other file has one job:
//! `client` (connections and jobs), `keys` (named API keys), `servers` (the coordinator, node daemon
//! and local cluster embedded in the interpreter), `worker` (a slot's worker
//! entry point), `wasm` (WebAssembly functions), `errors` (which `fleetmap`
//! exception class each Rust error raises) and `process` (the tokio runtime
//! and logging).
//!
//! Errors raise the exception classes of `fleetmap/_errors.py` directly,
//! never an intermediate native type. Nothing here decides anything that a
//! crate below could: scheduling, placement and the protocol stay in the
//! crates this one wraps, so the binding depends on them and never the other
//! way round.

mod client;
mod errors;
mod keys;
mod process;
mod servers;
mod wasm;
mod worker;

use pyo3::prelude::*;

#[pymodule]
mod _native {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::client::{connect, Connection, PyJob};
    #[pymodule_export]
    use crate::keys::{keys_create, keys_list, keys_revoke, nodes_approve, nodes_list, nodes_revoke};
    #[pymodule_export]
    use crate::process::init_logging;
    #[pymodule_export]
    use crate::servers::{start_local_cluster, LocalHandle};
    #[pymodule_export]
    use crate::wasm::{validate_wasm, PyWasmModule};
    #[pymodule_export]
    use crate::worker::worker_main;

    /// fleetmap's software version (the Rust crates' `CARGO_PKG_VERSION`).
    #[pymodule_export]
    const VERSION: &str = fleetmap_protocol::SOFTWARE_VERSION;

    /// Looks up the exception classes now, so that a mismatch with
    /// `fleetmap/_errors.py` fails the import instead of a later call.
    #[pymodule_init]
    fn init(py: Python<'_>) -> PyResult<()> {
        crate::errors::import_classes(py)?;
        Ok(())
    }
}
