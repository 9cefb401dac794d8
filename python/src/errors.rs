//! Native failures raised as `fleetmap`'s own exception classes.
//!
//! The classes are defined once, in Python (`fleetmap/_errors.py`), and this
//! file looks them up when `fleetmap._native` is imported. They live in
//! Python rather than in `create_exception!` because several have two bases
//! (`CoordinatorUnreachable` is a `ConnectionError`, `WasmTimeout` a
//! `TimeoutError`), which a Rust-defined class cannot have; because
//! pure-Python code raises the same classes (a worker's `OutOfMemory`, a bad
//! input's `InputError`); and because an exception raised in a worker is
//! pickled by reference to its class, which must import on the client
//! without the extension's help. Which Rust error becomes which class is
//! decided here and nowhere else.

use fleetmap_client::{local::LocalClusterError, ClientError};
use fleetmap_runtime::wasm::WasmError;
use pyo3::{prelude::*, sync::PyOnceLock, types::PyType, PyErrArguments};

/// The classes of `fleetmap._errors` that the native core raises.
#[derive(Clone, Copy)]
enum ErrorClass {
    FleetmapError,
    ConfigurationError,
    CoordinatorUnreachable,
    AuthenticationError,
    JobRejected,
    WasmError,
    WasmTimeout,
    WasmMemoryLimit,
}

impl ErrorClass {
    /// Every class, in the order of the discriminants (the index into
    /// [`CLASSES`]).
    const ALL: [ErrorClass; 8] = [
        ErrorClass::FleetmapError,
        ErrorClass::ConfigurationError,
        ErrorClass::CoordinatorUnreachable,
        ErrorClass::AuthenticationError,
        ErrorClass::JobRejected,
        ErrorClass::WasmError,
        ErrorClass::WasmTimeout,
        ErrorClass::WasmMemoryLimit,
    ];

    fn python_name(self) -> &'static str {
        match self {
            ErrorClass::FleetmapError => "FleetmapError",
            ErrorClass::ConfigurationError => "ConfigurationError",
            ErrorClass::CoordinatorUnreachable => "CoordinatorUnreachable",
            ErrorClass::AuthenticationError => "AuthenticationError",
            ErrorClass::JobRejected => "JobRejected",
            ErrorClass::WasmError => "WasmError",
            ErrorClass::WasmTimeout => "WasmTimeout",
            ErrorClass::WasmMemoryLimit => "WasmMemoryLimit",
        }
    }
}

const ERRORS_MODULE: &str = "fleetmap._errors";

static CLASSES: PyOnceLock<[Py<PyType>; ErrorClass::ALL.len()]> = PyOnceLock::new();

/// Looks the classes up in `fleetmap._errors` (once per process). The module
/// initialiser calls it so that a class missing there fails the import, not
/// the first call that goes wrong.
pub(crate) fn import_classes(py: Python<'_>) -> PyResult<&[Py<PyType>; ErrorClass::ALL.len()]> {
    CLASSES.get_or_try_init(py, || {
        let module = py.import(ERRORS_MODULE)?;
        let mut classes = Vec::with_capacity(ErrorClass::ALL.len());
        for class in ErrorClass::ALL {
            let found = module.getattr(class.python_name())?.cast_into::<PyType>()?;
            classes.push(found.unbind());
        }
        Ok(classes
            .try_into()
            .unwrap_or_else(|_: Vec<_>| unreachable!("one class per ErrorClass::ALL entry")))
    })
}

/// An exception of `class`, built as `class(*args)` when Python needs it.
fn new_err(class: ErrorClass, args: impl PyErrArguments + 'static) -> PyErr {
    // Every caller holds the GIL already (errors are mapped after the
    // blocking part returns), so attaching again only bumps a counter.
    Python::attach(|py| match import_classes(py) {
        Ok(classes) => PyErr::from_type(classes[class as usize].bind(py).clone(), args),
        // Only possible if `fleetmap._errors` lost a class after import; the
        // ImportError says which.
        Err(e) => e,
    })
}

/// A wrong setting: a bad listen address, unreadable credentials, an
/// unknown user (`fleetmap.ConfigurationError`).
pub(crate) fn configuration_error(message: impl std::fmt::Display) -> PyErr {
    new_err(ErrorClass::ConfigurationError, message.to_string())
}

/// The embedded cluster could not start (`fleetmap.FleetmapError`).
pub(crate) fn local_cluster_error(e: LocalClusterError) -> PyErr {
    new_err(ErrorClass::FleetmapError, e.to_string())
}

/// A failure talking to the coordinator.
pub(crate) fn client_error(e: ClientError) -> PyErr {
    let class = match &e {
        ClientError::Unreachable { .. } | ClientError::Disconnected(_) => ErrorClass::CoordinatorUnreachable,
        // A certificate that does not verify is, like a refused key, a
        // matter of credentials; the message says which one to fix.
        ClientError::Refused(_) | ClientError::Tls(_) => ErrorClass::AuthenticationError,
        ClientError::Rejected(_) => ErrorClass::JobRejected,
        _ => ErrorClass::FleetmapError,
    };
    new_err(class, e.to_string())
}

/// A WebAssembly module that failed to load or run, as
/// `fleetmap.WasmError(message, kind, stderr, exit_code)` or the subclass
/// for its kind.
pub(crate) fn wasm_error(e: WasmError) -> PyErr {
    let class = match &e {
        WasmError::Timeout { .. } => ErrorClass::WasmTimeout,
        WasmError::MemoryLimit { .. } => ErrorClass::WasmMemoryLimit,
        _ => ErrorClass::WasmError,
    };
    let args = (e.to_string(), e.kind(), e.stderr().to_string(), e.exit_code());
    new_err(class, args)
}
