//! Creating a new cluster: `initdb` with the configured superuser, then the roles the cluster
//! needs (`post_bootstrap`), as Patroni's default bootstrap method does.

use std::io::Write;
use std::path::Path;

use crate::config::{Config, InitdbOption};

use super::probe::{quote_ident, quote_literal, Probe, ProbeError};

/// Errors creating a cluster.
#[derive(Debug, thiserror::Error)]
pub enum InitdbError {
    #[error("data directory {0} is not empty; refusing to initialise over existing files")]
    NotEmpty(String),
    #[error("cannot prepare the data directory")]
    Prepare(#[source] std::io::Error),
    #[error("cannot run initdb")]
    Spawn(#[source] std::io::Error),
    #[error("initdb failed: {0}")]
    Failed(String),
    #[error("post-bootstrap SQL failed")]
    PostBootstrap(#[source] ProbeError),
    #[error(transparent)]
    PostBootstrapCommand(#[from] super::custom_bootstrap::CustomBootstrapError),
    #[error("cannot flush the new data directory to disk")]
    Sync(#[source] std::io::Error),
}

/// Flushes every filesystem that holds part of `data_dir` (the directory itself, `pg_wal` and
/// tablespaces, which may be symlinks to other filesystems) with one `syncfs(2)` each.
///
/// `initdb` and `pg_basebackup` run with `--no-sync` and this replaces their own flush, which
/// fsyncs every file and directory one by one: on a busy disk that was most of a bootstrap.
/// `syncfs` writes back all dirty data and metadata of the filesystem and commits its journal,
/// and reports writeback errors (Linux ≥ 5.8), so afterwards the directory is as durable as
/// after the tools' own flush. It runs before postgres is started on the new directory, so a
/// member never reports itself ready on data that a crash could still lose.
pub async fn sync_data_dir(data_dir: &Path) -> std::io::Result<()> {
    let data_dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || sync_filesystems(&data_dir))
        .await
        .map_err(std::io::Error::other)?
}

fn sync_filesystems(data_dir: &Path) -> std::io::Result<()> {
    let mut paths = vec![data_dir.to_path_buf(), data_dir.join("pg_wal")];
    if let Ok(entries) = std::fs::read_dir(data_dir.join("pg_tblspc")) {
        paths.extend(entries.flatten().map(|e| e.path()));
    }
    for path in paths {
        // Opening follows symlinks: the descriptor names the filesystem the data is on.
        let dir = std::fs::File::open(&path)?;
        nix::unistd::syncfs(&dir).map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// initdb arguments from `bootstrap.initdb` (Patroni's list of flags and one-key maps).
pub fn initdb_args(options: &[InitdbOption]) -> Vec<String> {
    let mut args = Vec::new();
    for option in options {
        match option {
            InitdbOption::Flag(flag) => args.push(format!("--{flag}")),
            InitdbOption::Value(map) => {
                for (k, v) in map {
                    let value = match v {
                        serde_yaml::Value::String(s) => s.clone(),
                        serde_yaml::Value::Number(n) => n.to_string(),
                        serde_yaml::Value::Bool(b) => b.to_string(),
                        other => serde_yaml::to_string(other)
                            .unwrap_or_default()
                            .trim()
                            .to_owned(),
                    };
                    args.push(format!("--{k}={value}"));
                }
            }
        }
    }
    args
}

/// True when `dir` does not exist or has no entries.
pub fn is_empty_dir(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Runs initdb. Never touches a non-empty directory.
pub async fn initdb(config: &Config, bin_dir: &Path) -> Result<(), InitdbError> {
    let data_dir = &config.postgresql.data_dir;
    if !is_empty_dir(data_dir) {
        return Err(InitdbError::NotEmpty(data_dir.display().to_string()));
    }
    std::fs::create_dir_all(data_dir).map_err(InitdbError::Prepare)?;
    set_mode(data_dir, 0o700).map_err(InitdbError::Prepare)?;
    let superuser = &config.postgresql.authentication.superuser;
    let mut cmd = tokio::process::Command::new(bin_dir.join("initdb"));
    cmd.arg("-D")
        .arg(data_dir)
        .arg("--username")
        .arg(&superuser.username)
        // One syncfs afterwards instead of an fsync per file (`sync_data_dir`).
        .arg("--no-sync")
        .args(initdb_args(&config.bootstrap.initdb));
    // The password goes through a private temporary file, never the command line.
    let pwfile = match &superuser.password {
        Some(pw) => {
            let mut f = tempfile::NamedTempFile::new().map_err(InitdbError::Prepare)?;
            writeln!(f, "{pw}").map_err(InitdbError::Prepare)?;
            cmd.arg(format!("--pwfile={}", f.path().display()));
            Some(f)
        }
        None => None,
    };
    let output = cmd.output().await.map_err(InitdbError::Spawn)?;
    drop(pwfile);
    if !output.status.success() {
        return Err(InitdbError::Failed(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    sync_data_dir(data_dir).await.map_err(InitdbError::Sync)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// After the first start of a new cluster (any bootstrap method): the roles, then the
/// `bootstrap.post_bootstrap` command. The superuser's password is set too, as Patroni does:
/// a cluster copied or restored from elsewhere has that cluster's password.
pub async fn post_bootstrap(config: &Config, probe: &Probe) -> Result<(), InitdbError> {
    create_roles(config, probe).await?;
    if let Some(command) = &config.bootstrap.post_bootstrap {
        let (host, port) = probe.address();
        super::custom_bootstrap::run_post_bootstrap(command, config, host, port).await?;
    }
    Ok(())
}

async fn create_roles(config: &Config, probe: &Probe) -> Result<(), InitdbError> {
    let auth = &config.postgresql.authentication;
    let mut sql = String::new();
    let mut role = |name: &str, password: Option<&String>, attrs: &str| {
        let password = password
            .map(|p| format!(" PASSWORD {}", quote_literal(p)))
            .unwrap_or_default();
        sql.push_str(&format!(
            "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {lit}) THEN \
             EXECUTE {create}; ELSE EXECUTE {alter}; END IF; END$$;\n",
            lit = quote_literal(name),
            create = quote_literal(&format!(
                "CREATE ROLE {} WITH {attrs}{password}",
                quote_ident(name)
            )),
            alter = quote_literal(&format!(
                "ALTER ROLE {} WITH {attrs}{password}",
                quote_ident(name)
            )),
        ));
    };
    if auth.superuser.password.is_some() {
        role(
            &auth.superuser.username,
            auth.superuser.password.as_ref(),
            "SUPERUSER LOGIN",
        );
    }
    if auth.replication.username != auth.superuser.username {
        role(
            &auth.replication.username,
            auth.replication.password.as_ref(),
            "LOGIN REPLICATION",
        );
    }
    if let Some(rewind) = &auth.rewind {
        if rewind.username != auth.superuser.username {
            role(&rewind.username, rewind.password.as_ref(), "LOGIN");
            sql.push_str(&rewind_grants(&rewind.username));
        }
    }
    if sql.is_empty() {
        return Ok(());
    }
    probe
        .execute_unlogged(&sql)
        .await
        .map_err(InitdbError::PostBootstrap)
}

/// The functions pg_rewind calls on the source server: without EXECUTE on them a rewind role
/// that is not a superuser fails with "permission denied for function pg_read_binary_file".
/// The same four grants as Patroni's `Bootstrap.create_or_update_role` for the rewind user.
fn rewind_grants(username: &str) -> String {
    [
        "pg_ls_dir(text, boolean, boolean)",
        "pg_stat_file(text, boolean)",
        "pg_read_binary_file(text)",
        "pg_read_binary_file(text, bigint, bigint, boolean)",
    ]
    .iter()
    .map(|f| {
        format!(
            "GRANT EXECUTE ON FUNCTION pg_catalog.{f} TO {};\n",
            quote_ident(username)
        )
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_data_directory_is_flushed_through_its_wal_and_tablespace_links() {
        let data = tempfile::tempdir().expect("temp dir");
        let elsewhere = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(data.path().join("pg_tblspc")).expect("pg_tblspc");
        std::os::unix::fs::symlink(elsewhere.path(), data.path().join("pg_wal")).expect("link");
        std::os::unix::fs::symlink(elsewhere.path(), data.path().join("pg_tblspc/16384"))
            .expect("link");
        sync_data_dir(data.path()).await.expect("flushed");
        // A link to nowhere is not silently skipped: its data would not be durable.
        std::os::unix::fs::symlink("/nonexistent", data.path().join("pg_tblspc/16385"))
            .expect("link");
        assert!(sync_data_dir(data.path()).await.is_err());
        assert!(sync_data_dir(&data.path().join("missing")).await.is_err());
    }

    #[test]
    fn a_rewind_role_may_read_the_files_pg_rewind_fetches() {
        let sql = rewind_grants("rewinder");
        assert_eq!(sql.lines().count(), 4);
        assert!(sql.contains(
            "GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO \"rewinder\";"
        ));
        assert!(sql.contains("pg_catalog.pg_ls_dir(text, boolean, boolean)"));
        assert!(sql.contains("pg_catalog.pg_stat_file(text, boolean)"));
    }

    #[test]
    fn patroni_initdb_options_become_flags() {
        let options: Vec<InitdbOption> =
            serde_yaml::from_str("- encoding: UTF8\n- data-checksums\n- locale: C\n")
                .expect("yaml");
        assert_eq!(
            initdb_args(&options),
            vec!["--encoding=UTF8", "--data-checksums", "--locale=C"]
        );
    }

    #[test]
    fn empty_dir_detection() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(is_empty_dir(dir.path()));
        assert!(is_empty_dir(&dir.path().join("missing")));
        std::fs::write(dir.path().join("x"), "").expect("write");
        assert!(!is_empty_dir(dir.path()));
    }
}
