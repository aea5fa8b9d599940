//! The configuration files the agent manages in the data directory.
//!
//! As Patroni does, initdb's `postgresql.conf` is kept as `postgresql.base.conf` and included from
//! the `postgresql.conf` we write, so our settings win and the user's initdb defaults survive.
//! Precedence of parameters: pgwarden's required settings < the DCS `config` (cluster-wide) <
//! the local file's `postgresql.parameters` < settings that must follow `postgresql.listen`.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::{Config, DynamicConfig, PgValue};

/// Marks files we own, so a human knows edits will be overwritten.
const HEADER: &str =
    "# Managed by pgwarden: edits are overwritten. Change the configuration instead.\n";

/// `recovery_target_timeline` as replicas follow a leader (postgres' default since 12).
pub const DEFAULT_RECOVERY_TARGET_TIMELINE: &str = "latest";

/// Standby settings written when postgres runs as a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbySettings {
    pub primary_conninfo: Option<String>,
    pub primary_slot_name: Option<String>,
    pub recovery_target_timeline: String,
}

/// Everything rendered into the data directory before a start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedFiles {
    pub parameters: BTreeMap<String, String>,
    pub pg_hba: Vec<String>,
    pub standby: Option<StandbySettings>,
    /// The password file `primary_conninfo`, pg_basebackup and pg_rewind read: written with
    /// the other files, so a standby finds it before postgres starts or reloads.
    pub pgpass: Option<super::replica::Pgpass>,
}

/// Splits Patroni's `host[,host...]:port` listen value.
pub fn split_listen(listen: &str) -> (String, Option<u16>) {
    match listen.rsplit_once(':') {
        Some((hosts, port)) if port.parse::<u16>().is_ok() => {
            (hosts.to_owned(), port.parse::<u16>().ok())
        }
        _ => (listen.to_owned(), None),
    }
}

/// The parameters postgres runs with, in precedence order. `archive` holds the archiving
/// settings of the backup layer (`crate::backup::archive_parameters`), empty without one.
pub fn parameters(
    config: &Config,
    dynamic: &DynamicConfig,
    archive: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut params: BTreeMap<String, String> = [
        ("wal_level", "replica"),
        ("hot_standby", "on"),
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("wal_log_hints", "on"),
        ("max_connections", "100"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    params.insert("cluster_name".into(), config.scope.clone());
    params.extend(archive.iter().map(|(k, v)| (k.clone(), v.clone())));
    let as_settings = |m: &BTreeMap<String, PgValue>| {
        m.iter()
            .map(|(k, v)| (k.clone(), v.as_setting()))
            .collect::<Vec<_>>()
    };
    params.extend(as_settings(&dynamic.postgresql.parameters));
    params.extend(as_settings(&config.postgresql.parameters));
    // Values replication cannot work with are replaced (the loader and the DCS parser warn).
    for (name, value) in params.iter_mut() {
        if let Some(default) = crate::config::dynamic::managed_replacement(name, value) {
            *value = default.to_owned();
        }
    }
    let major = major_version(&config.postgresql.data_dir);
    translate_for_version(&mut params, major);
    if let Some(major) = major {
        drop_unavailable(&mut params, major);
    }
    let (hosts, port) = split_listen(&config.postgresql.listen);
    if !hosts.is_empty() {
        params.insert("listen_addresses".into(), hosts);
    }
    if let Some(port) = port {
        params.insert("port".into(), port.to_string());
    }
    params
}

/// Removes the parameters major version `major` does not have, with a warning naming each:
/// postgres refuses to start on a parameter it does not know.
fn drop_unavailable(params: &mut BTreeMap<String, String>, major: u32) {
    for (name, why) in super::versioned_params::drop_unavailable(params, major) {
        warn_once(&format!(
            "dropping parameter {name}: PostgreSQL {} does not have it ({why})",
            super::versioned_params::version_name(major)
        ));
    }
}

/// Logs a warning the first time this process sees it (the parameters are rendered every cycle).
fn warn_once(message: &str) {
    static SEEN: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.insert(message.to_owned()) {
        tracing::warn!("{message}");
    }
}

/// Raises the parameters a hot standby needs at least as high as its primary to the values the
/// control file records (Patroni's "effective configuration"): a standby started below them
/// pauses or stops its replay ("insufficient parameter settings"). Returns what was raised.
pub fn raise_to_primary_minimums(
    params: &mut BTreeMap<String, String>,
    control: &crate::postgres::controldata::ControlData,
) -> Vec<String> {
    let mut raised = Vec::new();
    for (name, minimum) in control.hot_standby_minimums() {
        // Only parameters we render: adding a restart-only line a primary's file lacks would
        // leave every promoted standby `pending_restart` (its removal needs a restart too).
        let current = params.get(name).and_then(|v| v.trim().parse::<u64>().ok());
        if current.is_some_and(|c| c < minimum) {
            params.insert(name.to_owned(), minimum.to_string());
            raised.push(format!("{name}={minimum}"));
        }
    }
    raised
}

/// The data directory's major version (`PG_VERSION`: `15`, `9.6`) as 150000 / 90600.
fn major_version(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("PG_VERSION")).ok()?;
    let mut parts = text.trim().split('.');
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next().map_or(Ok(0), str::parse).ok()?;
    Some(major * 10_000 + minor * 100)
}

/// Patroni's cross-version renames, so one configuration serves every major version:
/// `wal_keep_segments` ↔ `wal_keep_size` (13 renamed it; 16 MB segments assumed, as Patroni
/// does) and `wal_level` `hot_standby` ↔ `replica` (9.6). Without a known version (no data
/// directory yet) the current names are used.
fn translate_for_version(params: &mut BTreeMap<String, String>, major: Option<u32>) {
    let major = major.unwrap_or(130_000);
    if let Some(level) = params.get_mut("wal_level") {
        match (level.as_str(), major >= 90_600) {
            ("hot_standby", true) => *level = "replica".into(),
            ("replica", false) => *level = "hot_standby".into(),
            _ => {}
        }
    }
    if major >= 130_000 {
        let segments = params.remove("wal_keep_segments");
        if !params.contains_key("wal_keep_size") {
            let size = segments
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map_or_else(|| "128MB".to_owned(), |n| format!("{}MB", n * 16));
            params.insert("wal_keep_size".into(), size);
        }
    } else {
        let size = params.remove("wal_keep_size");
        if !params.contains_key("wal_keep_segments") {
            let mb = size.as_deref().and_then(size_in_mb).unwrap_or(128);
            params.insert("wal_keep_segments".into(), ((mb + 8) / 16).to_string());
        }
    }
}

/// A size setting (`128MB`, `1GB`, `512`: megabytes without a unit) in megabytes.
fn size_in_mb(value: &str) -> Option<u64> {
    let value = value.trim();
    let digits = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let n: u64 = value[..digits].parse().ok()?;
    match value[digits..].trim().to_ascii_uppercase().as_str() {
        "" | "MB" => Some(n),
        "KB" => Some(n / 1024),
        "GB" => Some(n * 1024),
        "TB" => Some(n * 1024 * 1024),
        _ => None,
    }
}

/// `pg_hba.conf` lines: the local `postgresql.pg_hba`, else the cluster-wide ones from the DCS
/// (where Patroni's sample configuration puts them).
pub fn pg_hba(config: &Config, dynamic: &DynamicConfig) -> Vec<String> {
    if config.postgresql.pg_hba.is_empty() {
        dynamic.postgresql.pg_hba.clone().unwrap_or_default()
    } else {
        config.postgresql.pg_hba.clone()
    }
}

fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Renders `postgresql.conf`.
pub fn render_postgresql_conf(files: &ManagedFiles) -> String {
    let mut out = String::from(HEADER);
    out.push_str("include 'postgresql.base.conf'\n\n");
    for (name, value) in &files.parameters {
        out.push_str(&format!("{name} = {}\n", quote(value)));
    }
    if let Some(standby) = &files.standby {
        if let Some(conninfo) = &standby.primary_conninfo {
            out.push_str(&format!("primary_conninfo = {}\n", quote(conninfo)));
        }
        if let Some(slot) = &standby.primary_slot_name {
            out.push_str(&format!("primary_slot_name = {}\n", quote(slot)));
        }
    }
    // Written for a primary too: it is a restart-only parameter, and a line removed from the
    // file marks it `pending_restart` even when the value does not change, so every promotion
    // left the new primary "pending restart" (check_patroni CRITICAL). Outside recovery postgres
    // ignores it.
    let timeline = files
        .standby
        .as_ref()
        .map_or(DEFAULT_RECOVERY_TARGET_TIMELINE, |s| {
            s.recovery_target_timeline.as_str()
        });
    out.push_str(&format!("recovery_target_timeline = {}\n", quote(timeline)));
    out
}

/// Renders `pg_hba.conf`; `None` keeps initdb's file.
pub fn render_pg_hba(files: &ManagedFiles) -> Option<String> {
    if files.pg_hba.is_empty() {
        return None;
    }
    let mut out = String::from(HEADER);
    for line in &files.pg_hba {
        out.push_str(line);
        out.push('\n');
    }
    Some(out)
}

/// Writes `content` to a new file readable by its owner only, as postgres keeps its own files.
fn write_private(path: &Path, content: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(content.as_bytes())
}

/// Files written by older versions were world-readable (umask 022): take the others' bits away.
fn make_private(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o007 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o770))?;
    }
    Ok(())
}

fn write_if_changed(path: &Path, content: &str) -> io::Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
        make_private(path)?;
        return Ok(false);
    }
    let tmp = path.with_extension("pgwarden-tmp");
    write_private(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

/// Writes the managed files into `data_dir`; returns whether anything changed.
///
/// `standby.signal` is created or removed to match `files.standby`.
pub fn write(data_dir: &Path, files: &ManagedFiles) -> io::Result<bool> {
    if let Some(pgpass) = &files.pgpass {
        pgpass.write()?;
    }
    let conf = data_dir.join("postgresql.conf");
    let base = data_dir.join("postgresql.base.conf");
    if !base.exists() {
        if conf.exists() {
            std::fs::rename(&conf, &base)?;
        } else {
            write_private(&base, "")?;
        }
    }
    // The parameters were chosen before initdb when bootstrapping: only now is the major
    // version certain.
    let checked;
    let mut files = files;
    if let Some(major) = major_version(data_dir) {
        let mut parameters = files.parameters.clone();
        drop_unavailable(&mut parameters, major);
        if parameters != files.parameters {
            checked = ManagedFiles {
                parameters,
                ..files.clone()
            };
            files = &checked;
        }
    }
    let mut changed = write_if_changed(&conf, &render_postgresql_conf(files))?;
    if let Some(hba) = render_pg_hba(files) {
        changed |= write_if_changed(&data_dir.join("pg_hba.conf"), &hba)?;
    }
    let signal = data_dir.join("standby.signal");
    match (&files.standby, signal.exists()) {
        (Some(_), false) => {
            write_private(&signal, "")?;
            changed = true;
        }
        (None, true) => {
            std::fs::remove_file(&signal)?;
            changed = true;
        }
        _ => {}
    }
    Ok(changed)
}

/// What [`write`] last left in a data directory. The HA loop writes the same files every cycle
/// to undo edits and apply changes; reading them back each time to compare was a sizeable part
/// of an idle cycle. The files' metadata says whether anything touched them since.
#[derive(Debug, Default)]
pub struct LastWrite {
    last: Option<(PathBuf, ManagedFiles, [Option<Stamp>; 5])>,
}

/// Size, inode and change time (which, unlike the modification time, cannot be set back): an
/// edit in place changes the change time, an editor's replace-by-rename the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    ino: u64,
    ctime: (i64, i64),
}

fn stamps(data_dir: &Path, files: &ManagedFiles) -> [Option<Stamp>; 5] {
    let stamp = |path: &Path| {
        std::fs::symlink_metadata(path).ok().map(|m| Stamp {
            len: m.len(),
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    };
    [
        stamp(&data_dir.join("postgresql.conf")),
        stamp(&data_dir.join("pg_hba.conf")),
        stamp(&data_dir.join("postgresql.base.conf")),
        stamp(&data_dir.join("standby.signal")),
        files.pgpass.as_ref().and_then(|p| stamp(&p.path)),
    ]
}

impl LastWrite {
    /// [`write`], answered without reading the files when `files` are what was written last
    /// and none of them was touched since.
    pub fn write(&mut self, data_dir: &Path, files: &ManagedFiles) -> io::Result<bool> {
        let now = stamps(data_dir, files);
        if let Some((dir, last, then)) = &self.last {
            if dir == data_dir && last == files && *then == now {
                return Ok(false);
            }
        }
        self.last = None;
        let changed = write(data_dir, files)?;
        self.last = Some((data_dir.to_owned(), files.clone(), stamps(data_dir, files)));
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_parameters_override_dynamic_and_listen_wins() {
        let mut config = Config {
            scope: "batman".into(),
            ..Default::default()
        };
        config.postgresql.listen = "127.0.0.1,::1:5433".into();
        config
            .postgresql
            .parameters
            .insert("work_mem".into(), PgValue::Text("8MB".into()));
        config
            .postgresql
            .parameters
            .insert("port".into(), PgValue::Int(1));
        let mut dynamic = DynamicConfig::default();
        dynamic
            .postgresql
            .parameters
            .insert("work_mem".into(), PgValue::Text("4MB".into()));
        dynamic
            .postgresql
            .parameters
            .insert("max_connections".into(), PgValue::Int(50));
        let p = parameters(&config, &dynamic, &BTreeMap::new());
        assert_eq!(p["work_mem"], "8MB");
        assert_eq!(p["max_connections"], "50");
        assert_eq!(p["port"], "5433");
        assert_eq!(p["listen_addresses"], "127.0.0.1,::1");
        assert_eq!(p["wal_level"], "replica");
        assert_eq!(p["cluster_name"], "batman");
    }

    #[test]
    fn wal_keep_and_wal_level_follow_the_major_version() {
        let params = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let mut p = params(&[("wal_keep_segments", "100"), ("wal_level", "hot_standby")]);
        translate_for_version(&mut p, Some(150_000));
        assert_eq!(
            p,
            params(&[("wal_keep_size", "1600MB"), ("wal_level", "replica")])
        );
        // A wal_keep_size the user set wins over a translated wal_keep_segments.
        let mut p = params(&[("wal_keep_segments", "100"), ("wal_keep_size", "1GB")]);
        translate_for_version(&mut p, Some(130_000));
        assert_eq!(p, params(&[("wal_keep_size", "1GB")]));
        let mut p = params(&[]);
        translate_for_version(&mut p, None);
        assert_eq!(p, params(&[("wal_keep_size", "128MB")]));
        let mut p = params(&[("wal_keep_size", "1GB"), ("wal_level", "replica")]);
        translate_for_version(&mut p, Some(120_000));
        assert_eq!(
            p,
            params(&[("wal_keep_segments", "64"), ("wal_level", "replica")])
        );
        let mut p = params(&[("wal_level", "replica")]);
        translate_for_version(&mut p, Some(90_500));
        assert_eq!(
            p,
            params(&[("wal_keep_segments", "8"), ("wal_level", "hot_standby")])
        );
    }

    #[test]
    fn values_are_quoted_and_escaped() {
        let files = ManagedFiles {
            parameters: [("application_name".to_owned(), "it's".to_owned())].into(),
            pg_hba: vec![],
            standby: None,
            pgpass: None,
        };
        let text = render_postgresql_conf(&files);
        assert!(text.contains("application_name = 'it''s'"));
        assert!(text.contains("include 'postgresql.base.conf'"));
        assert_eq!(render_pg_hba(&files), None);
    }

    /// A promotion must not remove the restart-only `recovery_target_timeline` line: postgres
    /// would report it `pending_restart` although its value is the same.
    #[test]
    fn promotion_keeps_recovery_target_timeline_in_the_file() {
        let standby = ManagedFiles {
            parameters: BTreeMap::new(),
            pg_hba: vec![],
            pgpass: None,
            standby: Some(StandbySettings {
                primary_conninfo: Some("host=a".into()),
                primary_slot_name: Some("pg1".into()),
                recovery_target_timeline: DEFAULT_RECOVERY_TARGET_TIMELINE.into(),
            }),
        };
        let primary = ManagedFiles {
            standby: None,
            ..standby.clone()
        };
        let line = "recovery_target_timeline = 'latest'\n";
        assert!(render_postgresql_conf(&standby).contains(line));
        assert!(render_postgresql_conf(&primary).contains(line));
        assert!(!render_postgresql_conf(&primary).contains("primary_conninfo"));
    }

    #[test]
    fn a_repeated_write_undoes_edits_made_since_the_last_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = ManagedFiles {
            parameters: [("work_mem".to_owned(), "4MB".to_owned())].into(),
            pg_hba: vec!["local all all trust".into()],
            standby: Some(StandbySettings {
                primary_conninfo: None,
                primary_slot_name: None,
                recovery_target_timeline: "latest".into(),
            }),
            pgpass: None,
        };
        let mut last = LastWrite::default();
        assert!(last.write(dir.path(), &files).expect("first"));
        assert!(!last.write(dir.path(), &files).expect("unchanged"));
        let conf = dir.path().join("postgresql.conf");
        let managed = std::fs::read_to_string(&conf).expect("read");

        // Edited in place, same size.
        std::fs::write(&conf, managed.replace("4MB", "8MB")).expect("edit");
        assert!(last.write(dir.path(), &files).expect("after an edit"));
        assert_eq!(std::fs::read_to_string(&conf).expect("read"), managed);

        // Replaced by another file.
        let other = dir.path().join("other");
        std::fs::write(&other, "work_mem = '1MB'\n").expect("other");
        std::fs::rename(&other, &conf).expect("rename");
        assert!(last.write(dir.path(), &files).expect("after a replace"));
        assert_eq!(std::fs::read_to_string(&conf).expect("read"), managed);

        std::fs::remove_file(dir.path().join("standby.signal")).expect("remove");
        assert!(last.write(dir.path(), &files).expect("after a removal"));
        assert!(dir.path().join("standby.signal").exists());

        // New files are written whatever the stamps say.
        let mut primary = files.clone();
        primary.standby = None;
        assert!(last.write(dir.path(), &primary).expect("primary"));
        assert!(!dir.path().join("standby.signal").exists());
        assert!(!last.write(dir.path(), &primary).expect("unchanged"));
    }

    #[test]
    fn write_keeps_initdb_conf_as_base_and_manages_standby_signal() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("postgresql.conf"), "shared_buffers = 1MB\n").expect("seed");
        let mut files = ManagedFiles {
            parameters: BTreeMap::new(),
            pg_hba: vec!["local all all trust".into()],
            standby: Some(StandbySettings {
                primary_conninfo: Some("host=a".into()),
                primary_slot_name: None,
                recovery_target_timeline: "latest".into(),
            }),
            pgpass: None,
        };
        assert!(write(dir.path(), &files).expect("write"));
        use std::os::unix::fs::PermissionsExt;
        let mode = |name: &str| {
            std::fs::metadata(dir.path().join(name))
                .expect("written")
                .permissions()
                .mode()
                & 0o777
        };
        // primary_conninfo and pg_hba.conf are nobody else's business.
        assert_eq!(mode("postgresql.conf"), 0o600);
        assert_eq!(mode("pg_hba.conf"), 0o600);
        std::fs::set_permissions(
            dir.path().join("postgresql.conf"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        assert!(!write(dir.path(), &files).expect("unchanged"));
        assert_eq!(mode("postgresql.conf"), 0o640);
        assert!(
            std::fs::read_to_string(dir.path().join("postgresql.base.conf"))
                .expect("base")
                .contains("shared_buffers")
        );
        assert!(dir.path().join("standby.signal").exists());
        assert!(!write(dir.path(), &files).expect("rewrite"));
        files.standby = None;
        assert!(write(dir.path(), &files).expect("write primary"));
        assert!(!dir.path().join("standby.signal").exists());
    }

    #[test]
    fn split_listen_handles_host_lists() {
        assert_eq!(
            split_listen("0.0.0.0:5432"),
            ("0.0.0.0".to_owned(), Some(5432))
        );
        assert_eq!(split_listen("localhost"), ("localhost".to_owned(), None));
    }
}
