//! The embedded cluster: a coordinator and one node daemon sized to this
//! machine, in this process, on loopback, with fresh credentials. It is what
//! `remote_parallel_map` uses when no fleet is configured, and what
//! `fleetmap up` serves to other processes.

use std::{net::SocketAddr, time::Duration};

use fleetmap_coordinator::{serve, CoordinatorConfig, Credentials, RunningCoordinator};
use fleetmap_node_daemon::{Isolation, NodeConfig};
use tokio::task::JoinHandle;

/// A running embedded cluster.
pub struct LocalCluster {
    /// Where clients connect (`127.0.0.1:PORT`).
    pub addr: String,
    pub credentials: Credentials,
    coordinator: Option<RunningCoordinator>,
    node: JoinHandle<()>,
}

/// Why the embedded cluster could not start.
#[derive(Debug, thiserror::Error)]
#[error("could not start the local fleetmap cluster: {0}")]
pub struct LocalClusterError(String);

impl LocalCluster {
    /// Starts the coordinator on `listen` (port 0 picks a free one) and a
    /// node daemon whose default interpreter is `python`, and waits until the
    /// node has joined.
    pub async fn start(listen: SocketAddr, python: String) -> Result<Self, LocalClusterError> {
        let err = |e: &dyn std::fmt::Display| LocalClusterError(e.to_string());
        let credentials = Credentials::generate().map_err(|e| err(&e))?;
        let coordinator = serve(CoordinatorConfig::new(listen, credentials.clone()))
            .await
            .map_err(|e| err(&e))?;
        let addr = coordinator.local_addr.to_string();
        let mut config = NodeConfig::new(
            addr.clone(),
            credentials.ca_pem.clone().into_bytes(),
            credentials.join_token.clone(),
        );
        config.name = format!("{}-local", config.name);
        config.python = python;
        // The caller's own machine: calls share its /tmp, as local code would.
        config.private_tmp = false;
        // Every process's embedded cluster owns its own cgroup subtree, so
        // that one never cleans up another's slots.
        config.isolation = Isolation::Cgroups {
            mount: "/sys/fs/cgroup".into(),
            subtree: Some(format!("fleetmap-local-{}", std::process::id())),
        };
        let node = tokio::spawn(async move {
            if let Err(e) = fleetmap_node_daemon::run(config).await {
                tracing::error!("local node daemon stopped: {e}");
            }
        });
        if !coordinator.wait_for_nodes(1, Duration::from_secs(20)).await {
            node.abort();
            return Err(LocalClusterError(
                "the local node daemon did not join within 20 s".into(),
            ));
        }
        Ok(Self {
            addr,
            credentials,
            coordinator: Some(coordinator),
            node,
        })
    }

    /// Stops the node (killing its workers) and the coordinator.
    pub async fn stop(mut self) {
        self.node.abort();
        if let Some(c) = self.coordinator.take() {
            c.shutdown().await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.node.abort();
    }
}
