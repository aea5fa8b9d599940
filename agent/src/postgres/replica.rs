//! Making and re-pointing replicas: `pg_basebackup` from the leader, `pg_rewind` of a former
//! primary, and the `primary_conninfo` a standby follows.

use std::path::{Path, PathBuf};

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
    #[error("cannot write the password file {0}")]
    Pgpass(String, #[source] std::io::Error),
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
    /// The cluster's system identifier (the DCS `initialize`), when known: a replica restored
    /// from the repository takes only a backup of this system (after a major-version upgrade
    /// the repository still holds the old one's backups).
    pub system_identifier: Option<String>,
}

impl Upstream {
    pub fn from_member(name: &str, record: &MemberRecord) -> Option<Upstream> {
        let (host, port) = record.host_port()?;
        Some(Upstream {
            name: name.to_owned(),
            host,
            port,
            system_identifier: None,
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

/// The password file the agent writes for libpq (`postgresql.pgpass`, Patroni's default
/// `~/pgpass`), as an absolute path: postgres reads `passfile` from `primary_conninfo` with the
/// data directory as its working directory.
pub fn pgpass_path(config: &Config) -> PathBuf {
    let path = config.postgresql.pgpass.clone().unwrap_or_else(|| {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                nix::unistd::User::from_uid(nix::unistd::getuid())
                    .ok()
                    .flatten()
                    .map(|u| u.dir)
            })
            .unwrap_or_else(std::env::temp_dir);
        home.join("pgpass")
    });
    std::path::absolute(&path).unwrap_or(path)
}

/// The password file's path and content. The content is a secret: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Pgpass {
    pub path: PathBuf,
    content: String,
}

impl std::fmt::Debug for Pgpass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pgpass")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn pgpass_escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace(':', "\\:")
}

/// The lines for the replication user and the user pg_rewind connects as (the rewind user, else
/// the superuser), and the superuser when pgBackRest is configured (it connects as the
/// superuser), for any host: the file then does not change when the leader does, so
/// postgres never reads a file being replaced for another upstream. `None` when none has a
/// password (trust or certificate authentication).
pub fn pgpass(config: &Config) -> Option<Pgpass> {
    let auth = &config.postgresql.authentication;
    let rewind = auth.rewind.as_ref().unwrap_or(&auth.superuser);
    let backrest = config.pgbackrest.is_some().then_some(&auth.superuser);
    let mut content = String::new();
    for user in [Some(&auth.replication), Some(rewind), backrest]
        .into_iter()
        .flatten()
    {
        if let Some(password) = &user.password {
            let line = format!(
                "*:*:*:{}:{}\n",
                pgpass_escape(&user.username),
                pgpass_escape(password)
            );
            if !content.contains(&line) {
                content.push_str(&line);
            }
        }
    }
    (!content.is_empty()).then(|| Pgpass {
        path: pgpass_path(config),
        content,
    })
}

impl Pgpass {
    /// Writes the file, mode 0600 from its creation (libpq ignores a file others can read),
    /// unless it already holds this content with that mode. Replaced by a rename, so a reader
    /// never sees half a file and a symlink planted at the path is replaced, not followed.
    pub fn write(&self) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.is_file()
                && meta.permissions().mode() & 0o077 == 0
                && std::fs::read_to_string(&self.path).ok().as_deref() == Some(&self.content)
            {
                return Ok(());
            }
            if meta.is_dir() {
                return Err(std::io::Error::other(format!(
                    "{} is a directory; check postgresql.pgpass",
                    self.path.display()
                )));
            }
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".pgwarden-tmp");
        let tmp = PathBuf::from(tmp);
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(self.content.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// `primary_conninfo` for following `upstream` as the replication user. The password is never
/// in it (postgres logs the setting when it changes, and it lands in `postgresql.conf`):
/// `passfile` names the [`pgpass`] file instead, as Patroni does.
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
    if repl.password.is_some() {
        parts.push(format!(
            "passfile={}",
            conninfo_quote(&pgpass_path(config).to_string_lossy())
        ));
    }
    parts.join(" ")
}

/// Superuser (or rewind user) connection string to `upstream`, for pg_rewind; its password
/// comes from the [`pgpass`] file through `PGPASSFILE`.
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
    parts.join(" ")
}

/// Points a pg_basebackup or pg_rewind at the password file (written first), never a password
/// on its command line or in its environment.
fn use_pgpass(config: &Config, cmd: &mut tokio::process::Command) -> Result<(), ReplicaError> {
    cmd.env_remove("PGPASSWORD");
    if let Some(pgpass) = pgpass(config) {
        pgpass
            .write()
            .map_err(|e| ReplicaError::Pgpass(pgpass.path.display().to_string(), e))?;
        cmd.env("PGPASSFILE", &pgpass.path);
    }
    Ok(())
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
    super::data_dir::make_private(data_dir).map_err(ReplicaError::Prepare)?;
    let mut cmd = tokio::process::Command::new(bin_dir.join("pg_basebackup"));
    cmd.arg("--pgdata")
        .arg(data_dir)
        .arg("--wal-method=stream")
        .arg("--checkpoint=fast")
        // One syncfs afterwards instead of an fsync per file (`initdb::sync_data_dir`).
        .arg("--no-sync")
        .arg("--no-password")
        .arg(format!("--dbname={}", primary_conninfo(config, upstream)));
    use_pgpass(config, &mut cmd)?;
    let mut result = run("pg_basebackup", cmd).await;
    if result.is_ok() {
        result = super::initdb::sync_data_dir(data_dir)
            .await
            .map_err(ReplicaError::Sync);
    }
    if result.is_err() {
        // A half-copied directory is ours (it was empty before): clear it so the next try can
        // start from scratch instead of being refused as "not empty".
        super::data_dir::clear_dir(data_dir);
    }
    result
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
    use_pgpass(config, &mut cmd)?;
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
            system_identifier: None,
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
    fn conninfo_quotes_values_and_names_the_password_file_not_the_password() {
        let mut config = Config {
            name: "pg1".into(),
            ..Default::default()
        };
        config.postgresql.pgpass = Some("/var/lib/it's/pgpass".into());
        config.postgresql.authentication.replication.username = "rep".into();
        config.postgresql.authentication.replication.password = Some("s3cret".into());
        config.postgresql.authentication.superuser.password = Some("su-s3cret".into());
        let up = Upstream {
            name: "pg0".into(),
            host: "10.0.0.1".into(),
            port: 5433,
            system_identifier: None,
        };
        let ci = primary_conninfo(&config, &up);
        assert!(ci.contains("host='10.0.0.1' port=5433 user='rep'"));
        assert!(ci.contains(r"passfile='/var/lib/it\'s/pgpass'"), "{ci}");
        assert!(ci.contains("application_name='pg1'"));
        for ci in [ci, rewind_conninfo(&config, &up)] {
            assert!(!ci.contains("s3cret") && !ci.contains("password"), "{ci}");
        }
        // Without a password there is nothing to read.
        config.postgresql.authentication.replication.password = None;
        assert!(!primary_conninfo(&config, &up).contains("passfile"));
    }

    #[test]
    fn the_password_file_has_a_line_per_user_escaped_and_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.postgresql.pgpass = Some(dir.path().join("sub/pgpass"));
        let auth = &mut config.postgresql.authentication;
        auth.replication.username = "rep".into();
        auth.replication.password = Some(r"a:b\c".into());
        auth.superuser.username = "postgres".into();
        auth.superuser.password = Some("su-pw-42".into());
        let file = pgpass(&config).expect("passwords given");
        assert_eq!(
            file.content,
            "*:*:*:rep:a\\:b\\\\c\n*:*:*:postgres:su-pw-42\n"
        );
        assert!(!format!("{file:?}").contains("su-pw-42"));
        // Stale, world-readable content is replaced by a private file.
        std::fs::create_dir_all(dir.path().join("sub")).expect("mkdir");
        std::fs::write(&file.path, "old").expect("seed");
        file.write().expect("write");
        file.write().expect("unchanged");
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&file.path).expect("written");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&file.path).expect("read"),
            file.content
        );
        // A rewind user replaces the superuser; no password, no file.
        let auth = &mut config.postgresql.authentication;
        auth.rewind = Some(crate::config::Credentials {
            username: "rewinder".into(),
            password: Some("rw".into()),
            ..Default::default()
        });
        assert!(pgpass(&config)
            .expect("passwords")
            .content
            .ends_with("*:*:*:rewinder:rw\n"));
        let auth = &mut config.postgresql.authentication;
        auth.rewind = None;
        auth.replication.password = None;
        auth.superuser.password = None;
        assert_eq!(pgpass(&config), None);
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
                port: 6000,
                system_identifier: None,
            })
        );
    }
}
