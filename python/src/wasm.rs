//! WebAssembly functions in the Python process: compiling a WASI command
//! module once and running it per input, with the GIL released. Failures
//! raise `fleetmap.WasmError` and its subclasses (see `errors.rs`).

use std::{borrow::Cow, path::PathBuf, time::Duration};

use fleetmap_runtime::wasm;
use pyo3::{exceptions::PyValueError, prelude::*, types::PyBytes};

use crate::errors::wasm_error;

/// A WASI command module compiled in this process (once per module bytes),
/// run once per input in a fresh instance: stdin in, stdout out.
#[pyclass(name = "WasmModule", module = "fleetmap._native", frozen)]
pub(crate) struct PyWasmModule {
    module: wasm::WasmModule,
}

#[pymethods]
impl PyWasmModule {
    /// Compiles `module` (binary or WAT text) with the GIL released.
    #[new]
    #[pyo3(signature = (module, memory_limit_bytes, time_limit_s, args, env, mounts, max_output_bytes))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        module: Cow<'_, [u8]>,
        memory_limit_bytes: u64,
        time_limit_s: Option<f64>,
        args: Vec<String>,
        env: Vec<(String, String)>,
        mounts: Vec<(String, String)>,
        max_output_bytes: usize,
    ) -> PyResult<Self> {
        let time_limit = time_limit_s
            .map(|s| {
                Duration::try_from_secs_f64(s)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        PyValueError::new_err(format!("time_limit_s must be a positive number of seconds, not {s}"))
                    })
            })
            .transpose()?;
        let config = wasm::WasmConfig {
            memory_limit_bytes,
            time_limit,
            args,
            env,
            mounts: mounts
                .into_iter()
                .map(|(host, guest)| (PathBuf::from(host), guest))
                .collect(),
            max_output: max_output_bytes,
            ..wasm::WasmConfig::default()
        };
        let module = py
            .detach(|| wasm::WasmModule::new(&module, config))
            .map_err(wasm_error)?;
        Ok(Self { module })
    }

    /// Runs the module on `stdin` and returns its stdout (GIL released).
    fn run(&self, py: Python<'_>, stdin: Cow<'_, [u8]>) -> PyResult<Py<PyBytes>> {
        let out = py.detach(|| self.module.run(&stdin)).map_err(wasm_error)?;
        Ok(PyBytes::new(py, &out).unbind())
    }

    /// Like `run`, returning `(stdout, stderr)`.
    fn run_with_stderr(&self, py: Python<'_>, stdin: Cow<'_, [u8]>) -> PyResult<(Py<PyBytes>, String)> {
        let out = py.detach(|| self.module.run_with_stderr(&stdin)).map_err(wasm_error)?;
        Ok((PyBytes::new(py, &out.stdout).unbind(), out.stderr))
    }
}

/// Checks that `module` compiles to a WASI command module; raises
/// `fleetmap.WasmError` (kind "invalid" or "no_start") if not.
#[pyfunction]
pub(crate) fn validate_wasm(py: Python<'_>, module: Cow<'_, [u8]>) -> PyResult<()> {
    py.detach(|| wasm::validate(&module)).map_err(wasm_error)
}
