//! Making and re-pointing replicas: `pg_basebackup` from the leader, `pg_rewind` of a former
//! primary, and the `primary_conninfo` a standby follows.

use std::path::Path;

use crate::config::Config;
use crate::dcs::MemberRecord;

/// Errors cloning or rewinding.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("the leader's member record has no usable conn_url")]
    NoLeaderAddress,
    #[error("data directory {0} is not empty; refusing to clone over existing files")]
    NotEmpty(String),
    #[error("cannot run {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("{tool} failed: {stderr}")]
    Failed { tool: &'static str, stderr: String },
    #[error("cannot prepare the data directory")]
    Prepare(#[source] std::io::Error),
    #[error("cannot flush the cloned data directory to disk")]
    Sync(#[source] std::io::Error),
}

impl ReplicaError {
    /// The tool could not connect to the source server, so it changed nothing (libpq's
    /// connection errors begin "connection to server at …" or "… on socket …"; pg_rewind prints
    /// nothing before it has connected).
    pub fn is_connection_failure(&self) -> bool {
        matches!(self, ReplicaError::Failed { stderr, .. }
        if stderr.lines().next().is_some_and(|first| {
            first.contains("error: connection to server") || first.contains("could not connect to server")
        }))
    }
}

/// Checks, as Patroni's `check_leader_is_not_in_recovery` does, that the leader answers a query
/// with pg_rewind's credentials and runs as a primary: `Err` says why not.
pub async fn leader_ready_for_rewind(
    config: &Config,
    upstream: &Upstream,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let auth = &config.postgresql.authentication;
    let user = auth.rewind.as_ref().unwrap_or(&auth.superuser);
    let mut pg = tokio_postgres::Config::new();
    pg.host(&upstream.host)
        .port(upstream.port)
        .user(&user.username)
        .dbname("postgres")
        .application_name("pgwarden rewind check")
        .connect_timeout(timeout);
    if let Some(password) = &user.password {
        pg.password(password);
    }
    let check = async {
        let (client, connection) = pg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let connection = tokio::spawn(connection);
        let answer = client
            .query_one("SELECT pg_catalog.pg_is_in_recovery()", &[])
            .await
            .map_err(|e| format!("query failed: {e}"));
        drop(client);
        let _ = connection.await;
        match answer?.try_get::<_, bool>(0) {
            Ok(false) => Ok(()),
            Ok(true) => Err("it is still in recovery".to_owned()),
            Err(e) => Err(format!("unexpected answer: {e}")),
        }
    };
    tokio::time::timeout(timeout * 2, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", timeout * 2)))
}

/// Where to reach the leader, from its member record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl Upstream {
    pub fn from_member(name: &str, record: &MemberRecord) -> Option<Upstream> {
        let (host, port) = record.host_port()?;
        Some(Upstream {
            name: name.to_owned(),
            host,
            port,
        })
    }
}

/// Replication slot name for a member, as Patroni derives it: lower case, `[a-z0-9_]` only.
pub fn slot_name(member: &str) -> String {
    member
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn conninfo_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `primary_conninfo` for following `upstream` as the replication user.
pub fn primary_conninfo(config: &Config, upstream: &Upstream) -> String {
    let repl = &config.postgresql.authentication.replication;
    let mut parts = vec![
        format!("host={}", conninfo_quote(&upstream.host)),
        format!("port={}", upstream.port),
        format!("user={}", conninfo_quote(&repl.username)),
        format!("application_name={}", conninfo_quote(&config.name)),
        "target_session_attrs=any".to_owned(),
    ];
    parts.extend(
        repl.ssl_options()
            .into_iter()
            .map(|(k, v)| format!("{k}={}", conninfo_quote(&v))),
    );
    if let Some(pw) = &repl.password {
        parts.push(format!("password={}", conninfo_quote(pw)));
    }
    parts.join(" ")
}

/// Superuser (or rewind user) connection string to `upstream`, for pg_rewind.
pub fn rewind_conninfo(config: &Config, upstream: &Upstream) -> String {
    let auth = &config.postgresql.authentication;
    let user = auth.rewind.as_ref().unwrap_or(&auth.superuser);
    let mut parts = vec![
        format!("host={}", conninfo_quote(&upstream.host)),
        format!("port={}", upstream.port),
        format!("user={}", conninfo_quote(&user.username)),
        "dbname=postgres".to_owned(),
    ];
    parts.extend(
        user.ssl_options()
            .into_iter()
            .map(|(k, v)| format!("{k}={}", conninfo_quote(&v))),
    );
    if let Some(pw) = &user.password {
        parts.push(format!("password={}", conninfo_quote(pw)));
    }
    parts.join(" ")
}

async fn run(tool: &'static str, mut cmd: tokio::process::Command) -> Result<(), ReplicaError> {
    let output = cmd
        .env("LC_ALL", "C")
        .output()
        .await
        .map_err(|e| ReplicaError::Spawn(tool.to_owned(), e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ReplicaError::Failed {
            tool,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Clones the leader into an empty data directory with `pg_basebackup`.
pub async fn basebackup(
    config: &Config,
    bin_dir: &Path,
    upstream: &Upstream,
) -> Result<(), ReplicaError> {
    let data_dir = &config.postgresql.data_dir;
    if !super::initdb::is_empty_dir(data_dir) {
        return Err(ReplicaError::NotEmpty(data_dir.display().to_string()));
    }
    std::fs::create_dir_all(data_dir).map_err(ReplicaError::Prepare)?;
    set_private(data_dir).map_err(ReplicaError::Prepare)?;
    let repl = &config.postgresql.authentication.replication;
    let mut cmd = tokio::process::Command::new(bin_dir.join("pg_basebackup"));
    cmd.arg("--pgdata")
        .arg(data_dir)
        .arg("--wal-method=stream")
        .arg("--checkpoint=fast")
        // One syncfs afterwards instead of an fsync per file (`initdb::sync_data_dir`).
        .arg("--no-sync")
        .arg("--no-password")
        .arg(format!("--dbname={}", primary_conninfo(config, upstream)));
    if let Some(pw) = &repl.password {
        cmd.env("PGPASSWORD", pw);
    }
    let mut result = run("pg_basebackup", cmd).await;
    if result.is_ok() {
        result = super::initdb::sync_data_dir(data_dir)
            .await
            .map_err(ReplicaError::Sync);
    }
    if result.is_err() {
        // A half-copied directory is ours (it was empty before): clear it so the next try can
        // start from scratch instead of being refused as "not empty".
        clear_dir(data_dir);
    }
    result
}

fn clear_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

fn set_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Brings a crashed former primary to a consistent, cleanly shut down state (pg_rewind refuses
/// otherwise): single-user mode runs crash recovery and exits.
pub async fn single_user_recovery(bin_dir: &Path, data_dir: &Path) -> Result<(), ReplicaError> {
    let mut cmd = tokio::process::Command::new(bin_dir.join("postgres"));
    cmd.arg("--single")
        .arg("-D")
        .arg(data_dir)
        .arg("-c")
        .arg("archive_mode=off")
        .arg("postgres")
        .stdin(std::process::Stdio::null());
    run("postgres --single", cmd).await
}

/// Rewinds the data directory to the point where it diverged from `upstream`.
pub async fn rewind(
    config: &Config,
    bin_dir: &Path,
    upstream: &Upstream,
) -> Result<(), ReplicaError> {
    let mut cmd = tokio::process::Command::new(bin_dir.join("pg_rewind"));
    cmd.arg("--target-pgdata")
        .arg(&config.postgresql.data_dir)
        .arg(format!(
            "--source-server={}",
            rewind_conninfo(config, upstream)
        ))
        .arg("--no-sync");
    run("pg_rewind", cmd).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_failed_connection_is_a_tool_that_changed_nothing() {
        let failed = |stderr: &str| ReplicaError::Failed {
            tool: "pg_rewind",
            stderr: stderr.into(),
        };
        assert!(failed("pg_rewind: error: connection to server at \"127.0.0.1\", port 5432 failed: server closed the connection unexpectedly").is_connection_failure());
        assert!(!failed("pg_rewind: servers diverged at WAL location 0/3000000 on timeline 1\npg_rewind: error: could not fetch remote file \"global/pg_control\"").is_connection_failure());
        assert!(
            !failed("pg_rewind: error: target server must be shut down cleanly")
                .is_connection_failure()
        );
        assert!(!ReplicaError::NoLeaderAddress.is_connection_failure());
    }

    /// The check before pg_rewind: a port that accepts and closes (a proxy, a postgres going
    /// down) is not a leader ready for pg_rewind, nor is a closed port.
    #[tokio::test]
    async fn a_leader_that_accepts_and_closes_is_not_ready_for_rewind() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a local port");
        let port = listener.local_addr().expect("local address").port();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        });
        let up = Upstream {
            name: "pg0".into(),
            host: "127.0.0.1".into(),
            port,
        };
        let config = Config::default();
        let t = std::time::Duration::from_secs(2);
        assert!(leader_ready_for_rewind(&config, &up, t).await.is_err());
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let closed_port = closed.local_addr().expect("addr").port();
        drop(closed);
        let up = Upstream {
            port: closed_port,
            ..up
        };
        assert!(leader_ready_for_rewind(&config, &up, t).await.is_err());
    }

    #[test]
    fn slot_names_follow_patroni_rules() {
        assert_eq!(slot_name("Postgres-0.db"), "postgres_0_db");
    }

    #[test]
    fn conninfo_quotes_values() {
        let mut config = Config {
            name: "pg1".into(),
            ..Default::default()
        };
        config.postgresql.authentication.replication.username = "rep".into();
        config.postgresql.authentication.replication.password = Some("it's".into());
        let up = Upstream {
            name: "pg0".into(),
            host: "10.0.0.1".into(),
            port: 5433,
        };
        let ci = primary_conninfo(&config, &up);
        assert!(ci.contains("host='10.0.0.1' port=5433 user='rep'"));
        assert!(ci.contains(r"password='it\'s'"));
        assert!(ci.contains("application_name='pg1'"));
    }

    #[test]
    fn upstream_comes_from_conn_url() {
        let record = MemberRecord {
            conn_url: "postgres://127.0.0.1:6000/postgres".into(),
            ..Default::default()
        };
        assert_eq!(
            Upstream::from_member("pg0", &record),
            Some(Upstream {
                name: "pg0".into(),
                host: "127.0.0.1".into(),
                port: 6000
            })
        );
    }
}
