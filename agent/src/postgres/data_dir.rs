//! The data directory's life around a bootstrap, whatever its method (initdb, pgBackRest,
//! a custom command): made empty and private before, marked while unfinished, set aside when
//! it failed, so that a restart never takes a half-made cluster for a real one.

use std::path::Path;

use tracing::warn;

/// Creates `dir` if needed and makes it 0700: postgres refuses a data directory others can
/// read.
pub fn make_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Makes sure `data_dir` is an empty 0700 directory; returns whether it had to be created (a
/// failed bootstrap then removes it instead of moving it aside).
pub fn prepare_empty(data_dir: &Path) -> Result<bool, String> {
    if !crate::postgres::initdb::is_empty_dir(data_dir) {
        return Err(format!(
            "data directory {} is not empty; refusing to bootstrap over existing files",
            data_dir.display()
        ));
    }
    let created = !data_dir.exists();
    make_private(data_dir).map_err(|e| format!("cannot prepare {}: {e}", data_dir.display()))?;
    Ok(created)
}

/// Marks a data directory whose bootstrap from a backup has not finished: an agent killed in
/// the middle leaves it behind, and the next start sets the directory aside instead of taking
/// a half-recovered cluster for a real one.
pub const UNFINISHED_MARKER: &str = "pgwarden.bootstrap-unfinished";

/// Gets a failed bootstrap's data directory out of the way, so that the next start restores
/// afresh: removed when the agent created it, otherwise renamed to
/// `<data_dir>.failed-<UTC time>` and replaced by an empty directory (a mount point that
/// cannot be renamed is emptied). Returns what was done, for the error message.
pub fn set_aside(data_dir: &Path, created: bool) -> String {
    if created {
        return match std::fs::remove_dir_all(data_dir) {
            Ok(()) => format!("the data directory {} was removed", data_dir.display()),
            Err(e) => {
                clear_dir(data_dir);
                format!(
                    "the data directory {} was emptied ({e})",
                    data_dir.display()
                )
            }
        };
    }
    let mut aside = data_dir.as_os_str().to_owned();
    aside.push(format!(
        ".failed-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    let aside = std::path::PathBuf::from(aside);
    match std::fs::rename(data_dir, &aside) {
        Ok(()) => {
            let _ = make_private(data_dir);
            format!(
                "the data directory was moved aside to {} (delete it when no longer needed)",
                aside.display()
            )
        }
        Err(e) => {
            clear_dir(data_dir);
            format!(
                "the data directory {} was emptied (it could not be moved aside: {e})",
                data_dir.display()
            )
        }
    }
}

/// After a failed bootstrap: stops the postgres it may have started (immediately: nothing in
/// it is worth a checkpoint), forgets the probe's connection and sets the directory aside
/// ([`set_aside`]). Returns what was done, for the error message.
pub async fn abandon_bootstrap(
    supervisor: &super::supervisor::Supervisor,
    probe: &super::probe::Probe,
    data_dir: &Path,
    created: bool,
) -> String {
    if supervisor.state().is_running() {
        let _ = supervisor
            .stop(
                super::supervisor::StopMode::Immediate,
                std::time::Duration::from_secs(30),
            )
            .await;
    }
    probe.reset().await;
    set_aside(data_dir, created)
}

/// At start: a data directory still marked by an interrupted bootstrap from a backup (the
/// agent died during recovery) is set aside, so the bootstrap runs again from the start.
pub fn discard_unfinished_bootstrap(data_dir: &Path) -> Option<String> {
    if !data_dir.join(UNFINISHED_MARKER).exists() {
        return None;
    }
    if data_dir.join("postmaster.pid").exists() {
        // A postgres may still run on it (its agent died without PDEATHSIG reaching it):
        // leave the directory alone and let postgres' own lock file protect it.
        warn!(data_dir = %data_dir.display(), "the data directory is from an unfinished bootstrap, but postmaster.pid exists; leaving it");
        return None;
    }
    let what = set_aside(data_dir, false);
    warn!(data_dir = %data_dir.display(), outcome = %what, "the data directory is from a bootstrap from a backup that did not finish; it is set aside and the bootstrap runs again");
    Some(what)
}

/// Removes everything inside `dir`, keeping `dir` itself (a mount point cannot be removed).
pub fn clear_dir(dir: &Path) {
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

/// Starts the recovery settings a custom bootstrap's `recovery_conf` writes at the end of
/// `postgresql.auto.conf` ([`super::custom_bootstrap`]); everything after it is theirs.
pub const RECOVERY_BLOCK_HEADER: &str =
    "# Recovery settings of the custom bootstrap, written by pgwarden";

/// Removes the recovery settings a bootstrap left in `postgresql.auto.conf`: pgBackRest's
/// (`restore_command`, `recovery_target*`) and our [`RECOVERY_BLOCK_HEADER`] block; returns
/// whether any were there.
pub fn strip_recovery_settings(data_dir: &Path) -> std::io::Result<bool> {
    let path = data_dir.join("postgresql.auto.conf");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let block = text.find(RECOVERY_BLOCK_HEADER);
    let head = &text[..block.unwrap_or(text.len())];
    let keep: Vec<&str> = head
        .lines()
        .filter(|line| {
            let key = line.split('=').next().unwrap_or("").trim();
            !(key == "restore_command"
                || key.starts_with("recovery_target")
                || line.starts_with("# Recovery settings generated by pgBackRest"))
        })
        .collect();
    if block.is_none() && keep.len() == head.lines().count() {
        return Ok(false);
    }
    let mut out = keep.join("\n");
    out.push('\n');
    std::fs::write(&path, out)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_settings_written_by_a_restore_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("postgresql.auto.conf"),
            "# Do not edit this file manually!\nwork_mem = '8MB'\n\n\
             # Recovery settings generated by pgBackRest restore on 2026-01-01 00:00:00\n\
             restore_command = 'pgbackrest --stanza=a archive-get %f \"%p\"'\n\
             recovery_target_time = '2026-01-01 00:00:00+00'\nrecovery_target_action = 'promote'\n",
        )
        .expect("write");
        assert!(strip_recovery_settings(dir.path()).expect("strip"));
        let text = std::fs::read_to_string(dir.path().join("postgresql.auto.conf")).expect("read");
        assert!(text.contains("work_mem = '8MB'"));
        assert!(!text.contains("restore_command"));
        assert!(!text.contains("recovery_target"));
        assert!(!strip_recovery_settings(dir.path()).expect("strip again"));
    }

    #[test]
    fn a_failed_restore_is_removed_when_created_and_moved_aside_otherwise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        assert!(prepare_empty(&data).expect("prepare"));
        std::fs::write(data.join("PG_VERSION"), "15").expect("write");
        assert!(set_aside(&data, true).contains("removed"));
        assert!(!data.exists());

        std::fs::create_dir(&data).expect("mkdir");
        assert!(!prepare_empty(&data).expect("prepare"));
        std::fs::write(data.join("PG_VERSION"), "15").expect("write");
        std::fs::write(data.join(UNFINISHED_MARKER), "").expect("write");
        // At start, an unfinished bootstrap's directory is set aside too.
        let what = discard_unfinished_bootstrap(&data).expect("set aside");
        assert!(what.contains("moved aside"), "{what}");
        assert!(crate::postgres::initdb::is_empty_dir(&data));
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("data.failed-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert!(aside[0].path().join("PG_VERSION").exists());
        assert!(discard_unfinished_bootstrap(&data).is_none());
    }
}
