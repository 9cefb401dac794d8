//! The Python executor. It runs in a worker process started by the node
//! daemon with the job's interpreter (`python -c "import fleetmap._worker"`),
//! which calls [`worker_main`] through the `fleetmap._native` module.
//!
//! Rust moves the bytes (with the GIL released while it waits on the
//! channel); the Python helpers in `fleetmap._worker` unpickle, call and
//! pickle, so that exceptions and tracebacks are Python's own.

use std::{io::Write, os::unix::net::UnixStream, sync::Mutex};

use fleetmap_protocol::{
    encode_frame,
    worker::{CrashKind, CrashedInput, FromWorker, ToWorker},
    InputIndex, DEFAULT_MAX_MESSAGE,
};
use pyo3::{
    exceptions::PyRuntimeError,
    prelude::*,
    types::{PyBytes, PyCFunction, PyDict, PyTuple},
};

use crate::WorkerChannel;

fn runtime_error(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// Serves the node daemon on the inherited channel `fd` until it closes.
pub fn worker_main(py: Python<'_>, fd: i32) -> PyResult<()> {
    let stream = fleetmap_sandbox::inherited_channel(fd).map_err(runtime_error)?;
    let started = started_callback(py, stream.try_clone().map_err(runtime_error)?)?;
    let mut channel = WorkerChannel::new(stream, DEFAULT_MAX_MESSAGE);
    let helpers = py.import("fleetmap._worker")?;
    let load = helpers.getattr("load_function")?;
    let run = helpers.getattr("run_chunk")?;
    let mut function: Option<Py<PyAny>> = None;
    loop {
        let Some(request) = py.detach(|| channel.recv()).map_err(runtime_error)? else {
            return Ok(());
        };
        let reply = match request {
            ToWorker::Load {
                function: pickled,
                settings,
            } => {
                // The daemon sends the job's chunks right behind its
                // function: if this one cannot be loaded, they must find no
                // function at all, never the previous job's.
                function = None;
                let settings_dict = PyDict::new(py);
                settings_dict.set_item("node", &settings.node)?;
                settings_dict.set_item("caller_python", &settings.caller_python)?;
                settings_dict.set_item("memory_limit_bytes", settings.memory_limit_bytes)?;
                settings_dict.set_item("max_output_bytes", settings.max_output_bytes)?;
                settings_dict.set_item("environment", settings.environment)?;
                settings_dict.set_item("sources", settings.sources)?;
                let loaded = load.call1((PyBytes::new(py, &pickled), settings_dict))?;
                let loaded = loaded.cast::<PyTuple>()?;
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
            ToWorker::Run {
                chunk,
                isolated,
                crashed,
            } => {
                let Some(f) = function.as_ref() else {
                    // After a function that could not be loaded (the daemon
                    // has its LoadFailed and fails the slot), or a daemon
                    // out of step: nothing runs.
                    return Err(runtime_error("the daemon sent inputs without a loaded function"));
                };
                let isolation = if isolated {
                    (started.clone_ref(py), crashed_to_py(py, &crashed)?)
                        .into_pyobject(py)?
                        .into_any()
                } else {
                    py.None().into_bound(py)
                };
                let result = run.call1((f, PyBytes::new(py, &chunk.payload), chunk.first_input.0, isolation))?;
                let (payload, failed): (Bound<'_, PyBytes>, u32) = result.extract()?;
                FromWorker::Done {
                    chunk: chunk.chunk,
                    failed,
                    payload: payload.as_bytes().to_vec(),
                }
            }
        };
        py.detach(|| channel.send(&reply)).map_err(runtime_error)?;
    }
}

/// A Python callable `started(input)` that tells the daemon, in an isolated
/// run, which input's call starts now. It writes on its own handle of the
/// channel; calls happen on the worker's one thread between the main loop's
/// reads and writes, so frames never interleave.
fn started_callback(py: Python<'_>, stream: UnixStream) -> PyResult<Py<PyAny>> {
    let stream = Mutex::new((stream, Vec::new()));
    let callback = PyCFunction::new_closure(
        py,
        None,
        None,
        move |args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>| -> PyResult<()> {
            let input: u64 = args.get_item(0)?.extract()?;
            let mut guard = stream
                .lock()
                .map_err(|_| runtime_error("worker channel lock poisoned"))?;
            let (stream, buf) = &mut *guard;
            buf.clear();
            encode_frame(
                &FromWorker::Started {
                    input: InputIndex(input),
                },
                DEFAULT_MAX_MESSAGE,
                buf,
            )
            .map_err(runtime_error)?;
            stream.write_all(buf).map_err(runtime_error)
        },
    )?;
    Ok(callback.into_any().unbind())
}

/// `{input: (kind, message)}` for the inputs that are not to run again.
fn crashed_to_py<'py>(py: Python<'py>, crashed: &[CrashedInput]) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for c in crashed {
        let kind = match c.kind {
            CrashKind::OutOfMemory => "oom",
            CrashKind::Died => "died",
        };
        dict.set_item(c.input.0, (kind, &c.message))?;
    }
    Ok(dict)
}
