//! `pgwarden-controller`: runs the controller (default), or prints the CRD (`crd`).
//!
//! Exit codes: 0 clean stop (SIGTERM/SIGINT), 1 a failure at run time (no API server, lost
//! the controller Lease: the Deployment restarts us as a candidate), 2 invalid arguments.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use pgwarden_controller::crd::PostgresCluster;
use pgwarden_controller::leader::{ElectionConfig, Elector};
use pgwarden_controller::reconcile;
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(name = "pgwarden-controller", version, about)]
// `pgwarden-controller --watch-namespace x` and `pgwarden-controller run --watch-namespace x`
// both work; flags before a subcommand would be ambiguous.
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the PostgresCluster CustomResourceDefinition as YAML (what deploy/crd.yaml holds).
    Crd,
    /// Run the controller (the default).
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Namespace of the controller's own Lease (the Deployment sets it from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the controller's Lease.
    #[arg(long, default_value = "pgwarden-controller")]
    lease_name: String,
    /// This replica's identity in the Lease (default: the Pod name, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds another replica waits before taking over from a silent leader.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=600))]
    lease_duration: u64,
    /// Log as JSON lines.
    #[arg(long, env = "PGWARDEN_LOG_JSON")]
    log_json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd) => match serde_yaml::to_string(&PostgresCluster::crd()) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pgwarden-controller: cannot render the CRD: {e}");
                ExitCode::from(1)
            }
        },
        Some(Command::Run(args)) => run_main(args),
        None => run_main(cli.run),
    }
}

fn run_main(args: RunArgs) -> ExitCode {
    init_logging(args.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgwarden-controller: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(args))
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(args: RunArgs) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "cannot configure the Kubernetes client");
            return ExitCode::from(1);
        }
    };
    let identity = args.identity.clone().unwrap_or_else(|| {
        nix_hostname().unwrap_or_else(|| format!("pgwarden-controller-{}", std::process::id()))
    });
    let config = ElectionConfig {
        namespace: args.lease_namespace.clone(),
        lease_name: args.lease_name.clone(),
        identity: identity.clone(),
        lease_duration: Duration::from_secs(args.lease_duration),
        retry_period: Duration::from_secs((args.lease_duration / 3).max(1)),
    };
    let (elector, mut is_leader) = Elector::new(client.clone(), config);
    let releaser = elector.releaser();
    let mut election = tokio::spawn(elector.run());
    info!(identity = %identity, "waiting to become the active controller");
    loop {
        if *is_leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = is_leader.changed() => if changed.is_err() { return ExitCode::from(1) },
            _ = shutdown_signal() => return ExitCode::SUCCESS,
        }
    }
    tokio::select! {
        () = reconcile::run(client, args.watch_namespace) => {
            // Stopped by SIGTERM/SIGINT: nothing acts any more; stop renewing and hand the
            // lease over at once.
            election.abort();
            let _ = (&mut election).await;
            match tokio::time::timeout(Duration::from_secs(5), releaser.release()).await {
                Ok(Ok(true)) => info!("released the controller lease"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!(error = %e, "could not release the controller lease; another replica takes over when it expires"),
                Err(_) => warn!("no answer releasing the controller lease; another replica takes over when it expires"),
            }
            info!("stopped");
            ExitCode::SUCCESS
        }
        _ = &mut election => {
            error!("lost the controller lease; exiting so that another replica takes over");
            ExitCode::from(1)
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn nix_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_flags_are_accepted_with_and_without_the_subcommand() {
        for argv in [
            &["pgwarden-controller", "run", "--watch-namespace", "db"][..],
            &["pgwarden-controller", "--watch-namespace", "db"][..],
        ] {
            let cli = Cli::try_parse_from(argv).expect("parses");
            let args = match cli.command {
                Some(Command::Run(args)) => args,
                None => cli.run,
                Some(Command::Crd) => panic!("not crd"),
            };
            assert_eq!(args.watch_namespace.as_deref(), Some("db"), "{argv:?}");
        }
        assert!(Cli::try_parse_from(["pgwarden-controller", "crd"]).is_ok());
    }
}
