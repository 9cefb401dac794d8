//! A real coordinator on loopback, and what a peer needs to reach it.

use std::net::SocketAddr;

use fleetmap_client::{Client, ClientError};
use fleetmap_coordinator::{serve, CoordinatorConfig, Credentials, RunningCoordinator};

/// Where a coordinator listens and the secrets that admit peers to it: all a
/// node or a client needs, whether the coordinator runs in this process or
/// elsewhere (the emulator's `--coordinator`).
#[derive(Clone)]
pub struct CoordinatorAccess {
    pub addr: SocketAddr,
    /// The CA that signed the coordinator's certificate, PEM.
    pub ca_pem: Vec<u8>,
    /// What a node says to join.
    pub join_token: String,
    /// What a client says to submit jobs.
    pub api_key: String,
}

impl std::fmt::Debug for CoordinatorAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs and assertion messages.
        f.debug_struct("CoordinatorAccess")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Starts a coordinator on `127.0.0.1` at a free port, with credentials made
/// for it alone. Its tasks run on the runtime this is called in, so a caller
/// that wants the coordinator on threads of its own calls this from there
/// (`runtime.block_on(start_coordinator())`).
pub async fn start_coordinator() -> anyhow::Result<(RunningCoordinator, CoordinatorAccess)> {
    start_coordinator_with(|_| {}).await
}

/// As [`start_coordinator`], with the configuration changed by `configure`
/// first.
pub async fn start_coordinator_with(
    configure: impl FnOnce(&mut CoordinatorConfig),
) -> anyhow::Result<(RunningCoordinator, CoordinatorAccess)> {
    let creds = Credentials::generate()?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = CoordinatorConfig::new(loopback, creds.clone());
    configure(&mut config);
    let running = serve(config).await?;
    let access = CoordinatorAccess {
        addr: running.local_addr,
        ca_pem: creds.ca_pem.into_bytes(),
        join_token: creds.join_token,
        api_key: creds.api_key,
    };
    Ok((running, access))
}

/// A client of the real client library, admitted with the API key.
pub async fn connect_client(access: &CoordinatorAccess) -> Result<Client, ClientError> {
    Client::connect(&access.addr.to_string(), &access.ca_pem, &access.api_key).await
}
