//! Values derived from the configuration (temporary home until the loader lands).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::schema::{Config, Credentials};

impl Credentials {
    /// The role's libpq TLS options for a conninfo string, `sslmode` first (default `prefer`,
    /// libpq's own default).
    pub fn ssl_options(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![(
            "sslmode",
            self.sslmode.clone().unwrap_or_else(|| "prefer".into()),
        )];
        for (key, path) in [
            ("sslcert", &self.sslcert),
            ("sslkey", &self.sslkey),
            ("sslrootcert", &self.sslrootcert),
            ("sslcrl", &self.sslcrl),
        ] {
            if let Some(p) = path {
                out.push((key, p.display().to_string()));
            }
        }
        out
    }
}

impl Config {
    /// Tags as Patroni publishes them: predefined boolean tags only when true (`nofailover`
    /// also with `failover_priority`, a written `nosync` also with `sync_priority`), each as it
    /// was written (`"true"` stays a string).
    pub fn effective_tags(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut tags = serde_json::Map::new();
        let t = &self.tags;
        let given =
            |key: &str, parsed: serde_json::Value| t.given.get(key).cloned().unwrap_or(parsed);
        if t.nofailover || t.failover_priority.is_some() {
            tags.insert(
                "nofailover".into(),
                given("nofailover", t.nofailover.into()),
            );
        }
        if let Some(p) = t.failover_priority {
            tags.insert(
                "failover_priority".into(),
                given("failover_priority", p.into()),
            );
        }
        // Patroni publishes a written `nosync: false` next to `sync_priority`: both are needed
        // to see which one wins.
        if t.nosync || (t.sync_priority.is_some() && t.given.contains_key("nosync")) {
            tags.insert("nosync".into(), given("nosync", t.nosync.into()));
        }
        if let Some(p) = t.sync_priority {
            tags.insert("sync_priority".into(), given("sync_priority", p.into()));
        }
        for (k, v) in [
            ("noloadbalance", t.noloadbalance),
            ("clonefrom", t.clonefrom),
            ("nostream", t.nostream),
        ] {
            if v {
                tags.insert(k.into(), given(k, true.into()));
            }
        }
        if let Some(r) = &t.replicatefrom {
            tags.insert("replicatefrom".into(), r.clone().into());
        }
        for (k, v) in &t.custom {
            tags.insert(k.clone(), v.clone());
        }
        tags
    }

    /// Directory of the postgres binaries.
    pub fn postgres_bin_dir(&self) -> PathBuf {
        if let Some(dir) = &self.postgresql.bin_dir {
            return dir.clone();
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("postgres").is_file() && dir.join("pg_controldata").is_file() {
                    return dir;
                }
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("postgres").is_file().then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|(_, p)| p)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
    }

    /// The binaries of every major version this member may run ([`BinDirs`]).
    pub fn postgres_bin_dirs(&self) -> BinDirs {
        BinDirs {
            default: self.postgres_bin_dir(),
            by_major: self.postgresql.bin_dirs.clone(),
        }
    }

    pub fn api_url(&self) -> String {
        let scheme = if self.restapi.certfile.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/patroni", self.restapi.connect_address)
    }

    pub fn conn_url(&self) -> String {
        format!("postgres://{}/postgres", self.postgresql.connect_address)
    }
}

/// Which binaries run a data directory: those of its major version (`postgresql.bin_dirs`),
/// else `postgresql.bin_dir`. Resolved at each use, not once at start, so a data directory
/// upgraded to a new major version ([`crate::postgres::upgrade`]) runs on the new binaries
/// from the next start of postgres on, and any restart of any member picks the binaries of
/// the data it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinDirs {
    pub default: PathBuf,
    pub by_major: BTreeMap<u32, PathBuf>,
}

impl BinDirs {
    /// The binaries for `data_dir`: its `PG_VERSION`'s entry, else the default; a directory
    /// without a cluster yet (initdb, a clone) gets the newest entry: new data is made with
    /// the newest binaries, and pg_basebackup reads servers of older versions too.
    pub fn for_data_dir(&self, data_dir: &Path) -> PathBuf {
        match crate::postgres::upgrade::data_dir_major(data_dir) {
            Ok(major) => self.by_major.get(&major).unwrap_or(&self.default).clone(),
            Err(_) => self.newest().clone(),
        }
    }

    /// The newest entry, else the default.
    pub fn newest(&self) -> &PathBuf {
        self.by_major
            .last_key_value()
            .map(|(_, dir)| dir)
            .unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_runs_on_its_versions_binaries_and_new_data_on_the_newest() {
        let dirs = BinDirs {
            default: PathBuf::from("/default/bin"),
            by_major: [(15, "/pg15/bin"), (17, "/pg17/bin")]
                .into_iter()
                .map(|(v, p)| (v, PathBuf::from(p)))
                .collect(),
        };
        let data = tempfile::tempdir().expect("tempdir");
        // No cluster yet (initdb, a clone): the newest.
        assert_eq!(dirs.for_data_dir(data.path()), PathBuf::from("/pg17/bin"));
        std::fs::write(data.path().join("PG_VERSION"), "15\n").expect("write");
        assert_eq!(dirs.for_data_dir(data.path()), PathBuf::from("/pg15/bin"));
        // Upgraded: the next start picks 17.
        std::fs::write(data.path().join("PG_VERSION"), "17\n").expect("write");
        assert_eq!(dirs.for_data_dir(data.path()), PathBuf::from("/pg17/bin"));
        // A version without an entry: `bin_dir`.
        std::fs::write(data.path().join("PG_VERSION"), "16\n").expect("write");
        assert_eq!(
            dirs.for_data_dir(data.path()),
            PathBuf::from("/default/bin")
        );
        assert_eq!(dirs.newest(), &PathBuf::from("/pg17/bin"));

        let single = BinDirs {
            default: PathBuf::from("/only/bin"),
            by_major: BTreeMap::new(),
        };
        assert_eq!(single.for_data_dir(data.path()), PathBuf::from("/only/bin"));
        assert_eq!(single.newest(), &PathBuf::from("/only/bin"));
    }

    #[test]
    fn bin_dirs_are_read_by_major_version() {
        let config: Config = serde_yaml::from_str(
            "postgresql:\n  bin_dirs:\n    15: /usr/lib/postgresql/15/bin\n    17: /opt/pg17/bin\n",
        )
        .expect("yaml");
        assert_eq!(
            config.postgresql.bin_dirs.get(&17),
            Some(&PathBuf::from("/opt/pg17/bin"))
        );
        assert_eq!(
            config.postgres_bin_dirs().newest(),
            &PathBuf::from("/opt/pg17/bin")
        );
    }
}
