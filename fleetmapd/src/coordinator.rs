//! `fleetmapd coordinator`.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use fleetmap_coordinator::{
    credentials::CredentialPaths, CoordinatorConfig, Credentials, Grace, KeyStore, LiveSettings, NodeLimit,
    NodeRegistry,
};
use serde::Deserialize;
use tracing::{info, warn};

use crate::{
    settings::{self, overlay, Overlay},
    Failure, Signal, Signals,
};

const DEFAULT_CONFIG: &str = "/etc/fleetmap/coordinator.toml";

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A TOML file of these settings, keyed by the flags' names (default:
    /// /etc/fleetmap/coordinator.toml where it exists); flags win over it.
    /// SIGHUP reads it again.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: CoordinatorSettings,
}

/// The coordinator's settings: its flags, and the keys of its config file.
#[derive(clap::Args, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct CoordinatorSettings {
    /// The UDP address to serve QUIC on (default 0.0.0.0:7070).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where the CA, join token, API keys and node registry live (default:
    /// systemd's StateDirectory, else ~/.local/state/fleetmap/coordinator).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// How long node certificates are valid, in days (default 30).
    #[arg(long)]
    node_cert_days: Option<f64>,
    /// The most cores one node may offer (more are not used). Reloadable.
    #[arg(long)]
    max_node_cores: Option<u32>,
    /// The most memory one node may offer, in GiB. Reloadable.
    #[arg(long)]
    max_node_memory_gib: Option<f64>,
    /// The most GPUs one node may offer. Reloadable.
    #[arg(long)]
    max_node_gpus: Option<u32>,
    /// Hold each new node until `fleetmap nodes approve NAME` (it keeps
    /// trying meanwhile). Reloadable.
    #[arg(long)]
    #[serde(default)]
    approve_nodes: bool,
    /// How long a job whose nodes were lost waits for a node that can host
    /// its calls to join (a restarted or thawed node rejoins under its
    /// name), in seconds (default 60; 0 fails it at once). Reloadable.
    #[arg(long)]
    node_grace: Option<f64>,
    /// The longest a job waits for a client whose connection was lost (a
    /// sleeping laptop, a cut link), in seconds; each job asks for its own,
    /// up to this (default 3600; 0: jobs end with their connection).
    /// Reloadable.
    #[arg(long)]
    max_client_grace: Option<f64>,
    /// Serve operators and users over HTTP on this address: Prometheus
    /// metrics at /metrics and the dashboard at / (its API needs an API
    /// key). Default: not served.
    #[arg(long, value_name = "HOST:PORT")]
    http_listen: Option<SocketAddr>,
    /// The most outputs one detached job may leave, in GiB, kept in the
    /// state directory until its owner fetches them (default 10).
    #[arg(long)]
    max_results_gib: Option<f64>,
}

overlay!(CoordinatorSettings {
    value: listen, state_dir, node_cert_days, max_node_cores, max_node_memory_gib, max_node_gpus, node_grace,
        max_client_grace, http_listen, max_results_gib;
    switch: approve_nodes;
    list: ;
});

impl CoordinatorSettings {
    fn listen(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| "0.0.0.0:7070".parse().expect("a valid address"))
    }

    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| settings::default_state_dir("coordinator"))
    }

    fn live(&self) -> Result<LiveSettings, Failure> {
        let memory_bytes = self
            .max_node_memory_gib
            .map(|gib| settings::gib_to_bytes(gib, "max-node-memory-gib"))
            .transpose()?;
        let seconds = |value: Option<f64>, default: Duration, what: &str| match value {
            None => Ok(default),
            Some(s) if (0.0..=7.0 * 86400.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
            Some(s) => Err(Failure::usage(format!(
                "{what} must be from 0 to 604800 seconds, not {s}"
            ))),
        };
        Ok(LiveSettings {
            node_limit: NodeLimit {
                cores: self.max_node_cores,
                memory_bytes,
                gpus: self.max_node_gpus,
            },
            approve_nodes: self.approve_nodes,
            grace: Grace {
                node: seconds(self.node_grace, Grace::FLEET.node, "node-grace")?,
                max_client: seconds(self.max_client_grace, Grace::FLEET.max_client, "max-client-grace")?,
            },
        })
    }

    fn node_cert_validity(&self) -> Result<Duration, Failure> {
        let days = self.node_cert_days.unwrap_or(30.0);
        if !(days > 0.0 && days <= 3650.0) {
            return Err(Failure::usage(format!(
                "node certificates must be valid between a moment and ten years, not {days} days"
            )));
        }
        Ok(Duration::from_secs_f64(days * 86400.0))
    }
}

/// The flags over the config file (read again on each reload).
fn load(args: &Args) -> Result<CoordinatorSettings, Failure> {
    let file = settings::config_file(args.config.as_deref(), DEFAULT_CONFIG);
    let mut merged = args.settings.clone();
    merged.overlay(settings::read(file.as_deref())?);
    Ok(merged)
}

pub(crate) async fn run(args: Args) -> Result<(), Failure> {
    let mut signals = Signals::install()?;
    let mut current = load(&args)?;
    let listen = current.listen();
    let state_dir = current.state_dir();
    let credentials = Credentials::load_or_create(&state_dir).map_err(|e| Failure::usage(e.to_string()))?;
    let paths = CredentialPaths::in_dir(&state_dir);
    let keys = KeyStore::open(&state_dir, &credentials.api_key).map_err(|e| Failure::usage(e.to_string()))?;
    let mut config = CoordinatorConfig::new(listen, credentials);
    config.keys = Arc::new(keys);
    config.nodes = Arc::new(NodeRegistry::open(&state_dir));
    config.node_cert_validity = current.node_cert_validity()?;
    let live = current.live()?;
    config.node_limit = live.node_limit;
    config.approve_nodes = live.approve_nodes;
    config.grace = live.grace;
    config.http = current.http_listen;
    let max_results = settings::gib_to_bytes(current.max_results_gib.unwrap_or(10.0), "max-results-gib")?;
    config.results = Some((state_dir.join("results"), max_results));
    let running = fleetmap_coordinator::serve(config)
        .await
        .map_err(|e| Failure::usage(format!("cannot listen on {listen}: {e}")))?;
    let port = running.local_addr.port();
    println!(
        "fleetmap coordinator listening on {} (QUIC, TLS 1.3)",
        running.local_addr
    );
    println!("  CA certificate: {}", paths.ca.display());
    println!("  join token:     {}", paths.join_token.display());
    println!("  API key:        {}", paths.api_key.display());
    if let Some(addr) = running.http_addr {
        println!("  metrics:        http://{addr}/metrics");
        println!("  dashboard:      http://{addr}/ (with an API key)");
    }
    println!("start a node:");
    println!(
        "  fleetmapd node --coordinator HOST:{port} --token-file {} --ca {}",
        paths.join_token.display(),
        paths.ca.display()
    );
    loop {
        match signals.next().await {
            Signal::Stop => break,
            Signal::Reload => match load(&args).and_then(|new| Ok((new.live()?, new))) {
                Ok((live, new)) => {
                    running.apply(live);
                    if (new.listen(), new.state_dir(), new.node_cert_days, new.http_listen)
                        != (
                            current.listen(),
                            current.state_dir(),
                            current.node_cert_days,
                            current.http_listen,
                        )
                    {
                        warn!(
                            "reload: listen, state-dir, node-cert-days and http-listen take effect at the next start \
                             only"
                        );
                    }
                    info!("reload: {live:?}; API keys are read again whenever their file changes");
                    current = new;
                }
                Err(e) => {
                    warn!("reload: {}; the settings in effect stay", e.text());
                }
            },
        }
    }
    info!("coordinator stopping");
    running.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{Args as _, FromArgMatches};

    use super::*;

    fn parse(argv: &[&str]) -> Args {
        let command = Args::augment_args(clap::Command::new("coordinator"));
        Args::from_arg_matches(&command.try_get_matches_from(argv).unwrap()).unwrap()
    }

    #[test]
    fn the_example_config_sets_every_flag() {
        crate::settings::tests::example_matches_flags::<CoordinatorSettings>(
            Args::augment_args(clap::Command::new("coordinator")),
            "coordinator.toml",
        );
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_fills_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9\"\nmax-node-cores = 4\napprove-nodes = true\n",
        )
        .unwrap();
        let args = parse(&["c", "--config", file.to_str().unwrap(), "--max-node-cores", "8"]);
        let merged = load(&args).unwrap();
        assert_eq!(merged.listen(), "127.0.0.1:9".parse().unwrap());
        assert_eq!(merged.max_node_cores, Some(8));
        assert!(merged.approve_nodes);
        let live = merged.live().unwrap();
        assert_eq!(live.node_limit.cores, Some(8));
        assert!(live.approve_nodes);
    }

    #[test]
    fn a_file_with_an_unknown_key_or_a_bad_value_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "max-node-core = 4\n").unwrap();
        let Err(Failure::Usage(text)) = load(&parse(&["c", "--config", file.to_str().unwrap()])) else {
            panic!("an unknown key was accepted");
        };
        assert!(text.contains("max-node-core") && text.contains("c.toml"), "{text}");
        std::fs::write(&file, "node-cert-days = 0\n").unwrap();
        let merged = load(&parse(&["c", "--config", file.to_str().unwrap()])).unwrap();
        assert!(matches!(merged.node_cert_validity(), Err(Failure::Usage(t)) if t.contains("0 days")));
    }
}
