//! The embedded cluster: a coordinator and one node daemon sized to this
//! machine, in this process, on loopback, with fresh credentials. It is what
//! `remote_parallel_map` uses when no fleet is configured, and what
//! `fleetmap up` serves to other processes.

use std::{net::SocketAddr, time::Duration};

use fleetmap_coordinator::{serve, CoordinatorConfig, Credentials, RunningCoordinator};
use fleetmap_node_daemon::{Isolation, NodeConfig};
use tokio::{sync::watch, task::JoinHandle};

/// The prefix of an embedded cluster's cgroup subtree, followed by its
/// process id.
const SUBTREE_PREFIX: &str = "fleetmap-local-";
const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// A running embedded cluster.
pub struct LocalCluster {
    /// Where clients connect (`127.0.0.1:PORT`).
    pub addr: String,
    /// Where clients in this process connect, over a local link.
    local: fleetmap_net::LocalDialer,
    pub credentials: Credentials,
    coordinator: Option<RunningCoordinator>,
    node: JoinHandle<()>,
    stop_node: watch::Sender<bool>,
}

/// Why the embedded cluster could not start.
#[derive(Debug, thiserror::Error)]
#[error("could not start the local fleetmap cluster: {0}")]
pub struct LocalClusterError(String);

impl LocalCluster {
    /// Starts the coordinator on `listen` (port 0 picks a free one) and a
    /// node daemon whose default interpreter is `python`, and waits until the
    /// node has joined. `runtime` and `uv` are for jobs with `packages=`:
    /// fleetmap's package directories, put on their environments' path, and
    /// the installer (`None`: found beside `python` or on `PATH`).
    pub async fn start(
        listen: SocketAddr,
        python: String,
        runtime: Vec<std::path::PathBuf>,
        uv: Option<std::path::PathBuf>,
    ) -> Result<Self, LocalClusterError> {
        let err = |e: &dyn std::fmt::Display| LocalClusterError(e.to_string());
        let credentials = Credentials::generate().map_err(|e| err(&e))?;
        let mut coordinator = CoordinatorConfig::new(listen, credentials.clone());
        // Coordinator, node and client share this process: none of them can
        // come back without the others, so nothing waits for one to.
        coordinator.grace = Default::default();
        let coordinator = serve(coordinator).await.map_err(|e| err(&e))?;
        let addr = coordinator.local_addr.to_string();
        let mut config = NodeConfig::new(
            addr.clone(),
            credentials.ca_pem.clone().into_bytes(),
            credentials.join_token.clone(),
        );
        config.name = format!("{}-local", config.name);
        // The node shares the coordinator's process: it joins over a local
        // link, without QUIC and TLS on every frame.
        let local = coordinator.local_dialer();
        config.local_coordinator = Some(local.clone());
        config.python = python;
        config.environments.runtime = runtime;
        config.environments.uv = uv;
        // The caller's own machine: calls share its /tmp and its
        // environment variables, as local code would.
        config.private_tmp = false;
        config.own_namespaces = false;
        config.inherit_environment = true;
        config.fleet_access = false;
        // Every process's embedded cluster owns its own cgroup subtree, so
        // that one never cleans up another's slots.
        config.isolation = match fleetmap_node_daemon::enclosing_slot() {
            // A call that runs remote_parallel_map itself: its workers stay
            // in the call's own slot (they inherit its cgroup), within its
            // cores, memory and devices, and die with it. A subtree of their
            // own would put them outside the slot's limits and beyond its
            // teardown.
            Some(slot) => {
                tracing::info!("inside the slot {slot}: the nested cluster's workers share it");
                Isolation::None
            }
            None => {
                // Subtrees of embedded clusters whose process was killed
                // before it could remove its own.
                for stale in fleetmap_node_daemon::remove_stale_subtrees(CGROUP_MOUNT.as_ref(), SUBTREE_PREFIX) {
                    tracing::info!("removed the cgroup subtree {stale} of a process that is gone");
                }
                Isolation::Cgroups {
                    mount: CGROUP_MOUNT.into(),
                    subtree: Some(format!("{SUBTREE_PREFIX}{}", std::process::id())),
                    // A laptop without root: calls still run, pinned to
                    // cores, as the caller's own code would.
                    allow_unisolated: true,
                }
            }
        };
        let (stop_node, stopped) = watch::channel(false);
        let node = tokio::spawn(async move {
            if let Err(e) = fleetmap_node_daemon::run_until(config, stopped).await {
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
            local,
            credentials,
            coordinator: Some(coordinator),
            node,
            stop_node,
        })
    }

    /// Where a client in this process connects to this cluster over a
    /// local link ([`crate::Client::connect_local`]): the same session as
    /// over QUIC, without encrypting and sending every frame through
    /// loopback.
    pub fn local_dialer(&self) -> fleetmap_net::LocalDialer {
        self.local.clone()
    }

    /// Stops the node (killing its workers and removing its cgroups) and
    /// the coordinator.
    pub async fn stop(mut self) {
        let _ = self.stop_node.send(true);
        if tokio::time::timeout(Duration::from_secs(10), &mut self.node)
            .await
            .is_err()
        {
            tracing::warn!("the local node daemon did not stop within 10 s; its workers are killed");
            self.node.abort();
        }
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
