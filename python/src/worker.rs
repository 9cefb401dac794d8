//! The entry point of a slot's worker process. The worker loop itself lives
//! in `fleetmap_runtime::python`; this only exposes it to
//! `fleetmap._worker.main`.

use pyo3::prelude::*;

/// Runs the worker loop on the inherited channel `fd` (called by
/// `fleetmap._worker.main` in a slot's worker process).
#[pyfunction]
pub(crate) fn worker_main(py: Python<'_>, fd: i32) -> PyResult<()> {
    fleetmap_runtime::python::worker_main(py, fd)
}
