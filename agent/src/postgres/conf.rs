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

/// The parameters postgres runs with, in precedence order.
pub fn parameters(config: &Config, dynamic: &DynamicConfig) -> BTreeMap<String, String> {
    let mut params: BTreeMap<String, String> = [
        ("wal_level", "replica"),
        ("hot_standby", "on"),
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("wal_keep_size", "128MB"),
        ("wal_log_hints", "on"),
        ("max_connections", "100"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    params.insert("cluster_name".into(), config.scope.clone());
    if let Some(pb) = &config.pgbackrest {
        params.extend(crate::backup::render::archive_parameters(
            &pb.resolve(config),
        ));
    }
    let as_settings = |m: &BTreeMap<String, PgValue>| {
        m.iter()
            .map(|(k, v)| (k.clone(), v.as_setting()))
            .collect::<Vec<_>>()
    };
    params.extend(as_settings(&dynamic.postgresql.parameters));
    params.extend(as_settings(&config.postgresql.parameters));
    let (hosts, port) = split_listen(&config.postgresql.listen);
    if !hosts.is_empty() {
        params.insert("listen_addresses".into(), hosts);
    }
    if let Some(port) = port {
        params.insert("port".into(), port.to_string());
    }
    params
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

fn write_if_changed(path: &Path, content: &str) -> io::Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
        return Ok(false);
    }
    let tmp = path.with_extension("pgwarden-tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

/// Writes the managed files into `data_dir`; returns whether anything changed.
///
/// `standby.signal` is created or removed to match `files.standby`.
pub fn write(data_dir: &Path, files: &ManagedFiles) -> io::Result<bool> {
    let conf = data_dir.join("postgresql.conf");
    let base = data_dir.join("postgresql.base.conf");
    if !base.exists() {
        if conf.exists() {
            std::fs::rename(&conf, &base)?;
        } else {
            std::fs::write(&base, "")?;
        }
    }
    let mut changed = write_if_changed(&conf, &render_postgresql_conf(files))?;
    if let Some(hba) = render_pg_hba(files) {
        changed |= write_if_changed(&data_dir.join("pg_hba.conf"), &hba)?;
    }
    let signal = data_dir.join("standby.signal");
    match (&files.standby, signal.exists()) {
        (Some(_), false) => {
            std::fs::write(&signal, "")?;
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
    last: Option<(PathBuf, ManagedFiles, [Option<Stamp>; 4])>,
}

/// Size, inode and change time (which, unlike the modification time, cannot be set back): an
/// edit in place changes the change time, an editor's replace-by-rename the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    ino: u64,
    ctime: (i64, i64),
}

fn stamps(data_dir: &Path) -> [Option<Stamp>; 4] {
    [
        "postgresql.conf",
        "pg_hba.conf",
        "postgresql.base.conf",
        "standby.signal",
    ]
    .map(|name| {
        std::fs::metadata(data_dir.join(name)).ok().map(|m| Stamp {
            len: m.len(),
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    })
}

impl LastWrite {
    /// [`write`], answered without reading the files when `files` are what was written last
    /// and none of them was touched since.
    pub fn write(&mut self, data_dir: &Path, files: &ManagedFiles) -> io::Result<bool> {
        let now = stamps(data_dir);
        if let Some((dir, last, then)) = &self.last {
            if dir == data_dir && last == files && *then == now {
                return Ok(false);
            }
        }
        self.last = None;
        let changed = write(data_dir, files)?;
        self.last = Some((data_dir.to_owned(), files.clone(), stamps(data_dir)));
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
        let p = parameters(&config, &dynamic);
        assert_eq!(p["work_mem"], "8MB");
        assert_eq!(p["max_connections"], "50");
        assert_eq!(p["port"], "5433");
        assert_eq!(p["listen_addresses"], "127.0.0.1,::1");
        assert_eq!(p["wal_level"], "replica");
        assert_eq!(p["cluster_name"], "batman");
    }

    #[test]
    fn values_are_quoted_and_escaped() {
        let files = ManagedFiles {
            parameters: [("application_name".to_owned(), "it's".to_owned())].into(),
            pg_hba: vec![],
            standby: None,
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
        };
        assert!(write(dir.path(), &files).expect("write"));
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
