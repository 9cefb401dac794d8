//! `fleetmap keys` and `fleetmap nodes`: the named API keys and the node
//! registry in a coordinator's state directory (`fleetmap_coordinator::keys`
//! and `::nodes`). A running coordinator picks up every change before its
//! next admission or job (keys) or within a second (revoked nodes).

use std::path::Path;

use fleetmap_coordinator::{
    credentials::Credentials,
    keys::{KeyStore, Quota},
    NodeRegistry,
};
use pyo3::{prelude::*, types::PyDict};

use crate::errors::configuration_error;

fn store(state_dir: &Path) -> PyResult<KeyStore> {
    if !state_dir.join("ca.pem").exists() {
        return Err(configuration_error(format!(
            "{} holds no coordinator state; give the --state-dir of `fleetmap coordinator`",
            state_dir.display()
        )));
    }
    let credentials = Credentials::load_or_create(state_dir).map_err(configuration_error)?;
    KeyStore::open(state_dir, &credentials.api_key).map_err(configuration_error)
}

/// Makes a key for `name` and returns it; only its hash is kept.
#[pyfunction]
#[pyo3(signature = (state_dir, name, max_slots=None, max_jobs=None))]
pub(crate) fn keys_create(
    state_dir: std::path::PathBuf,
    name: &str,
    max_slots: Option<u32>,
    max_jobs: Option<u32>,
) -> PyResult<String> {
    store(&state_dir)?
        .create(name, Quota { max_slots, max_jobs })
        .map_err(configuration_error)
}

/// Every key as a dict: name, created, revoked (or None), max_slots,
/// max_jobs (or None each).
#[pyfunction]
pub(crate) fn keys_list(py: Python<'_>, state_dir: std::path::PathBuf) -> PyResult<Vec<Bound<'_, PyDict>>> {
    let entries = store(&state_dir)?.list().map_err(configuration_error)?;
    entries
        .into_iter()
        .map(|e| {
            let d = PyDict::new(py);
            d.set_item("name", e.name)?;
            d.set_item("created", e.created)?;
            d.set_item("revoked", e.revoked)?;
            d.set_item("max_slots", e.quota.max_slots)?;
            d.set_item("max_jobs", e.quota.max_jobs)?;
            Ok(d)
        })
        .collect()
}

/// Every node the coordinator in `state_dir` enrolled, as a dict: name,
/// enrolled, expires (or None), revoked (or None).
#[pyfunction]
pub(crate) fn nodes_list(py: Python<'_>, state_dir: std::path::PathBuf) -> PyResult<Vec<Bound<'_, PyDict>>> {
    store(&state_dir)?;
    let entries = NodeRegistry::open(&state_dir).list().map_err(configuration_error)?;
    entries
        .into_iter()
        .map(|e| {
            let d = PyDict::new(py);
            d.set_item("name", e.name)?;
            d.set_item("enrolled", e.enrolled)?;
            d.set_item("expires", e.expires)?;
            d.set_item("revoked", e.revoked)?;
            d.set_item("approved", e.approved)?;
            d.set_item("requested", e.requested)?;
            Ok(d)
        })
        .collect()
}

/// Approves node `name` (waiting to enroll, or revoked): it may enroll
/// with the join token.
#[pyfunction]
pub(crate) fn nodes_approve(state_dir: std::path::PathBuf, name: &str) -> PyResult<()> {
    store(&state_dir)?;
    NodeRegistry::open(&state_dir)
        .approve(name)
        .map_err(configuration_error)
}

/// Revokes node `name`: its certificate and its name are refused, and a
/// running coordinator disconnects it within a second.
#[pyfunction]
pub(crate) fn nodes_revoke(state_dir: std::path::PathBuf, name: &str) -> PyResult<()> {
    store(&state_dir)?;
    NodeRegistry::open(&state_dir).revoke(name).map_err(configuration_error)
}

/// Revokes the keys of `name`.
#[pyfunction]
pub(crate) fn keys_revoke(state_dir: std::path::PathBuf, name: &str) -> PyResult<()> {
    store(&state_dir)?.revoke(name).map_err(configuration_error)
}
