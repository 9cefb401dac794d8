//! The dependency direction of the workspace, enforced rather than hoped
//! for: `protocol` at the bottom does no I/O; `runtime` and `sandbox` know
//! nothing of QUIC; only the Python binding links pyo3 into servers; no
//! crate that ships links the test kit.

use std::process::Command;

/// The crates `krate` depends on with `features` on, transitively (normal
/// dependencies only).
fn dependencies_of(krate: &str, features: &str) -> Vec<String> {
    let mut args = vec!["tree", "--offline", "-e", "normal", "--prefix", "none", "-p", krate];
    if !features.is_empty() {
        args.extend(["--features", features]);
    }
    let out = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Each crate is checked as the wheel builds it: the client with its
/// `local` feature (the embedded cluster), the runtime with both executors.
#[test]
fn crates_keep_their_dependency_direction() {
    let forbidden: &[(&str, &str, &[&str])] = &[
        (
            "fleetmap-protocol",
            "",
            &["tokio", "quinn", "rustls", "pyo3", "libc", "fleetmap-net"],
        ),
        ("fleetmap-net", "", &["pyo3", "fleetmap-sandbox", "fleetmap-runtime"]),
        (
            "fleetmap-sandbox",
            "",
            &["quinn", "rustls", "pyo3", "fleetmap-protocol"],
        ),
        (
            "fleetmap-runtime",
            "python,wasm",
            &["quinn", "rustls", "fleetmap-net", "fleetmap-coordinator"],
        ),
        (
            "fleetmap-coordinator",
            "",
            // Nodes pull images; the coordinator never talks to a registry.
            &["pyo3", "fleetmap-sandbox", "fleetmap-runtime", "oci-client", "reqwest"],
        ),
        (
            "fleetmap-node-daemon",
            "",
            &["pyo3", "fleetmap-runtime", "fleetmap-coordinator"],
        ),
        ("fleetmap-client", "", &["pyo3", "fleetmap-runtime", "fleetmap-sandbox"]),
        // The embedded cluster brings the servers and the sandbox, never an
        // interpreter or an executor: workers are separate processes.
        ("fleetmap-client", "local", &["pyo3", "fleetmap-runtime", "wasmtime"]),
    ];
    for (krate, features, banned) in forbidden {
        let deps = dependencies_of(krate, features);
        assert!(
            deps.iter().any(|d| d == krate),
            "cargo tree lists {krate} itself: {deps:?}"
        );
        // The test kit is for tests and benches: nothing that ships links it.
        for b in banned.iter().chain(&["fleetmap-testkit"]) {
            assert!(
                !deps.iter().any(|d| d == b),
                "{krate} (features: {features:?}) must not depend on {b}"
            );
        }
    }
}
