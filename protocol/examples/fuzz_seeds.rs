//! Writes the fuzz targets' seed corpus (`fuzz/corpus/TARGET/`): one valid
//! stream of frames per message type, each file prefixed with the bytes
//! the target reads first (which type; where the stream is cut).
//!
//! `cargo run -p fleetmap-protocol --example fuzz_seeds -- fuzz/corpus`

use std::path::Path;

use fleetmap_protocol::{
    encode_frame,
    worker::{CrashKind, CrashedInput, FromWorker, ToWorker, WorkerSettings},
    CallRequest, ChunkId, ClientToCoordinator, CoordinatorToClient, CoordinatorToNode, EnvironmentSpec, FailureKind,
    Gpu, Hello, HelloReply, InputChunk, InputIndex, JobId, JobSpec, LogLine, NodeIsolation, NodeStatus,
    NodeToCoordinator, OutputChunk, OutputStream, RequestId, Resources, Resumable, Role, RuntimeSpec, SlotId,
    SourceBundle, DEFAULT_MAX_MESSAGE,
};
use serde::Serialize;

fn stream<T: Serialize>(messages: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        encode_frame(m, DEFAULT_MAX_MESSAGE, &mut out).expect("a seed encodes");
    }
    out
}

fn write(dir: &Path, target: &str, name: &str, which: u8, body: Vec<u8>) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    // Cut into pieces of 7 bytes: frames arrive split across reads.
    let mut bytes = vec![which, 7];
    bytes.extend(body);
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn chunk() -> InputChunk {
    InputChunk {
        chunk: ChunkId(3),
        first_input: InputIndex(30),
        count: 10,
        payload: b"\x80\x05inputs".to_vec(),
    }
}

fn spec() -> JobSpec {
    JobSpec {
        principal: "alice".into(),
        job_key: "fmjob_00112233".into(),
        parent: Some(JobId(0)),
        call: CallRequest {
            cores: 2,
            memory_bytes: 1 << 30,
            gpus: 1,
            require_isolation: true,
        },
        parallelism: Some(8),
        total_inputs: Some(100),
        name: "job".into(),
        runtime: RuntimeSpec::Python {
            executable: "/usr/bin/python3".into(),
            version: "3.11".into(),
            function: b"\x80\x05function".to_vec(),
            environment: Some(EnvironmentSpec {
                id: "0123456789abcdef0123456789abcdef".into(),
                requirements: vec!["numpy==2.3.1".into()],
                resolve: true,
            }),
            sources: Some(SourceBundle {
                digest: "ab".repeat(32),
                zip: b"PK\x05\x06".to_vec(),
            }),
            image: Some("registry.example/python:3.11".into()),
        },
    }
}

fn output() -> OutputChunk {
    OutputChunk {
        chunk: ChunkId(3),
        first_input: InputIndex(30),
        count: 10,
        failed: 1,
        node: "gpu-03".into(),
        payload: b"\x80\x05outputs".to_vec(),
    }
}

fn line() -> LogLine {
    LogLine {
        job: JobId(1),
        stream: OutputStream::Stderr,
        node: "gpu-03".into(),
        text: "epoch 1: loss 0.25".into(),
    }
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: fuzz_seeds CORPUS_DIR");
    let dir = Path::new(&dir);
    let (job, slot) = (JobId(1), SlotId(2));
    write(
        dir,
        "frames",
        "client-to-coordinator",
        0,
        stream(&[
            ClientToCoordinator::SubmitJob {
                request: RequestId(0),
                spec: Box::new(spec()),
                first: None,
                only: false,
                resumable: Resumable {
                    token: "0123456789abcdef0123456789abcdef".into(),
                    grace_ms: 60_000,
                    resumes: Some((JobId(3), 17)),
                    detached: true,
                },
            },
            ClientToCoordinator::SubmitJob {
                request: RequestId(2),
                spec: Box::new(spec()),
                first: Some(InputChunk {
                    chunk: ChunkId(0),
                    first_input: InputIndex(0),
                    count: 1,
                    payload: vec![0x80, 5, 0x4b, 7, 0x2e],
                }),
                only: true,
                resumable: Resumable::default(),
            },
            ClientToCoordinator::Inputs { job, chunk: chunk() },
            ClientToCoordinator::InputsDone { job, chunks: 4 },
            ClientToCoordinator::CancelJob { job },
            ClientToCoordinator::StatusRequest { request: RequestId(1) },
            ClientToCoordinator::FetchResults {
                request: RequestId(3),
                job,
                offset: 4096,
            },
        ]),
    );
    let gpu = Gpu {
        minor: 0,
        uuid: "GPU-0000".into(),
        numa_node: Some(1),
    };
    let resources = Resources {
        cores: 64,
        memory_bytes: 512 << 30,
        gpus: vec![gpu],
    };
    write(
        dir,
        "frames",
        "coordinator-to-client",
        1,
        stream(&[
            CoordinatorToClient::Status {
                request: RequestId(1),
                nodes: vec![NodeStatus {
                    name: "gpu-03".into(),
                    resources: resources.clone(),
                    free_cores: 3,
                    free_memory_bytes: 1 << 30,
                    free_gpus: 1,
                    isolation: "pinned: cgroup v2".into(),
                }],
                jobs: 2,
            },
            CoordinatorToClient::JobAccepted {
                request: RequestId(0),
                job,
                slots: 4,
                nodes: 2,
                credit: 15,
            },
            CoordinatorToClient::JobRejected {
                request: RequestId(0),
                reason: "no node".into(),
            },
            CoordinatorToClient::Credit { job, chunks: 3 },
            CoordinatorToClient::Output { job, output: output() },
            CoordinatorToClient::Log(line()),
            CoordinatorToClient::JobFinished { job },
            CoordinatorToClient::JobFailed {
                job,
                kind: FailureKind::Image,
                reason: "pull failed".into(),
            },
            CoordinatorToClient::Results {
                request: RequestId(3),
                outputs: vec![output()],
                next: Some(8192),
            },
            CoordinatorToClient::NoResults {
                request: RequestId(4),
                reason: "no such job".into(),
            },
        ]),
    );
    write(
        dir,
        "frames",
        "node-to-coordinator",
        2,
        stream(&[
            NodeToCoordinator::ChunkDone {
                job,
                slot,
                output: output(),
            },
            NodeToCoordinator::SlotFailed {
                job,
                slot,
                kind: FailureKind::Environment,
                reason: "uv failed".into(),
            },
            NodeToCoordinator::Log(line()),
        ]),
    );
    write(
        dir,
        "frames",
        "coordinator-to-node",
        3,
        stream(&[
            CoordinatorToNode::StartSlots {
                job,
                spec: Box::new(spec()),
                slots: vec![slot, SlotId(3)],
            },
            CoordinatorToNode::RunChunk {
                job,
                slot,
                chunk: chunk(),
            },
            CoordinatorToNode::StopSlot { job, slot },
            CoordinatorToNode::StopJob { job, finished: true },
            CoordinatorToNode::Certificate {
                pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
            },
        ]),
    );
    let hello = |role| Hello {
        role,
        software_version: "0.1.0".into(),
    };
    write(
        dir,
        "handshake",
        "hello-node",
        0,
        stream(&[hello(Role::Node {
            token: "fmjoin_0011".into(),
            public_key: [4u8; 65].to_vec(),
            name: "gpu-03".into(),
            resources,
            isolation: NodeIsolation {
                pinned: true,
                description: "pinned: cgroup v2".into(),
            },
        })]),
    );
    write(
        dir,
        "handshake",
        "hello-client",
        0,
        stream(&[hello(Role::Client {
            api_key: "fmkey_0011".into(),
        })]),
    );
    write(
        dir,
        "handshake",
        "reply",
        1,
        stream(&[
            HelloReply::Welcome {
                coordinator_version: "0.1.0".into(),
                node_certificate: Some("-----BEGIN CERTIFICATE-----".into()),
            },
            HelloReply::Refused {
                reason: "wrong token".into(),
            },
        ]),
    );
    write(
        dir,
        "worker",
        "from-worker",
        0,
        stream(&[
            FromWorker::Ready { pid: 42 },
            FromWorker::LoadFailed {
                error: "ModuleNotFoundError".into(),
            },
            FromWorker::Started { input: InputIndex(31) },
            FromWorker::Done {
                chunk: ChunkId(3),
                failed: 0,
                payload: b"\x80\x05outputs".to_vec(),
            },
        ]),
    );
    write(
        dir,
        "worker",
        "to-worker",
        1,
        stream(&[
            ToWorker::Load {
                function: b"\x80\x05function".to_vec(),
                settings: WorkerSettings {
                    node: "gpu-03".into(),
                    caller_python: "3.11".into(),
                    memory_limit_bytes: 1 << 30,
                    max_output_bytes: 1 << 29,
                    environment: vec![("CUDA_VISIBLE_DEVICES".into(), "0".into())],
                    sources: Some("/var/cache/fleetmap/sources/ab.zip".into()),
                },
            },
            ToWorker::Run {
                chunk: chunk(),
                isolated: true,
                crashed: vec![CrashedInput {
                    input: InputIndex(32),
                    kind: CrashKind::OutOfMemory,
                    message: "over 1 GiB".into(),
                }],
            },
        ]),
    );
}
