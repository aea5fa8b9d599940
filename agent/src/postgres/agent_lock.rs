//! One agent per data directory, and a restarted agent after its predecessor's fence guard.
//!
//! The agent takes an exclusive `flock` on `<data_dir>.pgwarden.lock` (next to the data
//! directory, which may not exist yet) before it touches postgres, and hands the descriptor to
//! its fence guard. After a crash the guard keeps holding the lock while it proves postgres
//! stopped and releases the leader ([`super::crash_release`]); a restarted agent (systemd's
//! `Restart=`) waits for it, so nothing starts postgres — as a primary or at all — while the
//! release is under way.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

/// The lock is held by this value (and by the fence guard, which inherits its descriptor).
#[derive(Debug)]
pub struct AgentLock {
    lock: Flock<File>,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open the lock file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error(
        "{path} stayed locked for {waited:?}: another pgwarden agent (or its fence guard) uses \
         this data directory"
    )]
    Busy { path: PathBuf, waited: Duration },
}

impl AgentLock {
    /// The lock file of `data_dir`.
    pub fn path_for(data_dir: &Path) -> PathBuf {
        let mut name = data_dir
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "data".into());
        name.push(".pgwarden.lock");
        data_dir.with_file_name(name)
    }

    /// Takes the lock, waiting up to `patience` for a previous holder (a fence guard finishing
    /// a crash release needs a few seconds at most).
    pub async fn acquire(data_dir: &Path, patience: Duration) -> Result<AgentLock, LockError> {
        let path = Self::path_for(data_dir);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // As initdb would: the data directory's parent may not exist on a fresh host.
            let _ = std::fs::create_dir_all(parent);
        }
        let started = Instant::now();
        let mut announced = false;
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| LockError::Open {
                    path: path.clone(),
                    source,
                })?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    if announced {
                        info!(path = %path.display(), waited = ?started.elapsed(), "took the data directory's lock");
                    }
                    return Ok(AgentLock { lock, path });
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    let waited = started.elapsed();
                    if waited >= patience {
                        return Err(LockError::Busy { path, waited });
                    }
                    if !announced {
                        announced = true;
                        warn!(
                            path = %path.display(),
                            "the data directory is locked, by the fence guard of an agent that \
                             died (it is releasing the leader) or by another agent; waiting"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((_, source)) => return Err(LockError::Lock { path, source }),
            }
        }
    }

    pub fn file(&self) -> &File {
        &self.lock
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_sits_next_to_the_data_directory() {
        assert_eq!(
            AgentLock::path_for(Path::new("/var/lib/postgresql/15/main")),
            PathBuf::from("/var/lib/postgresql/15/main.pgwarden.lock")
        );
    }

    #[tokio::test]
    async fn a_second_agent_waits_and_then_gives_up() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let first = AgentLock::acquire(&data, Duration::ZERO)
            .await
            .expect("first");
        let second = AgentLock::acquire(&data, Duration::from_millis(50)).await;
        assert!(matches!(second, Err(LockError::Busy { .. })), "{second:?}");
        drop(first);
        AgentLock::acquire(&data, Duration::ZERO)
            .await
            .expect("free again");
    }
}
