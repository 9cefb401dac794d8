//! fleetmap's benchmark harness: what fleet operators run to measure their
//! fleet, and what the project uses to compare itself with its peers.
//!
//! - `throughput.py`: no-op calls per second through the embedded cluster,
//!   against `multiprocessing.Pool.map` in the same run.
//! - `codec` (`cargo run --release -p fleetmap-benches --bin codec`): frames
//!   per second and bytes per second through the wire codec.
//! - `fleet_emulator` (`cargo run --release -p fleetmap-benches --bin
//!   fleet_emulator -- --help`): a real coordinator fed by N emulated nodes
//!   (`fleetmap_testkit::EchoNode`) of M slots over real QUIC: placement
//!   time, dispatch throughput, coordinator CPU per input, memory; `--json`
//!   prints one object per job.
//!
//! Benchmarks report ratios against baselines measured in the same run;
//! nothing here is a pass/fail test.
