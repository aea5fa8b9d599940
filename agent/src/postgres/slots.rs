//! Replication slots on the postgres side: what the local postgres has, the SQL that creates,
//! drops and advances them, and the copy of a logical slot from the primary that Patroni does
//! on PostgreSQL before 17 (`SlotsHandler.copy_logical_slots`): the slot's `state` file is read
//! from the primary with `pg_read_binary_file` and written into this data directory while
//! postgres is stopped, so the next start loads the slot.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

use super::probe::quote_literal;
use super::replica::Upstream;

/// Errors of the slot operations that do not go through the local probe.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The primary could not be reached with pg_rewind's (else the superuser's) credentials.
    #[error("cannot connect to the primary {primary}")]
    ConnectPrimary {
        primary: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The query on the primary failed (a slot vanished, permissions).
    #[error("cannot read the slots of the primary {primary}")]
    ReadPrimary {
        primary: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The primary did not answer in time.
    #[error("the primary {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    /// The slot's state was not read along (a bug: the caller asked without it).
    #[error("no state file was read for the slot {0}")]
    NoState(String),
    /// Writing the slot directory failed.
    #[error("cannot write {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A slot's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotType {
    Physical,
    Logical,
}

impl SlotType {
    /// As `pg_replication_slots.slot_type` and `ignore_slots` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotType::Physical => "physical",
            SlotType::Logical => "logical",
        }
    }

    fn parse(text: &str) -> SlotType {
        if text == "logical" {
            SlotType::Logical
        } else {
            SlotType::Physical
        }
    }
}

/// One non-temporary slot of `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationSlot {
    pub name: String,
    pub kind: SlotType,
    pub database: Option<String>,
    pub plugin: Option<String>,
    pub active: bool,
    pub confirmed_flush_lsn: Option<u64>,
    pub catalog_xmin: Option<u64>,
    /// `wal_status = 'lost'`.
    pub wal_lost: bool,
    /// The oldest WAL the slot retains; `None` for a physical slot created without reserving
    /// WAL that nobody streamed from yet.
    pub restart_lsn: Option<u64>,
    /// The oldest transaction a physical slot's `hot_standby_feedback` holds back.
    pub xmin: Option<u64>,
}

/// The local listing, read through the probe's connection.
pub const LIST_QUERY: &str = "SELECT slot_name::text, slot_type::text, database::text, \
     plugin::text, active, (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint, \
     catalog_xmin::text::bigint, coalesce(wal_status = 'lost', false), \
     (restart_lsn - '0/0'::pg_lsn)::bigint, xmin::text::bigint \
     FROM pg_catalog.pg_replication_slots WHERE NOT temporary";

/// Reads one row of [`LIST_QUERY`].
pub fn from_row(row: &tokio_postgres::Row) -> Result<ReplicationSlot, tokio_postgres::Error> {
    let lsn = |i: usize| -> Result<Option<u64>, tokio_postgres::Error> {
        Ok(row
            .try_get::<_, Option<i64>>(i)?
            .and_then(|v| u64::try_from(v).ok()))
    };
    Ok(ReplicationSlot {
        name: row.try_get(0)?,
        kind: SlotType::parse(&row.try_get::<_, String>(1)?),
        database: row.try_get(2)?,
        plugin: row.try_get(3)?,
        active: row.try_get(4)?,
        confirmed_flush_lsn: lsn(5)?,
        catalog_xmin: lsn(6)?,
        wal_lost: row.try_get(7)?,
        restart_lsn: lsn(8)?,
        xmin: lsn(9)?,
    })
}

/// An LSN as postgres writes it.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Drops `name` unless it became active meanwhile (as Patroni's `drop_replication_slot`).
pub fn drop_sql(name: &str) -> String {
    format!(
        "SELECT pg_catalog.pg_drop_replication_slot(slot_name) \
         FROM pg_catalog.pg_replication_slots WHERE slot_name = {} AND NOT active",
        quote_literal(name)
    )
}

/// Creates the physical slot `name` if it is still missing, reserving WAL at once (as
/// Patroni does): a member that is away, or a slot a replica keeps for after a failover,
/// retains WAL before anyone streams from it.
pub fn create_physical_sql(name: &str) -> String {
    format!(
        "SELECT pg_catalog.pg_create_physical_replication_slot({0}, true) WHERE NOT EXISTS \
         (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = {0})",
        quote_literal(name)
    )
}

/// Creates the logical slot `name` if it is still missing; runs in the slot's database.
pub fn create_logical_sql(name: &str, plugin: &str) -> String {
    format!(
        "SELECT pg_catalog.pg_create_logical_replication_slot({0}, {1}) WHERE NOT EXISTS \
         (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = {0})",
        quote_literal(name),
        quote_literal(plugin)
    )
}

/// Advances the slot `name` to `lsn`; runs in the slot's database.
pub fn advance_sql(name: &str, lsn: u64) -> String {
    format!(
        "SELECT pg_catalog.pg_replication_slot_advance({}, {})",
        quote_literal(name),
        quote_literal(&format_lsn(lsn))
    )
}

/// A slot as the primary has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimarySlot {
    pub name: String,
    pub kind: SlotType,
    pub database: Option<String>,
    pub plugin: Option<String>,
    pub catalog_xmin: Option<u64>,
    pub confirmed_flush_lsn: Option<u64>,
    /// The content of `pg_replslot/<name>/state`, when asked for.
    pub state: Option<Vec<u8>>,
}

/// Reads the slots `names` from the primary `primary` (Patroni's query of
/// `copy_logical_slots` and `check_logical_slots_readiness`), with their state files when
/// `with_state`. A primary in recovery answers no rows: it is not the primary any more.
pub async fn read_from_primary(
    config: &Config,
    primary: &Upstream,
    names: &[String],
    with_state: bool,
    timeout: Duration,
) -> Result<Vec<PrimarySlot>, SlotError> {
    // Patroni reads with pg_rewind's credentials, which may read files of the data directory.
    let auth = &config.postgresql.authentication;
    let user = auth.rewind.as_ref().unwrap_or(&auth.superuser);
    let mut pg = tokio_postgres::Config::new();
    pg.host(&primary.host)
        .port(primary.port)
        .user(&user.username)
        .dbname("postgres")
        .application_name("pgwarden slot copy")
        .connect_timeout(timeout);
    if let Some(password) = &user.password {
        pg.password(password);
    }
    let read = async {
        let (client, connection) = pg.connect(tokio_postgres::NoTls).await.map_err(|source| {
            SlotError::ConnectPrimary {
                primary: primary.name.clone(),
                source,
            }
        })?;
        let connection = tokio::spawn(connection);
        let rows = client
            .query(
                "SELECT s.slot_name::text, s.slot_type::text, d.datname::text, s.plugin::text, \
                        s.catalog_xmin::text::bigint, \
                        (s.confirmed_flush_lsn - '0/0'::pg_lsn)::bigint, \
                        CASE WHEN $2 THEN pg_catalog.pg_read_binary_file( \
                            'pg_replslot/' || s.slot_name || '/state') END \
                 FROM pg_catalog.pg_get_replication_slots() s \
                 LEFT JOIN pg_catalog.pg_database d ON s.datoid = d.oid \
                 WHERE NOT pg_catalog.pg_is_in_recovery() AND s.slot_name::text = ANY($1)",
                &[&names, &with_state],
            )
            .await;
        drop(client);
        let _ = connection.await;
        let rows = rows.map_err(|source| SlotError::ReadPrimary {
            primary: primary.name.clone(),
            source,
        })?;
        let as_u64 = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
        rows.iter()
            .map(|row| {
                Ok(PrimarySlot {
                    name: row.try_get(0)?,
                    kind: SlotType::parse(&row.try_get::<_, String>(1)?),
                    database: row.try_get(2)?,
                    plugin: row.try_get(3)?,
                    catalog_xmin: as_u64(row.try_get(4)?),
                    confirmed_flush_lsn: as_u64(row.try_get(5)?),
                    state: row.try_get(6)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|source| SlotError::ReadPrimary {
                primary: primary.name.clone(),
                source,
            })
    };
    tokio::time::timeout(timeout * 2, read)
        .await
        .unwrap_or_else(|_| Err(SlotError::Timeout(primary.name.clone(), timeout * 2)))
}

/// The modes postgres gives new directories and files: with group access when the data
/// directory has it (initdb `--allow-group-access`), as Patroni's `pg_perm`.
fn create_modes(data_dir: &Path) -> (u32, u32) {
    let group = std::fs::metadata(data_dir)
        .map(|m| m.permissions().mode() & 0o050 == 0o050)
        .unwrap_or(false);
    if group {
        (0o750, 0o640)
    } else {
        (0o700, 0o600)
    }
}

fn fsync_dir(path: &Path) -> Result<(), SlotError> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|source| SlotError::Write {
            path: path.to_owned(),
            source,
        })
}

/// Writes each slot's state file into `data_dir/pg_replslot/<name>/state`, replacing what
/// is there; postgres must be stopped (it reads the directory at start and rewrites it at
/// checkpoints). Each slot goes through `<name>.tmp` and a rename, every step fsynced, so a
/// crash leaves either the old slot or the new one; postgres removes a leftover `.tmp`.
pub fn install(data_dir: &Path, slots: &[PrimarySlot]) -> Result<(), SlotError> {
    let (dir_mode, file_mode) = create_modes(data_dir);
    let replslot = data_dir.join("pg_replslot");
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SlotError::Write { path, source }
    };
    for slot in slots {
        let state = slot
            .state
            .as_deref()
            .ok_or_else(|| SlotError::NoState(slot.name.clone()))?;
        let dir = replslot.join(&slot.name);
        let tmp = replslot.join(format!("{}.tmp", slot.name));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::DirBuilder::new()
            .mode(dir_mode)
            .create(&tmp)
            .map_err(io(&tmp))?;
        let file = tmp.join("state");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(file_mode)
            .open(&file)
            .map_err(io(&file))?;
        // The umask may have taken bits postgres expects (it refuses a slot it cannot read).
        f.set_permissions(std::fs::Permissions::from_mode(file_mode))
            .map_err(io(&file))?;
        f.write_all(state).map_err(io(&file))?;
        f.sync_all().map_err(io(&file))?;
        fsync_dir(&tmp)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(dir_mode))
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
        fsync_dir(&dir)?;
    }
    fsync_dir(&replslot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_are_written_as_postgres_writes_them() {
        assert_eq!(format_lsn(0), "0/0");
        assert_eq!(format_lsn(0x1_0000_00A8), "1/A8");
        assert_eq!(
            advance_sql("cdc", 0x3000060),
            "SELECT pg_catalog.pg_replication_slot_advance('cdc', '0/3000060')"
        );
    }

    #[test]
    fn installed_slots_replace_the_old_state_with_postgres_modes() {
        let data = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let replslot = data.path().join("pg_replslot");
        std::fs::create_dir_all(replslot.join("cdc")).expect("old slot");
        std::fs::write(replslot.join("cdc/state"), b"old").expect("old state");
        std::fs::create_dir_all(replslot.join("cdc.tmp")).expect("leftover");
        let slot = PrimarySlot {
            name: "cdc".into(),
            kind: SlotType::Logical,
            database: Some("app".into()),
            plugin: Some("pgoutput".into()),
            catalog_xmin: Some(740),
            confirmed_flush_lsn: Some(1),
            state: Some(b"new".to_vec()),
        };
        install(data.path(), std::slice::from_ref(&slot)).expect("installed");
        assert_eq!(
            std::fs::read(replslot.join("cdc/state")).expect("read"),
            b"new"
        );
        assert!(!replslot.join("cdc.tmp").exists());
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&replslot.join("cdc")), 0o700);
        assert_eq!(mode(&replslot.join("cdc/state")), 0o600);
        let stateless = PrimarySlot {
            state: None,
            ..slot
        };
        assert!(matches!(
            install(data.path(), &[stateless]),
            Err(SlotError::NoState(_))
        ));
    }
}
