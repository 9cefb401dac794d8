//! Cross-crate integration tests: the real coordinator, node daemon and
//! client over real QUIC with TLS on loopback. Python workers are covered by
//! the pytest suite (`python/tests`); here the node side is either the real
//! daemon or a peer that speaks the real protocol. The coordinator, the raw
//! peers and the echo nodes they use come from `fleetmap-testkit`, which the
//! fleet emulator shares.

mod dependencies;
mod hostile_peers;
mod local_links;
mod node_identity;
mod protocol_peers;
