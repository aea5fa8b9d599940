//! `pgwarden`: the agent (`pgwarden CONFIG`, as `patroni CONFIG`) and its tools.
//!
//! Exit codes: 0 clean stop, 1 runtime failure (refused data directory, bootstrap failure, ...),
//! 2 invalid configuration or usage.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use pgwarden::cli::CtlCommand;
use pgwarden::config::{self, LogFormat, Overrides};

#[derive(Parser, Debug)]
#[command(
    name = "pgwarden",
    version,
    about = "High availability for PostgreSQL (Patroni-compatible agent)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (Patroni's YAML schema). Optional when everything comes from
    /// PGWARDEN_*/PATRONI_* environment variables.
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
    /// Configuration file for the operator commands (`pgwarden -c FILE list`), as patronictl's
    /// `-c`; only `scope`, `namespace`, `etcd3` and `restapi.authentication` are needed.
    /// Before the command, as patronictl's `-c` (`query` has its own `-c/--command`).
    #[arg(short = 'c', long = "config-file")]
    ctl_config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Ctl(CtlCommand),
    /// Check a configuration file without starting anything.
    ValidateConfig {
        config: PathBuf,
        #[command(flatten)]
        flags: Box<Flags>,
    },
    /// Upgrade this member's stopped data directory to a later PostgreSQL major version with
    /// `pg_upgrade --link` (docs/upgrade.md). Takes the agent's configuration; the agent must
    /// not run. The old directory is kept as `<data_dir>.pre-upgrade-<version>`; afterwards
    /// set `postgresql.bin_dir` to the new binaries. Exit 0 upgraded, 1 refused or failed.
    UpgradeDataDir {
        config: PathBuf,
        /// Binaries of the new major version (`postgres`, `initdb`, `pg_upgrade`); default:
        /// the newest of `postgresql.bin_dirs`.
        #[arg(long = "new-bin-dir")]
        new_bin_dir: Option<PathBuf>,
        /// Binaries of the data directory's version; default: its `postgresql.bin_dirs` entry,
        /// else `postgresql.bin_dir`.
        #[arg(long = "old-bin-dir")]
        old_bin_dir: Option<PathBuf>,
        /// Exit 0 without touching anything when there is nothing to upgrade: no data
        /// directory yet (or it was moved aside), or one already of the new binaries' version.
        /// How a container runs it before every start of the agent (the controller's
        /// major-version upgrade, docs/upgrade.md).
        #[arg(long = "if-needed")]
        if_needed: bool,
        #[command(flatten)]
        flags: Box<Flags>,
    },
    /// Exit 0 if the local agent's REST API answers `GET /liveness` with 200, else 1 (a
    /// container HEALTHCHECK without curl). Reads the same file and environment as the agent.
    Healthcheck {
        config: Option<PathBuf>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Internal: the out-of-process fence the agent starts for itself.
    #[command(hide = true)]
    FenceGuard {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Internal: run by the fence guard after the agent died and postgres was proven stopped;
    /// releases the leader record named by the token on standard input if it is still ours.
    /// Takes the agent's own arguments. Exit 0 released, 3 not ours, 1 DCS error.
    #[command(hide = true)]
    ReleaseLeader {
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: Box<Flags>,
    },
}

/// Overrides of configuration values; they win over the file and the environment.
#[derive(Args, Debug, Default, Clone)]
struct Flags {
    #[arg(long)]
    scope: Option<String>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    namespace: Option<String>,
    #[arg(long = "restapi-listen")]
    restapi_listen: Option<String>,
    #[arg(long = "restapi-connect-address")]
    restapi_connect_address: Option<String>,
    /// Comma-separated `host:port` list.
    #[arg(long = "etcd3-hosts", value_delimiter = ',')]
    etcd3_hosts: Option<Vec<String>>,
    #[arg(long = "postgresql-listen")]
    postgresql_listen: Option<String>,
    #[arg(long = "postgresql-connect-address")]
    postgresql_connect_address: Option<String>,
    #[arg(long = "data-dir")]
    data_dir: Option<PathBuf>,
    #[arg(long = "bin-dir")]
    bin_dir: Option<PathBuf>,
    /// Log lines as JSON objects.
    #[arg(long = "log-json")]
    log_json: bool,
    /// DEBUG, INFO, WARNING, ERROR or a tracing directive.
    #[arg(long = "log-level")]
    log_level: Option<String>,
}

impl Flags {
    fn overrides(&self) -> Overrides {
        Overrides {
            scope: self.scope.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            restapi_listen: self.restapi_listen.clone(),
            restapi_connect_address: self.restapi_connect_address.clone(),
            etcd3_hosts: self.etcd3_hosts.clone(),
            postgresql_listen: self.postgresql_listen.clone(),
            postgresql_connect_address: self.postgresql_connect_address.clone(),
            data_dir: self.data_dir.clone(),
            bin_dir: self.bin_dir.clone(),
            log_type: self.log_json.then_some(LogFormat::Json),
            log_level: self.log_level.clone(),
        }
    }
}

fn load(path: Option<&PathBuf>, flags: &Flags) -> Result<config::Loaded, ExitCode> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    match config::load(path.map(PathBuf::as_path), &env, &flags.overrides()) {
        Ok(loaded) => Ok(loaded),
        Err(e) => {
            eprintln!("pgwarden: invalid configuration: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Ctl(command)) => run_ctl(cli.ctl_config.or(cli.config), command),
        Some(Command::FenceGuard { args }) => {
            pgwarden::postgres::fence_guard::run_guard(args);
            ExitCode::SUCCESS
        }
        Some(Command::ReleaseLeader { config, flags }) => release_leader(config.as_ref(), &flags),
        Some(Command::Healthcheck { config, timeout }) => healthcheck(config.as_ref(), timeout),
        Some(Command::UpgradeDataDir {
            config,
            new_bin_dir,
            old_bin_dir,
            if_needed,
            flags,
        }) => upgrade_data_dir(&config, &flags, new_bin_dir, old_bin_dir, if_needed),
        Some(Command::ValidateConfig { config, flags }) => match load(Some(&config), &flags) {
            Ok(loaded) => {
                for warning in &loaded.warnings {
                    eprintln!("pgwarden: warning: {warning}");
                }
                println!("{}: configuration is valid", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        None => {
            if let Some(word) = cli.config.as_deref().and_then(unknown_command) {
                eprintln!(
                    "pgwarden: unknown command {word:?} (and no configuration file of that name); commands: {}",
                    command_names().join(", ")
                );
                return ExitCode::from(2);
            }
            let loaded = match load(cli.config.as_ref(), &cli.flags) {
                Ok(l) => l,
                Err(code) => return code,
            };
            let (log, log_warnings) =
                pgwarden::logging::LogSettings::from_config(&loaded.config.log);
            pgwarden::logging::init(log);
            for warning in loaded.warnings.iter().chain(&log_warnings) {
                tracing::warn!("{warning}");
            }
            // One thread: the agent is light, and the postmaster's parent-death signal is tied
            // to the thread that spawned it, which must live as long as the process.
            let runtime = match current_thread_runtime("pgwarden") {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            let path = cli.config.clone();
            let overrides = cli.flags.overrides();
            let reload: pgwarden::ha::ReloadFn = Box::new(move || {
                let env: BTreeMap<String, String> = std::env::vars().collect();
                config::load(path.as_deref(), &env, &overrides)
                    .map(|l| l.config)
                    .map_err(|e| e.to_string())
            });
            match runtime.block_on(pgwarden::run::run_agent(loaded.config, Some(reload))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "pgwarden: {}",
                        pgwarden::error::error_chain(&e as &dyn std::error::Error)
                    );
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// A single-threaded runtime (see `main` for why one thread), or exit code 1.
fn current_thread_runtime(who: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("{who}: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}

/// `pgwarden release-leader`: see [`Command::ReleaseLeader`].
fn release_leader(path: Option<&PathBuf>, flags: &Flags) -> ExitCode {
    let loaded = match load(path, flags) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let (log, _) = pgwarden::logging::LogSettings::from_config(&loaded.config.log);
    pgwarden::logging::init(log);
    let mut token = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut token) {
        eprintln!("pgwarden release-leader: cannot read the token: {e}");
        return ExitCode::from(2);
    }
    let runtime = match current_thread_runtime("pgwarden release-leader") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(pgwarden::run::release_dead_leader(
        &loaded.config,
        token.trim(),
    )) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(
            u8::try_from(pgwarden::postgres::crash_release::EXIT_NOT_OURS).unwrap_or(3),
        ),
        Err(e) => {
            eprintln!(
                "pgwarden release-leader: {}",
                pgwarden::error::error_chain(&e as &dyn std::error::Error)
            );
            ExitCode::from(1)
        }
    }
}

/// The positional argument read as a mistyped command rather than a configuration file: it
/// does not exist and looks like a word, not a path (no `/`, no extension).
fn unknown_command(arg: &std::path::Path) -> Option<&str> {
    let word = arg.to_str()?;
    let looks_like_word = !word.is_empty()
        && !word.contains(['/', '.'])
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    (looks_like_word && !arg.exists()).then_some(word)
}

fn command_names() -> Vec<String> {
    use clap::CommandFactory;
    Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_owned())
        .collect()
}

/// `pgwarden upgrade-data-dir`: see [`Command::UpgradeDataDir`].
fn upgrade_data_dir(
    path: &PathBuf,
    flags: &Flags,
    new_bin_dir: Option<PathBuf>,
    old_bin_dir: Option<PathBuf>,
    if_needed: bool,
) -> ExitCode {
    use pgwarden::postgres::{agent_lock::AgentLock, initdb::initdb_args, upgrade};
    let loaded = match load(Some(path), flags) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let config = loaded.config;
    let runtime = match current_thread_runtime("pgwarden upgrade-data-dir") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let data_dir = config.postgresql.data_dir.clone();
    let bin_dirs = config.postgres_bin_dirs();
    let request = upgrade::UpgradeRequest {
        data_dir: data_dir.clone(),
        old_bin_dir: old_bin_dir.unwrap_or_else(|| bin_dirs.for_data_dir(&data_dir)),
        new_bin_dir: new_bin_dir.unwrap_or_else(|| bin_dirs.newest().clone()),
        superuser: config.postgresql.authentication.superuser.username.clone(),
        initdb_args: initdb_args(&config.bootstrap.initdb),
    };
    if if_needed {
        // No PG_VERSION: no cluster here yet (the agent initializes or clones one), or a
        // replica's old data was moved aside by an earlier run.
        if let Ok(data) = upgrade::data_dir_major(&data_dir) {
            match runtime.block_on(upgrade::binaries_major(&request.new_bin_dir)) {
                Ok(new) if data >= new => {
                    println!(
                        "{}: PostgreSQL {data}, nothing to upgrade to {new}",
                        data_dir.display()
                    );
                    return ExitCode::SUCCESS;
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("pgwarden upgrade-data-dir: {e}");
                    return ExitCode::from(1);
                }
            }
        } else {
            println!(
                "{}: no data directory of a PostgreSQL version, nothing to upgrade",
                data_dir.display()
            );
            return ExitCode::SUCCESS;
        }
    }
    let result = runtime.block_on(async {
        // The agent's own lock: no agent (or fence guard) may use the directory meanwhile; a
        // fence guard finishing a crash release holds it for a few seconds.
        let lock = AgentLock::acquire(&data_dir, std::time::Duration::from_secs(10))
            .await
            .map_err(|e| pgwarden::error::error_chain(&e))?;
        let outcome = pgwarden::run::upgrade_stopped_member(&config, &request)
            .await
            .map_err(|e| pgwarden::error::error_chain(&e));
        drop(lock);
        outcome
    });
    match result {
        Ok(pgwarden::run::MemberUpgrade::Upgraded(outcome)) => {
            println!(
                "{}: upgraded from PostgreSQL {} to {} in {:.1}s; the old data directory is kept \
                 in {} (delete it once the new cluster is in service); the agent runs it on {}",
                data_dir.display(),
                outcome.from_major,
                outcome.to_major,
                outcome.duration.as_secs_f64(),
                outcome.old_kept_at.display(),
                request.new_bin_dir.display(),
            );
            ExitCode::SUCCESS
        }
        Ok(pgwarden::run::MemberUpgrade::MovedAsideForClone { from_major, kept }) => {
            println!(
                "{}: a replica's PostgreSQL {from_major} data of the cluster before its upgrade; \
                 moved aside to {} (delete it once the member streams again); the agent clones \
                 the upgraded leader at its next start",
                data_dir.display(),
                kept.display(),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgwarden upgrade-data-dir: {e}");
            ExitCode::from(1)
        }
    }
}

fn healthcheck(path: Option<&PathBuf>, timeout: u64) -> ExitCode {
    let loaded = match load(path, &Flags::default()) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let url = pgwarden::cli::healthcheck::liveness_url(&loaded.config);
    let runtime = match current_thread_runtime("pgwarden") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let timeout = std::time::Duration::from_secs(timeout);
    match runtime.block_on(pgwarden::cli::healthcheck::check(&url, timeout)) {
        Ok(()) => {
            println!("{url}: alive");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgwarden: unhealthy: {}", pgwarden::error::error_chain(&e));
            ExitCode::from(1)
        }
    }
}

fn run_ctl(path: Option<PathBuf>, command: CtlCommand) -> ExitCode {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let path = path.or_else(|| std::env::var_os("PGWARDEN_CONFIG_FILE").map(PathBuf::from));
    let config = match config::load_ctl(path.as_deref(), &env) {
        Ok(c) => c,
        // As `patronictl version` without a cluster: the CLI's own version needs no cluster.
        Err(_) if matches!(command, CtlCommand::Version { cluster: None, .. }) => {
            println!("{}", pgwarden::cli::version::cli_line());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("pgwarden: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match current_thread_runtime("pgwarden") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(pgwarden::cli::run(config, command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(pgwarden::cli::CliError::Usage(msg)) => {
            eprintln!("pgwarden: {msg}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("pgwarden: {}", pgwarden::error::error_chain(&e));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_path_and_validate_subcommand_parse() {
        let cli = Cli::try_parse_from(["pgwarden", "/etc/patroni.yml"]).expect("parses");
        assert_eq!(cli.config, Some(PathBuf::from("/etc/patroni.yml")));
        let cli = Cli::try_parse_from(["pgwarden", "validate-config", "x.yml"]).expect("parses");
        assert!(matches!(cli.command, Some(Command::ValidateConfig { .. })));
        let cli = Cli::try_parse_from(["pgwarden", "healthcheck", "/etc/pgwarden/pgwarden.yml"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Some(Command::Healthcheck { timeout: 5, .. })
        ));
        let cli = Cli::try_parse_from([
            "pgwarden", "-c", "ctl.yml", "query", "-c", "SELECT 1", "-U", "postgres",
        ])
        .expect("parses");
        assert_eq!(cli.ctl_config, Some(PathBuf::from("ctl.yml")));
        assert!(matches!(
            cli.command,
            Some(Command::Ctl(CtlCommand::Query {
                command: Some(_),
                ..
            }))
        ));
        let cli = Cli::try_parse_from(["pgwarden", "topolgy"]).expect("parses");
        assert_eq!(
            cli.config.as_deref().and_then(unknown_command),
            Some("topolgy")
        );
        assert_eq!(unknown_command(std::path::Path::new("patroni.yml")), None);
        assert_eq!(unknown_command(std::path::Path::new("/etc/patroni")), None);
        assert!(command_names().contains(&"topology".to_owned()));
        let cli =
            Cli::try_parse_from(["pgwarden", "--etcd3-hosts", "a:1,b:2", "c.yml"]).expect("parses");
        assert_eq!(
            cli.flags.etcd3_hosts,
            Some(vec!["a:1".to_owned(), "b:2".to_owned()])
        );
    }
}
