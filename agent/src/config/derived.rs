//! Values derived from the configuration (temporary home until the loader lands).

use std::path::PathBuf;

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
