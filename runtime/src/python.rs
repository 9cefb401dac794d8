//! The Python executor. It runs in a worker process started by the node
//! daemon with the job's interpreter (`python -c "import fleetmap._worker"`),
//! which calls [`worker_main`] through the `fleetmap._native` module.
//!
//! Rust moves the bytes (with the GIL released while it waits on the
//! channel); the Python helpers in `fleetmap._worker` unpickle, call and
//! pickle, so that exceptions and tracebacks are Python's own.

use fleetmap_protocol::{worker::FromWorker, worker::ToWorker, DEFAULT_MAX_FRAME};
use pyo3::{
    exceptions::PyRuntimeError,
    prelude::*,
    types::{PyBytes, PyTuple},
};

use crate::WorkerChannel;

fn runtime_error(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// Serves the node daemon on the inherited channel `fd` until it closes.
pub fn worker_main(py: Python<'_>, fd: i32) -> PyResult<()> {
    let stream = fleetmap_sandbox::inherited_channel(fd).map_err(runtime_error)?;
    let mut channel = WorkerChannel::new(stream, DEFAULT_MAX_FRAME);
    let helpers = py.import("fleetmap._worker")?;
    let load = helpers.getattr("load_function")?;
    let run = helpers.getattr("run_chunk")?;
    let mut function: Option<PyObject> = None;
    loop {
        let Some(request) = py.allow_threads(|| channel.recv()).map_err(runtime_error)? else {
            return Ok(());
        };
        let reply = match request {
            ToWorker::Load { function: pickled } => {
                let loaded = load.call1((PyBytes::new(py, &pickled),))?;
                let loaded = loaded.downcast::<PyTuple>()?;
                let error: Option<String> = loaded.get_item(1)?.extract()?;
                match error {
                    Some(error) => FromWorker::LoadFailed { error },
                    None => {
                        function = Some(loaded.get_item(0)?.unbind());
                        FromWorker::Ready {
                            pid: std::process::id(),
                        }
                    }
                }
            }
            ToWorker::Run { chunk } => {
                let Some(f) = function.as_ref() else {
                    return Err(runtime_error("the daemon sent inputs before a function"));
                };
                let result = run.call1((f, PyBytes::new(py, &chunk.payload), chunk.first_input))?;
                let (payload, failed): (Bound<'_, PyBytes>, u32) = result.extract()?;
                FromWorker::Done {
                    chunk: chunk.chunk,
                    failed,
                    payload: payload.as_bytes().to_vec(),
                }
            }
        };
        py.allow_threads(|| channel.send(&reply)).map_err(runtime_error)?;
    }
}
