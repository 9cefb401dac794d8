//! The client binding: a connection to a coordinator, and the jobs
//! submitted on it. Requests block with the GIL released; replies and
//! events become plain Python values.

use std::sync::Arc;

use fleetmap_client::{Client, Job, JobEvent};
use fleetmap_protocol::{
    CallRequest, ChunkId, EnvironmentSpec, FailureKind, InputChunk, InputIndex, JobId, JobSpec, JobState, OutputStream,
    Resumable, RuntimeSpec, SourceBundle,
};
use pyo3::{
    prelude::*,
    types::{PyBytes, PyDict, PyList},
};

use crate::{
    errors::client_error,
    process::{runtime, seconds},
};

/// The most events one `Job.events` call returns, so that a flood of
/// outputs still lets the caller show progress between batches.
const MAX_EVENTS_PER_CALL: usize = 4096;

/// Connects to the coordinator at `addr`.
#[pyfunction]
pub(crate) fn connect(py: Python<'_>, addr: String, ca_pem: Vec<u8>, api_key: String) -> PyResult<Connection> {
    let client = py
        .detach(|| runtime().block_on(Client::connect(&addr, &ca_pem, &api_key)))
        .map_err(client_error)?;
    Ok(Connection::new(client))
}

/// A connection to a coordinator.
#[pyclass(module = "fleetmap._native", frozen)]
pub(crate) struct Connection {
    client: Arc<Client>,
}

impl Connection {
    pub(crate) fn new(client: Client) -> Self {
        Connection {
            client: Arc::new(client),
        }
    }
}

#[pymethods]
impl Connection {
    /// Submits a job of a pickled Python function. `environment`:
    /// `(id, requirements, resolve)` of the environment its calls need, or
    /// `None` for the caller's interpreter as it is.
    /// `sources`: `(sha256 hex, zip)` of the caller's local modules.
    /// `first`: `(count, payload)` of the job's first chunk (from input 0),
    /// sent with the submission; `only`: it holds all the inputs.
    /// `name`: the function's name, for listings. `resume_token` and
    /// `grace_s`: the job outlives a lost connection for `grace_s` seconds,
    /// and a submission with the same token and `resumes` (`(job id,
    /// inputs with an outcome)`) picks it up again. `detached`: the
    /// coordinator keeps the outputs (`results`) and the job runs on once
    /// all its inputs are in.
    #[pyo3(signature = (function, cores, memory_bytes, gpus, parallelism, total_inputs, executable, version, environment=None, sources=None, require_isolation=false, image=None, first=None, only=false, name=String::new(), resume_token=String::new(), grace_s=0.0, resumes=None, detached=false))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        function: Vec<u8>,
        cores: u32,
        memory_bytes: u64,
        gpus: u32,
        parallelism: Option<u32>,
        total_inputs: Option<u64>,
        executable: String,
        version: String,
        environment: Option<(String, Vec<String>, bool)>,
        sources: Option<(String, Vec<u8>)>,
        require_isolation: bool,
        image: Option<String>,
        first: Option<(u32, Vec<u8>)>,
        only: bool,
        name: String,
        resume_token: String,
        grace_s: f64,
        resumes: Option<(u64, u64)>,
        detached: bool,
    ) -> PyResult<PyJob> {
        let spec = JobSpec {
            principal: String::new(),
            job_key: String::new(),
            parent: None,
            call: CallRequest {
                cores,
                memory_bytes,
                gpus,
                require_isolation,
            },
            parallelism,
            total_inputs,
            name,
            runtime: RuntimeSpec::Python {
                executable,
                version,
                function,
                environment: environment.map(|(id, requirements, resolve)| EnvironmentSpec {
                    id,
                    requirements,
                    resolve,
                }),
                sources: sources.map(|(digest, zip)| SourceBundle { digest, zip }),
                image,
            },
        };
        let first = first.map(|(count, payload)| InputChunk {
            chunk: ChunkId(0),
            first_input: InputIndex(0),
            count,
            payload,
        });
        let resumable = Resumable {
            token: resume_token,
            grace_ms: seconds(grace_s).as_millis().min(u128::from(u64::MAX)) as u64,
            resumes: resumes.map(|(job, done)| (JobId(job), done)),
            detached,
        };
        let client = self.client.clone();
        let job = py
            .detach(|| runtime().block_on(client.submit_with_first(spec, first, only, resumable)))
            .map_err(client_error)?;
        Ok(PyJob { job })
    }

    fn close(&self) {
        self.client.close();
    }

    /// Whether the connection is a link within this process (to the
    /// embedded cluster) rather than QUIC.
    #[getter]
    fn local(&self) -> bool {
        self.client.is_local()
    }

    /// Whether the connection is gone.
    fn closed(&self) -> bool {
        self.client.is_closed()
    }

    /// A page of detached job `job`'s outputs from byte `offset`: the
    /// outputs as `(first_input, count, failed, node, payload)` in the order
    /// they finished, and where the next page starts (`None`: no more kept
    /// yet).
    #[allow(clippy::type_complexity)]
    fn results<'py>(
        &self,
        py: Python<'py>,
        job: u64,
        offset: u64,
    ) -> PyResult<(Vec<(u64, u32, u32, String, Bound<'py, PyBytes>)>, Option<u64>)> {
        let client = self.client.clone();
        let page = py
            .detach(|| runtime().block_on(client.results(JobId(job), offset)))
            .map_err(client_error)?;
        let outputs = page
            .outputs
            .into_iter()
            .map(|o| (o.first_input.0, o.count, o.failed, o.node, PyBytes::new(py, &o.payload)))
            .collect();
        Ok((outputs, page.next))
    }

    /// The fleetmap version the coordinator runs.
    #[getter]
    fn coordinator_version(&self) -> String {
        self.client.coordinator_version.clone()
    }

    /// The fleet's nodes as dicts: name, cores, memory_bytes, gpus,
    /// free_cores, free_memory_bytes, free_gpus, isolation; and the number
    /// of running jobs.
    fn status<'py>(&self, py: Python<'py>) -> PyResult<(Vec<Bound<'py, PyDict>>, u32)> {
        let client = self.client.clone();
        let status = py
            .detach(|| runtime().block_on(client.status()))
            .map_err(client_error)?;
        let mut nodes = Vec::new();
        for n in status.nodes {
            let d = PyDict::new(py);
            d.set_item("name", n.name)?;
            d.set_item("cores", n.resources.cores)?;
            d.set_item("memory_bytes", n.resources.memory_bytes)?;
            d.set_item("gpus", n.resources.gpus.iter().map(|g| g.minor).collect::<Vec<_>>())?;
            d.set_item("free_cores", n.free_cores)?;
            d.set_item("free_memory_bytes", n.free_memory_bytes)?;
            d.set_item("free_gpus", n.free_gpus)?;
            d.set_item("isolation", n.isolation)?;
            nodes.push(d);
        }
        Ok((nodes, status.jobs))
    }

    /// The running jobs of this connection's principal, as dicts: job,
    /// principal, slots, nodes, inputs_done, total_inputs (or None), cores,
    /// memory_bytes, gpus.
    fn jobs<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let client = self.client.clone();
        let jobs = py.detach(|| runtime().block_on(client.jobs())).map_err(client_error)?;
        let mut out = Vec::new();
        for j in jobs {
            let d = PyDict::new(py);
            d.set_item("job", j.job.0)?;
            d.set_item("principal", j.principal)?;
            d.set_item("name", j.name)?;
            let (state, detail) = match j.state {
                JobState::Running => ("running", None),
                JobState::Finished => ("finished", None),
                JobState::Failed(why) => ("failed", Some(why)),
                JobState::Cancelled(why) => ("cancelled", Some(why)),
                JobState::Waiting(why) => ("waiting", Some(why)),
            };
            d.set_item("state", state)?;
            d.set_item("state_detail", detail)?;
            d.set_item("started", j.started)?;
            d.set_item("ended", j.ended)?;
            d.set_item("slots", j.slots)?;
            d.set_item("nodes", j.nodes)?;
            d.set_item("inputs_done", j.inputs_done)?;
            d.set_item("total_inputs", j.total_inputs)?;
            d.set_item("inputs_failed", j.inputs_failed)?;
            d.set_item("cores", j.call.cores)?;
            d.set_item("memory_bytes", j.call.memory_bytes)?;
            d.set_item("gpus", j.call.gpus)?;
            let per_node = PyList::empty(py);
            for n in j.per_node {
                let nd = PyDict::new(py);
                nd.set_item("node", n.node)?;
                nd.set_item("slots", n.slots)?;
                nd.set_item("inputs_done", n.inputs_done)?;
                nd.set_item("inputs_failed", n.inputs_failed)?;
                per_node.append(nd)?;
            }
            d.set_item("per_node", per_node)?;
            d.set_item("failures", j.failures)?;
            out.push(d);
        }
        Ok(out)
    }

    /// Cancels job `job` if it belongs to this connection's principal.
    fn cancel(&self, job: u64) {
        self.client.cancel(fleetmap_protocol::JobId(job));
    }
}

/// A running job.
#[pyclass(name = "Job", module = "fleetmap._native")]
pub(crate) struct PyJob {
    job: Job,
}

#[pymethods]
impl PyJob {
    #[getter]
    fn id(&self) -> u64 {
        self.job.id.0
    }

    #[getter]
    fn slots(&self) -> u32 {
        self.job.slots
    }

    #[getter]
    fn nodes(&self) -> u32 {
        self.job.nodes
    }

    #[getter]
    fn credit(&self) -> u32 {
        self.job.initial_credit
    }

    fn send_chunk(&self, chunk: u64, first_input: u64, count: u32, payload: Vec<u8>) {
        self.job.send_chunk(InputChunk {
            chunk: ChunkId(chunk),
            first_input: InputIndex(first_input),
            count,
            payload,
        });
    }

    fn inputs_done(&self, chunks: u64) {
        self.job.inputs_done(chunks);
    }

    fn cancel(&self) {
        self.job.cancel();
    }

    /// The events that arrive within `timeout` seconds (at least one unless
    /// the time runs out), as tuples:
    /// `("output", first_input, count, failed, node, payload)`,
    /// `("log", stream, node, text)`, `("credit", n)`, `("finished",)`,
    /// `("failed", reason, kind)` with kind `"job"` or `"environment"`.
    fn events(&mut self, py: Python<'_>, timeout: f64) -> PyResult<Vec<Py<PyAny>>> {
        let job = &mut self.job;
        let wait = seconds(timeout);
        let first = py.detach(|| runtime().block_on(async { tokio::time::timeout(wait, job.next_event()).await }));
        let mut events = Vec::new();
        match first {
            Err(_) => return Ok(events),
            Ok(None) => {
                let reason = "lost the connection to the coordinator";
                events.push(("failed", reason, "job").into_pyobject(py)?.into_any().unbind());
                return Ok(events);
            }
            Ok(Some(e)) => events.push(event_to_py(py, e)?),
        }
        while events.len() < MAX_EVENTS_PER_CALL {
            match self.job.try_next_event() {
                Some(e) => events.push(event_to_py(py, e)?),
                None => break,
            }
        }
        Ok(events)
    }
}

fn event_to_py(py: Python<'_>, event: JobEvent) -> PyResult<Py<PyAny>> {
    let obj = match event {
        JobEvent::Output(o) => (
            "output",
            o.first_input.0,
            o.count,
            o.failed,
            o.node,
            PyBytes::new(py, &o.payload),
        )
            .into_pyobject(py)?
            .into_any(),
        JobEvent::Log(line) => {
            let stream = match line.stream {
                OutputStream::Stdout => "stdout",
                OutputStream::Stderr => "stderr",
            };
            ("log", stream, line.node, line.text).into_pyobject(py)?.into_any()
        }
        JobEvent::Credit(n) => ("credit", n).into_pyobject(py)?.into_any(),
        JobEvent::Finished => ("finished",).into_pyobject(py)?.into_any(),
        JobEvent::Failed(kind, reason) => {
            let kind = match kind {
                FailureKind::Job => "job",
                FailureKind::Environment => "environment",
                FailureKind::Image => "image",
                FailureKind::Cancelled => "cancelled",
            };
            ("failed", reason, kind).into_pyobject(py)?.into_any()
        }
        JobEvent::Disconnected(reason) => ("disconnected", reason).into_pyobject(py)?.into_any(),
    };
    Ok(obj.unbind())
}
