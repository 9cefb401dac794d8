//! `fleetmapd`: fleetmap's coordinator and node daemon as one program, for
//! running a fleet as a service (the systemd units in `packaging/` start
//! it). The coordinator needs no Python; a node needs the interpreters its
//! calls run on.
//!
//! Every setting is a flag and, with the same name, a key of the TOML file
//! given with `--config` (by default `/etc/fleetmap/coordinator.toml` or
//! `/etc/fleetmap/node.toml` where it exists); a flag wins over the file.
//! SIGTERM and SIGINT stop the daemon cleanly (a node tears every slot
//! down first); SIGHUP reloads what can change while it runs.

mod coordinator;
mod node;
mod settings;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "fleetmapd", version, about = "fleetmap's coordinator and node daemon")]
struct Cli {
    /// How logs are written to stderr: text for people, JSON lines for a
    /// log pipeline. The level comes from FLEETMAP_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a coordinator: admits nodes and clients over QUIC, places slots
    /// and dispatches inputs.
    Coordinator(Box<coordinator::Args>),
    /// Runs a node daemon that joins a coordinator and runs calls in slots
    /// of its own (cgroups, dedicated cores, a memory limit, its GPUs).
    Node(Box<node::Args>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = std::env::var("FLEETMAP_LOG").unwrap_or_else(|_| "info".to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A failure that ends the program: a usage or configuration error (exit
/// status 2, as for a bad flag) or a daemon that stopped on its own (1).
#[derive(Debug)]
pub(crate) enum Failure {
    Usage(String),
    Stopped(String),
}

impl Failure {
    pub(crate) fn usage(text: impl Into<String>) -> Self {
        Failure::Usage(text.into())
    }

    pub(crate) fn text(self) -> String {
        match self {
            Failure::Usage(text) | Failure::Stopped(text) => text,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fleetmapd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (name, result) = match cli.command {
        Command::Coordinator(args) => ("coordinator", runtime.block_on(coordinator::run(*args))),
        Command::Node(args) => ("node", runtime.block_on(node::run(*args))),
    };
    // A node's slots are torn down by the time `run` returns; nothing the
    // runtime still holds (a blocked read of a stopped peer) must keep the
    // process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(text)) => {
            eprintln!("fleetmapd {name}: {text}");
            ExitCode::from(2)
        }
        Err(Failure::Stopped(text)) => {
            eprintln!("fleetmapd {name}: {text}");
            ExitCode::FAILURE
        }
    }
}

/// What a signal asks of a running daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Stop,
    Reload,
}

/// The process's stop (SIGTERM, SIGINT) and reload (SIGHUP) signals, as
/// they arrive.
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn install() -> Result<Self, Failure> {
        use tokio::signal::unix::{signal, SignalKind};
        let handler = |kind| {
            signal(kind).map_err(|e| Failure::Stopped(format!("cannot handle the stop and reload signals: {e}")))
        };
        Ok(Self {
            term: handler(SignalKind::terminate())?,
            int: handler(SignalKind::interrupt())?,
            hup: handler(SignalKind::hangup())?,
        })
    }

    pub(crate) async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
