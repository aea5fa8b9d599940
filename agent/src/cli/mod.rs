//! The operator's CLI, `pgwarden <command>`, like `patronictl`: reads the cluster from the DCS
//! (etcd, or the Kubernetes API with the kubeconfig when the configuration has a `kubernetes`
//! section) and acts through the members' REST APIs (or the DCS where Patroni's tool does too).

pub mod backup;
pub mod flush;
pub mod healthcheck;
pub mod list;
pub mod query;
pub mod remove;
pub mod restart;
pub mod version;

pub use query::{CtlRole, QueryFormat};

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::Config;
use crate::dcs::etcd::{EtcdDcs, EtcdSettings};
use crate::dcs::kubernetes::{KubeDcs, KubeSettings};
use crate::dcs::{ClusterView, Dcs};

/// Output format of read commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Pretty,
    Json,
}

/// The CLI commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// List the members, their roles, states, timelines and lag.
    List {
        #[arg(short = 'f', long, value_enum, default_value = "pretty")]
        format: Format,
        /// Show the pending restart, scheduled restart and tag columns even when empty.
        #[arg(short = 'e', long)]
        extended: bool,
    },
    /// List the members as a tree: each replica under the member it replicates from.
    Topology,
    /// Print a libpq DSN of the leader, of a member with --role, or of --member.
    Dsn {
        #[arg(short = 'r', long, value_enum)]
        role: Option<CtlRole>,
        #[arg(short = 'm', long)]
        member: Option<String>,
    },
    /// Run SQL on the leader, on a member with --role, or on --member.
    Query {
        /// The SQL to run.
        #[arg(short = 'c', long)]
        command: Option<String>,
        /// Run the SQL in this file.
        #[arg(short = 'f', long)]
        file: Option<std::path::PathBuf>,
        #[arg(short = 'r', long, value_enum)]
        role: Option<CtlRole>,
        #[arg(short = 'm', long)]
        member: Option<String>,
        /// Database user (default: PGUSER, else the login name).
        #[arg(short = 'U', long)]
        username: Option<String>,
        /// Ask for the password (read from stdin); otherwise PGPASSWORD is used.
        #[arg(long)]
        password: bool,
        #[arg(short = 'd', long)]
        dbname: Option<String>,
        #[arg(long, value_enum, default_value = "tsv")]
        format: QueryFormat,
        /// Column delimiter of the tsv format.
        #[arg(long, default_value = "\t")]
        delimiter: String,
    },
    /// Remove the cluster's keys from the DCS (asks for the cluster name, `Yes I am aware` and
    /// the leader's name; answer on stdin).
    Remove {
        cluster: String,
        #[arg(long, value_enum, default_value = "pretty")]
        format: Format,
    },
    /// Print the CLI's version and each member's agent and PostgreSQL versions.
    Version {
        /// The cluster (default: the configured scope).
        cluster: Option<String>,
        /// Only these members.
        members: Vec<String>,
    },
    /// Hand the leader role over to another member, now or at a scheduled time.
    Switchover {
        #[arg(long, alias = "master", alias = "primary")]
        leader: Option<String>,
        #[arg(long)]
        candidate: Option<String>,
        /// ISO 8601 time with a time zone.
        #[arg(long)]
        scheduled: Option<String>,
        #[arg(long)]
        force: bool,
    },
    /// Make a named member the leader, even without a healthy leader.
    Failover {
        #[arg(long)]
        candidate: String,
        #[arg(long)]
        force: bool,
    },
    /// Restart postgres on members (all when none is named), now or at a scheduled time, and
    /// only where the conditions hold.
    Restart {
        members: Vec<String>,
        /// Only members with this role (from the DCS).
        #[arg(long, short = 'r', value_enum, default_value = "any")]
        role: restart::RoleFilter,
        /// Restart a single member only.
        #[arg(long)]
        any: bool,
        /// ISO 8601 time (local time when it has no zone), or `now`.
        #[arg(long)]
        scheduled: Option<String>,
        /// Only if the running PostgreSQL version is older (e.g. 15.8).
        #[arg(long = "pg-version")]
        pg_version: Option<String>,
        /// Only members whose configuration waits for a restart.
        #[arg(long)]
        pending: bool,
        /// Seconds (or e.g. `2min`) postgres may take to start again.
        #[arg(long)]
        timeout: Option<String>,
        #[arg(long)]
        force: bool,
    },
    /// Discard scheduled events: `flush [cluster] [members…] restart|switchover`.
    Flush {
        #[arg(required = true, num_args = 1..)]
        words: Vec<String>,
        /// Only members with this role (restart).
        #[arg(long, short = 'r', value_enum, default_value = "any")]
        role: restart::RoleFilter,
        #[arg(long)]
        force: bool,
    },
    /// Ask members to reload their configuration (all when none is named).
    Reload {
        members: Vec<String>,
        #[arg(long)]
        force: bool,
    },
    /// Re-create replicas from the leader.
    Reinit {
        members: Vec<String>,
        #[arg(long)]
        force: bool,
    },
    /// Maintenance mode: no automatic failover.
    Pause {
        #[arg(long)]
        wait: bool,
    },
    /// Leave maintenance mode.
    Resume {
        #[arg(long)]
        wait: bool,
    },
    /// Timeline history.
    History {
        #[arg(long, value_enum, default_value = "pretty")]
        format: Format,
    },
    /// Show the cluster-wide configuration.
    ShowConfig,
    /// Change the cluster-wide configuration (`--set key.path=value`, `--pg name=value`).
    EditConfig {
        #[arg(short = 's', long = "set")]
        set: Vec<String>,
        #[arg(short = 'p', long = "pg")]
        pg: Vec<String>,
        #[arg(long)]
        force: bool,
    },
    /// Start a pgBackRest backup on the leader and wait until it finished.
    Backup {
        /// full, diff or incr (pgBackRest makes a full one when none exists yet).
        #[arg(long = "type", default_value = "incr", value_parser = ["full", "diff", "incr"])]
        kind: String,
        /// Return once the backup started.
        #[arg(long = "no-wait")]
        no_wait: bool,
        /// The repository to back up into: 1 for `repo1` (default), 2 for `repo2`, ...
        #[arg(long)]
        repo: Option<u32>,
    },
    /// List the backups in the pgBackRest repository (`pgbackrest info`).
    Backups {
        #[arg(long, value_enum, default_value = "pretty")]
        format: Format,
    },
}

/// Errors of CLI commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the DCS")]
    Dcs(#[source] crate::dcs::DcsError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

struct Ctl {
    config: Config,
    /// The cluster's store, whichever it is: every command but `remove` goes through the trait.
    dcs: Arc<dyn Dcs>,
    /// The same store when it is etcd (`remove` deletes keys, which only etcd mode has).
    etcd: Option<Arc<EtcdDcs>>,
}

impl Ctl {
    async fn connect(config: Config) -> Result<Ctl, CliError> {
        crate::peer::configure_client_tls(config.restapi.cafile.as_deref())
            .map_err(CliError::Failed)?;
        let timing = crate::config::Timing {
            retry_timeout: Duration::from_secs(5),
            ..crate::config::Timing::bootstrap(&config)
        };
        if let Some(mut settings) = KubeSettings::from_config(&config, timing.fixed()) {
            // The CLI never takes the Lease or writes member records: it reads, and writes
            // only `config` (edit-config). One read per command needs no watches.
            settings.name = "pgwarden-ctl".into();
            settings.watch = false;
            let dcs = KubeDcs::connect(settings).await.map_err(CliError::Dcs)?;
            return Ok(Ctl {
                config,
                dcs: Arc::new(dcs),
                etcd: None,
            });
        }
        let etcd = config.etcd3.clone().unwrap_or_default();
        let dcs = Arc::new(
            EtcdDcs::connect(EtcdSettings {
                endpoints: etcd.hosts.clone(),
                username: etcd.username.clone(),
                password: etcd.password.clone(),
                namespace: config.namespace.clone(),
                scope: config.scope.clone(),
                // The CLI never writes `leader` or member keys.
                name: "pgwarden-ctl".into(),
                timing: crate::config::Timing {
                    ttl: Duration::from_secs(30),
                    loop_wait: Duration::from_secs(10),
                    retry_timeout: Duration::from_secs(5),
                    fence: Default::default(),
                }
                .fixed(),
            })
            .await
            .map_err(CliError::Dcs)?,
        );
        Ok(Ctl {
            config,
            dcs: dcs.clone(),
            etcd: Some(dcs),
        })
    }

    async fn cluster(&self) -> Result<ClusterView, CliError> {
        self.dcs.cluster().await.map_err(CliError::Dcs)
    }

    fn auth(&self) -> Option<(&str, &str)> {
        self.config
            .restapi
            .authentication
            .as_ref()
            .map(|c| (c.username.as_str(), c.password.as_deref().unwrap_or("")))
    }

    async fn call(
        &self,
        api_url: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), CliError> {
        let base = api_url.trim_end_matches("/patroni");
        crate::peer::request(
            method,
            &format!("{base}{path}"),
            body,
            self.auth(),
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| CliError::Failed(format!("{method} {base}{path}: {e}")))
    }
}

/// Asks a question and reads one answer line from stdin, as click's `prompt`.
fn prompt(question: &str) -> Result<String, CliError> {
    print!("{question}: ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    match std::io::stdin().lock().read_line(&mut answer) {
        Ok(0) | Err(_) => Err(CliError::Failed("Aborted! (no answer on stdin)".into())),
        Ok(_) => Ok(answer.trim_end_matches(['\r', '\n']).to_owned()),
    }
}

fn confirm(question: &str, force: bool) -> Result<(), CliError> {
    if force {
        return Ok(());
    }
    print!("{question} [y/N]: ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(CliError::Failed("aborted".into()))
    }
}

fn print_reply(who: &str, (status, body): (u16, String)) -> Result<(), CliError> {
    if status == 200 || status == 202 {
        println!("{who}: {body}");
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "{who}: failed ({status}): {body}"
        )))
    }
}

/// Runs a CLI command.
pub async fn run(mut config: Config, command: CtlCommand) -> Result<(), CliError> {
    // The commands that name a cluster act on it, whatever scope the configuration has.
    match &command {
        CtlCommand::Remove { cluster, .. }
        | CtlCommand::Version {
            cluster: Some(cluster),
            ..
        } => config.scope = cluster.clone(),
        _ => {}
    }
    let ctl = Ctl::connect(config).await?;
    let scope = ctl.config.scope.clone();
    match command {
        CtlCommand::List { format, extended } => {
            let view = ctl.cluster().await?;
            match format {
                Format::Pretty => print!("{}", list::render_table(&scope, &view, false, extended)),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&list::rows(&view)).unwrap_or_default()
                ),
            }
            Ok(())
        }
        CtlCommand::Topology => {
            let view = ctl.cluster().await?;
            print!("{}", list::render_table(&scope, &view, true, false));
            Ok(())
        }
        CtlCommand::Dsn { role, member } => query::print_dsn(&ctl, role, member.as_deref()).await,
        CtlCommand::Query {
            command,
            file,
            role,
            member,
            username,
            password,
            dbname,
            format,
            delimiter,
        } => {
            let sql = match (command, file) {
                (Some(c), None) => c,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(|e| CliError::Failed(format!("{}: {e}", f.display())))?,
                (Some(_), Some(_)) => {
                    return Err(CliError::Usage(
                        "--file and --command are mutually exclusive options".into(),
                    ))
                }
                _ => {
                    return Err(CliError::Usage(
                        "You need to specify either --command or --file".into(),
                    ))
                }
            };
            let password = if password {
                Some(prompt("Password")?)
            } else {
                None
            };
            let args = query::QueryArgs {
                sql,
                role,
                member,
                username,
                password,
                dbname,
                format,
                delimiter: delimiter.replace("\\t", "\t"),
            };
            query::query(&ctl, args).await
        }
        // `main` connects with the named cluster as the scope.
        CtlCommand::Remove { cluster, format } => remove::remove(&ctl, &cluster, format).await,
        CtlCommand::Version { members, .. } => version::version(&ctl, &members).await,
        CtlCommand::Switchover {
            leader,
            candidate,
            scheduled,
            force,
        } => {
            let view = ctl.cluster().await?;
            let current = view
                .leader_name()
                .ok_or_else(|| CliError::Failed("the cluster has no leader: use failover".into()))?
                .to_owned();
            let leader = leader.unwrap_or_else(|| current.clone());
            let Some(member) = view.member(&current) else {
                return Err(CliError::Failed(format!("no member record for {current}")));
            };
            confirm(
                &format!(
                    "Switch over from {leader} to {}{}?",
                    candidate.as_deref().unwrap_or("any healthy member"),
                    scheduled
                        .as_deref()
                        .map(|s| format!(" at {s}"))
                        .unwrap_or_default()
                ),
                force,
            )?;
            let mut body = json!({"leader": leader});
            if let Some(c) = &candidate {
                body["candidate"] = json!(c);
            }
            if let Some(s) = &scheduled {
                body["scheduled_at"] = json!(s);
            }
            let reply = ctl
                .call(&member.record.api_url, "POST", "/switchover", Some(&body))
                .await?;
            print_reply(&current, reply)
        }
        CtlCommand::Failover { candidate, force } => {
            let view = ctl.cluster().await?;
            let target = view
                .leader_name()
                .and_then(|l| view.member(l))
                .or_else(|| view.member(&candidate))
                .ok_or_else(|| CliError::Failed(format!("{candidate} is not a member")))?;
            confirm(&format!("Fail over to {candidate}?"), force)?;
            let reply = ctl
                .call(
                    &target.record.api_url,
                    "POST",
                    "/failover",
                    Some(&json!({"candidate": candidate})),
                )
                .await?;
            print_reply(&target.name, reply)
        }
        CtlCommand::Restart {
            members,
            role,
            any,
            scheduled,
            pg_version,
            pending,
            timeout,
            force,
        } => {
            let args = restart::RestartArgs {
                members,
                role,
                any,
                scheduled,
                pg_version,
                pending,
                timeout,
                force,
            };
            restart::restart(&ctl, args).await
        }
        CtlCommand::Flush { words, role, force } => flush::flush(&ctl, &words, role, force).await,
        CtlCommand::Reload { members, force } => {
            each_member(&ctl, &members, force, "reload", "POST", "/reload", None).await
        }
        CtlCommand::Reinit { members, force } => {
            if members.is_empty() {
                return Err(CliError::Usage("name the members to reinitialise".into()));
            }
            let body = json!({"force": force});
            each_member(
                &ctl,
                &members,
                force,
                "reinitialise",
                "POST",
                "/reinitialize",
                Some(&body),
            )
            .await
        }
        CtlCommand::Pause { wait } => set_pause(&ctl, true, wait).await,
        CtlCommand::Resume { wait } => set_pause(&ctl, false, wait).await,
        CtlCommand::History { format } => {
            let view = ctl.cluster().await?;
            match format {
                Format::Json => println!(
                    "{}",
                    Value::Array(view.history.iter().map(|l| l.to_json()).collect())
                ),
                Format::Pretty => {
                    println!(
                        "{:>4} | {:>12} | {:<32} | {:<25} | New Leader",
                        "TL", "LSN", "Reason", "Timestamp"
                    );
                    for l in &view.history {
                        println!(
                            "{:>4} | {:>12} | {:<32} | {:<25} | {}",
                            l.timeline,
                            l.lsn,
                            l.reason,
                            l.timestamp.as_deref().unwrap_or(""),
                            l.new_leader.as_deref().unwrap_or("")
                        );
                    }
                }
            }
            Ok(())
        }
        CtlCommand::ShowConfig => {
            let view = ctl.cluster().await?;
            let config = view.config.map(|c| c.value).unwrap_or(Value::Null);
            print!("{}", serde_yaml::to_string(&config).unwrap_or_default());
            Ok(())
        }
        CtlCommand::EditConfig { set, pg, force } => edit_config(&ctl, &set, &pg, force).await,
        CtlCommand::Backup {
            kind,
            no_wait,
            repo,
        } => backup::backup(&ctl, &kind, repo, !no_wait).await,
        CtlCommand::Backups { format } => backup::backups(&ctl, format).await,
    }
}

async fn each_member(
    ctl: &Ctl,
    names: &[String],
    force: bool,
    what: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(), CliError> {
    let view = ctl.cluster().await?;
    let targets: Vec<_> = view
        .members
        .iter()
        .filter(|m| names.is_empty() || names.contains(&m.name))
        .collect();
    if targets.is_empty() {
        return Err(CliError::Usage("no such member".into()));
    }
    let list: Vec<&str> = targets.iter().map(|m| m.name.as_str()).collect();
    confirm(
        &format!("Are you sure you want to {what} {}?", list.join(", ")),
        force,
    )?;
    let mut failed = false;
    for m in targets {
        let reply = ctl.call(&m.record.api_url, method, path, body).await?;
        if let Err(e) = print_reply(&m.name, reply) {
            eprintln!("{e}");
            failed = true;
        }
    }
    if failed {
        Err(CliError::Failed(format!("{what} failed on some members")))
    } else {
        Ok(())
    }
}

async fn set_pause(ctl: &Ctl, pause: bool, wait: bool) -> Result<(), CliError> {
    let view = ctl.cluster().await?;
    if view.is_paused() == pause {
        return Err(CliError::Failed(format!(
            "Cluster is {} paused",
            if pause { "already" } else { "not" }
        )));
    }
    let body = json!({"pause": if pause { Value::Bool(true) } else { Value::Null }});
    // The leader first, then the others, stopping at the first one that answers.
    let mut order: Vec<_> = view.members.iter().collect();
    order.sort_by_key(|m| !view.is_leader(&m.name));
    let mut done = false;
    for m in order {
        if let Ok((200, _)) = ctl
            .call(&m.record.api_url, "PATCH", "/config", Some(&body))
            .await
        {
            done = true;
            break;
        }
    }
    if !done {
        return Err(CliError::Failed("no member accepted the change".into()));
    }
    if wait {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let v = ctl.cluster().await?;
            if v.members
                .iter()
                .all(|m| m.record.pause.unwrap_or(false) == pause)
            {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(CliError::Failed("members did not confirm in time".into()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!(
        "Success: cluster management is {}",
        if pause { "paused" } else { "resumed" }
    );
    Ok(())
}

/// Parses a `--set`/`--pg` value as YAML so numbers and booleans keep their type.
fn parse_value(raw: &str) -> Value {
    if raw == "null" {
        return Value::Null;
    }
    serde_yaml::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
}

async fn edit_config(
    ctl: &Ctl,
    set: &[String],
    pg: &[String],
    force: bool,
) -> Result<(), CliError> {
    if set.is_empty() && pg.is_empty() {
        return Err(CliError::Usage(
            "give changes with --set key.path=value or --pg parameter=value".into(),
        ));
    }
    let view = ctl.cluster().await?;
    let Some(current) = view.config else {
        return Err(CliError::Failed(
            "the cluster has no configuration in the DCS".into(),
        ));
    };
    let mut patch = serde_json::Map::new();
    let mut apply = |path: &str, value: Value| {
        let mut node = &mut patch;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                node.insert((*part).to_owned(), value.clone());
            } else {
                let entry = node
                    .entry((*part).to_owned())
                    .or_insert_with(|| Value::Object(Default::default()));
                if !entry.is_object() {
                    *entry = Value::Object(Default::default());
                }
                let Value::Object(next) = entry else { return };
                node = next;
            }
        }
    };
    for s in set {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--set {s}: expected key=value")))?;
        apply(k.trim(), parse_value(v.trim()));
    }
    for p in pg {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--pg {p}: expected name=value")))?;
        apply(
            &format!("postgresql.parameters.{}", k.trim()),
            parse_value(v.trim()),
        );
    }
    let mut merged = current.value.as_object().cloned().unwrap_or_default();
    crate::api::commands::merge(&mut merged, &patch);
    let merged = Value::Object(merged);
    println!("{}", serde_yaml::to_string(&merged).unwrap_or_default());
    confirm("Apply these changes?", force)?;
    match ctl.dcs.write_config(&merged, Some(current.revision)).await {
        Ok(true) => {
            println!("Configuration changed");
            Ok(())
        }
        Ok(false) => Err(CliError::Failed(
            "the configuration changed concurrently; run the command again".into(),
        )),
        Err(e) => Err(CliError::Dcs(e)),
    }
}
