//! The copy of the cluster-wide configuration kept in the data directory
//! (`patroni.dynamic.json`, as Patroni keeps it), so that a DCS that lost its `config` key
//! (`patronictl remove`, an etcd wiped and restarted empty) gets the configuration back as it was
//! last applied, not as `bootstrap.dcs` described a new cluster.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The file's name in the data directory (Patroni's).
pub const FILE_NAME: &str = "patroni.dynamic.json";

/// Writes `value` to the data directory, replacing the previous copy atomically. Nothing is
/// written into a directory that holds no cluster yet: initdb and pg_basebackup need it empty.
pub fn save(data_dir: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    if !data_dir.join("PG_VERSION").exists() {
        return Ok(());
    }
    let text = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let tmp = data_dir.join(format!("{FILE_NAME}.tmp"));
    {
        // The configuration may name passwords (e.g. in `standby_cluster`): owner only.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, data_dir.join(FILE_NAME))
}

/// The kept copy, if there is one that parses as a JSON object.
pub fn load(data_dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read(data_dir.join(FILE_NAME)).ok()?;
    serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .filter(serde_json::Value::is_object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_copy_loads_back_and_nothing_is_written_before_initdb() {
        let dir = tempfile::tempdir().expect("tempdir");
        let value =
            serde_json::json!({"ttl": 20, "postgresql": {"parameters": {"work_mem": "8MB"}}});
        save(dir.path(), &value).expect("save");
        assert!(
            !dir.path().join(FILE_NAME).exists(),
            "an empty data directory stays empty"
        );
        std::fs::write(dir.path().join("PG_VERSION"), "15\n").expect("PG_VERSION");
        save(dir.path(), &value).expect("save");
        assert_eq!(load(dir.path()), Some(value));
        std::fs::write(dir.path().join(FILE_NAME), "not json").expect("write");
        assert_eq!(load(dir.path()), None);
    }
}
