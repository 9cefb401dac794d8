//! The jobs that tests and the emulator submit.

use fleetmap_protocol::{CallRequest, JobSpec, RuntimeSpec};

/// What each call of most test jobs needs: one core, 1 GiB, no GPU. A node
/// that joins with [`node_role`](crate::node_role) has one such slot per core.
pub const ONE_CORE: CallRequest = CallRequest {
    cores: 1,
    memory_bytes: 1 << 30,
    gpus: 0,
    require_isolation: false,
};

/// A job of `inputs` inputs whose calls each need `call`. Its function is a
/// placeholder of 64 bytes: echo nodes never run it, and no real node is
/// given such a job.
pub fn job_spec(inputs: u64, call: CallRequest) -> JobSpec {
    JobSpec {
        principal: String::new(),
        job_key: String::new(),
        parent: None,
        call,
        parallelism: None,
        total_inputs: Some(inputs),
        name: "job".into(),
        runtime: RuntimeSpec::Python {
            executable: "python3".into(),
            version: "3.11".into(),
            function: vec![0; 64],
            environment: None,
            sources: None,
            image: None,
        },
    }
}
