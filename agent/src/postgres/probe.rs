//! Queries against the local postgres: the per-cycle status query and post-bootstrap SQL.
//!
//! One connection is kept open and re-established when it breaks; every query is bounded by a
//! timeout so a hung postgres cannot stall the HA loop or the REST API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls, Statement};
use tracing::debug;

use crate::state::{LiveProbe, PostgresStatus, ReplicationRow};

use super::slots::{self, ReplicationSlot};

/// How to reach the local postgres as the superuser.
#[derive(Debug, Clone)]
pub struct LocalConnection {
    /// TCP host or unix socket directory.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub timeout: Duration,
}

/// Errors of local queries.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to the local postgres")]
    Connect(#[source] tokio_postgres::Error),
    #[error("query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("postgres did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected answer: {0}")]
    Decode(String),
}

const STATUS_QUERY: &str = "
SELECT pg_is_in_recovery(),
       current_setting('server_version_num')::int,
       to_char(pg_postmaster_start_time(), 'YYYY-MM-DD HH24:MI:SS.US') || '+00:00',
       extract(epoch from pg_postmaster_start_time())::float8,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint END,
       (pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::bigint,
       (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint,
       to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00:00',
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END,
       (SELECT status FROM pg_stat_wal_receiver LIMIT 1),
       CASE WHEN pg_is_in_recovery()
            THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver LIMIT 1),
                          (SELECT timeline_id FROM pg_control_checkpoint()))
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
       (SELECT system_identifier::text FROM pg_control_system()),
       (SELECT coalesce(array_agg(name::text ORDER BY name), '{}') FROM pg_settings WHERE pending_restart),
       CASE WHEN pg_is_in_recovery()
            THEN (SELECT min_recovery_end_timeline FROM pg_control_recovery()) END,
       CASE WHEN pg_is_in_recovery()
            THEN (SELECT (min_recovery_end_lsn - '0/0'::pg_lsn)::bigint FROM pg_control_recovery()) END,
       CASE WHEN NOT pg_is_in_recovery()
            THEN (SELECT coalesce(json_agg(json_build_array(usename::text, application_name,
                                                            client_addr::text, state, sync_state,
                                                            sync_priority,
                                                            (write_lsn - '0/0'::pg_lsn)::bigint,
                                                            (flush_lsn - '0/0'::pg_lsn)::bigint,
                                                            (replay_lsn - '0/0'::pg_lsn)::bigint)
                                           ORDER BY application_name), '[]')::text
                    FROM pg_stat_replication) END,
       current_setting('synchronous_standby_names')
";

/// One row of the status query's last column (`pg_stat_replication` as a JSON array of arrays).
type ReplicationTuple = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
);

/// The status query plus a reusable connection.
pub struct Probe {
    conn: LocalConnection,
    session: Mutex<Option<Session>>,
    /// Counts the statements run through [`Probe::execute`] and the resets: while it stands
    /// still, a status read earlier in the cycle still describes postgres as far as this agent
    /// changed it.
    changes: AtomicU64,
}

/// The kept connection and the statements prepared on it. The status queries run every cycle:
/// prepared once per connection, each costs one round trip instead of two (parse and describe,
/// then bind and execute) and postgres does not parse and plan them again.
struct Session {
    client: Client,
    status: Option<Statement>,
    slots: Option<Statement>,
}

impl Session {
    async fn prepared(
        client: &Client,
        slot: &mut Option<Statement>,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = slot {
            return Ok(statement.clone());
        }
        let statement = client.prepare(sql).await?;
        *slot = Some(statement.clone());
        Ok(statement)
    }
}

impl Probe {
    /// The host (or socket directory) and port the local postgres is reached at.
    pub fn address(&self) -> (&str, u16) {
        (&self.conn.host, self.conn.port)
    }

    pub fn new(conn: LocalConnection) -> Arc<Self> {
        Arc::new(Probe {
            conn,
            session: Mutex::new(None),
            changes: AtomicU64::new(0),
        })
    }

    async fn connect_to(&self, database: &str) -> Result<Client, ProbeError> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.conn.host)
            .port(self.conn.port)
            .user(&self.conn.user)
            .dbname(database)
            .application_name("pgwarden")
            .connect_timeout(self.conn.timeout);
        if let Some(pw) = &self.conn.password {
            cfg.password(pw);
        }
        let (client, connection) = cfg.connect(NoTls).await.map_err(ProbeError::Connect)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "local postgres connection closed");
            }
        });
        Ok(client)
    }

    async fn connect(&self) -> Result<Session, ProbeError> {
        let client = self.connect_to("postgres").await?;
        Ok(Session {
            client,
            status: None,
            slots: None,
        })
    }

    /// Runs `f` on the shared connection, reconnecting once if the connection is closed.
    async fn with_client<T, F, Fut>(&self, f: F) -> Result<T, ProbeError>
    where
        F: Fn(Session) -> Fut,
        Fut: std::future::Future<Output = (Session, Result<T, ProbeError>)>,
    {
        let timeout = self.conn.timeout;
        let work = async {
            let mut slot = self.session.lock().await;
            let session = match slot.take() {
                Some(s) if !s.client.is_closed() => s,
                _ => self.connect().await?,
            };
            let (session, result) = f(session).await;
            if !session.client.is_closed() {
                *slot = Some(session);
            }
            result
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                // The connection may be stuck mid-query: never reuse it.
                if let Ok(mut slot) = self.session.try_lock() {
                    *slot = None;
                }
                Err(ProbeError::Timeout(timeout))
            }
        }
    }

    /// Drops the cached connection (after postgres was stopped).
    pub async fn reset(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
        *self.session.lock().await = None;
    }

    /// See [`Probe::changes`]: compare two readings to learn whether anything was run between.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Queries the current status.
    pub async fn status(&self) -> Result<PostgresStatus, ProbeError> {
        self.with_client(|mut s| async move {
            let result = async {
                let status = Session::prepared(&s.client, &mut s.status, STATUS_QUERY).await?;
                let row = s.client.query_one(&status, &[]).await?;
                let in_recovery: bool = row.try_get(0)?;
                // A primary's standbys come in the same row: asking for them in a second query
                // cost a second round trip every cycle.
                let standbys: Option<String> = row.try_get(15)?;
                let replication = standbys
                    .as_deref()
                    .map(parse_replication)
                    .transpose()
                    .map_err(|e| ProbeError::Decode(format!("pg_stat_replication: {e}")))?
                    .unwrap_or_default();
                let lsn = |i: usize| -> Result<Option<u64>, tokio_postgres::Error> {
                    Ok(row.try_get::<_, Option<i64>>(i)?.map(|v| v.unsigned_abs()))
                };
                let receiver: Option<String> = row.try_get(9)?;
                Ok::<_, ProbeError>(PostgresStatus {
                    in_recovery,
                    server_version: row.try_get(1)?,
                    postmaster_start_time: row.try_get(2)?,
                    postmaster_start_epoch: row.try_get(3)?,
                    wal_flush_lsn: lsn(4)?,
                    receive_lsn: lsn(5)?,
                    replay_lsn: lsn(6)?,
                    replayed_timestamp: row.try_get(7)?,
                    replay_paused: row.try_get(8)?,
                    streaming: receiver.as_deref() == Some("streaming"),
                    timeline: row
                        .try_get::<_, Option<i32>>(10)?
                        .and_then(|t| u32::try_from(t).ok()),
                    system_identifier: row.try_get(11)?,
                    pending_restart: row.try_get(12)?,
                    min_recovery: match (row.try_get::<_, Option<i32>>(13)?, lsn(14)?) {
                        (Some(tl), Some(at)) if at > 0 => u32::try_from(tl).ok().map(|tl| (tl, at)),
                        _ => None,
                    },
                    replication,
                    synchronous_standby_names: row.try_get(16)?,
                })
            }
            .await;
            (s, result)
        })
        .await
    }

    /// The non-temporary replication slots, physical and logical.
    pub async fn slots(&self) -> Result<Vec<ReplicationSlot>, ProbeError> {
        self.with_client(|mut s| async move {
            let r = async {
                let slots = Session::prepared(&s.client, &mut s.slots, slots::LIST_QUERY).await?;
                s.client.query(&slots, &[]).await
            }
            .await
            .and_then(|rows| rows.iter().map(slots::from_row).collect())
            .map_err(ProbeError::Query);
            (s, r)
        })
        .await
    }

    /// Runs SQL statements (no results) as the superuser in `database`, on a connection of
    /// their own that ends with them: a logical slot is created and advanced in its database.
    /// The server ends the statements at the probe's timeout too, so none outlives the call
    /// holding a slot.
    pub async fn execute_in(&self, database: &str, sql: &str) -> Result<(), ProbeError> {
        self.changes.fetch_add(1, Ordering::Relaxed);
        let timeout = self.conn.timeout;
        let work = async {
            let client = self.connect_to(database).await?;
            client
                .batch_execute(&format!(
                    "SET statement_timeout TO {}; {sql}",
                    timeout.as_millis()
                ))
                .await
                .map_err(ProbeError::Query)
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or(Err(ProbeError::Timeout(timeout)))
    }

    /// [`Probe::execute_in`] without a limit on the statement (connecting is still bounded),
    /// for statements that wait for others by design: creating a logical slot waits for every
    /// transaction running when it starts.
    pub async fn execute_in_unbounded(&self, database: &str, sql: &str) -> Result<(), ProbeError> {
        self.changes.fetch_add(1, Ordering::Relaxed);
        let timeout = self.conn.timeout;
        let client = tokio::time::timeout(timeout, self.connect_to(database))
            .await
            .unwrap_or(Err(ProbeError::Timeout(timeout)))?;
        let done = client
            .batch_execute(&format!("SET statement_timeout TO 0; {sql}"))
            .await
            .map_err(ProbeError::Query);
        // What it changed happened now, not when it started.
        self.changes.fetch_add(1, Ordering::Relaxed);
        done
    }

    /// Runs one query and returns its first row as text (`None` for SQL NULL); no row is an
    /// empty vector.
    pub async fn query_row(&self, sql: &str) -> Result<Vec<Option<String>>, ProbeError> {
        let sql = sql.to_owned();
        self.with_client(move |s| {
            let sql = sql.clone();
            async move {
                let r = s.client.simple_query(&sql).await.map(|messages| {
                    messages
                        .iter()
                        .find_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                                (0..row.len())
                                    .map(|i| row.get(i).map(str::to_owned))
                                    .collect(),
                            ),
                            _ => None,
                        })
                        .unwrap_or_default()
                });
                (s, r.map_err(ProbeError::Query))
            }
        })
        .await
    }

    /// Runs SQL statements (no results) as the superuser.
    pub async fn execute(&self, sql: &str) -> Result<(), ProbeError> {
        self.changes.fetch_add(1, Ordering::Relaxed);
        let sql = sql.to_owned();
        self.with_client(move |s| {
            let sql = sql.clone();
            async move {
                let r = s.client.batch_execute(&sql).await;
                (s, r.map_err(ProbeError::Query))
            }
        })
        .await
    }

    /// [`Probe::execute`] with postgres' statement logging off around it, on one session: for
    /// statements that carry a password (`CREATE ROLE … PASSWORD`), which postgres would
    /// otherwise write to its log (and so ours) under `log_statement`, a slow-statement log or
    /// an error's context. As Patroni does for the roles it creates.
    pub async fn execute_unlogged(&self, sql: &str) -> Result<(), ProbeError> {
        const QUIET: &str = "SET log_statement TO none; SET log_min_duration_statement TO -1; \
                             SET log_min_error_statement TO panic; SET log_min_messages TO panic";
        const RESET: &str = "RESET log_statement; RESET log_min_duration_statement; \
                             RESET log_min_error_statement; RESET log_min_messages";
        self.changes.fetch_add(1, Ordering::Relaxed);
        let sql = sql.to_owned();
        self.with_client(move |s| {
            let sql = sql.clone();
            async move {
                // Separate round trips: postgres logs a multi-statement query as a whole
                // before running its first statement.
                let mut r = s.client.batch_execute(QUIET).await;
                if r.is_ok() {
                    r = s.client.batch_execute(&sql).await;
                    let reset = s.client.batch_execute(RESET).await;
                    r = r.and(reset);
                }
                (s, r.map_err(ProbeError::Query))
            }
        })
        .await
    }
}

/// The status query's `pg_stat_replication` column: `[[usename, application_name, client_addr,
/// state, sync_state, sync_priority, write_lsn, flush_lsn, replay_lsn], ...]`.
fn parse_replication(json: &str) -> Result<Vec<ReplicationRow>, serde_json::Error> {
    let rows: Vec<ReplicationTuple> = serde_json::from_str(json)?;
    Ok(rows
        .into_iter()
        .map(
            |(
                usename,
                application_name,
                client_addr,
                state,
                sync_state,
                sync_priority,
                write_lsn,
                flush_lsn,
                replay_lsn,
            )| ReplicationRow {
                usename: usename.unwrap_or_default(),
                application_name: application_name.unwrap_or_default(),
                client_addr,
                state: state.unwrap_or_default(),
                sync_state: sync_state.unwrap_or_default(),
                sync_priority: sync_priority.unwrap_or_default(),
                write_lsn,
                flush_lsn,
                replay_lsn,
            },
        )
        .collect())
}

#[async_trait]
impl LiveProbe for Probe {
    async fn postgres_now(&self) -> Option<PostgresStatus> {
        self.status().await.ok()
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_embedded_quotes() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn standbys_are_read_from_the_status_row_json() {
        let rows = parse_replication(
            r#"[["replicator","pg1","127.0.0.1","streaming","sync",1,300,200,100],
                ["replicator","pg2",null,"catchup","async",0,null,null,null]]"#,
        )
        .expect("parse");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].application_name, "pg1");
        assert_eq!(rows[0].client_addr.as_deref(), Some("127.0.0.1"));
        assert_eq!(rows[0].sync_state, "sync");
        assert_eq!(rows[0].sync_priority, 1);
        assert_eq!(
            (rows[0].write_lsn, rows[0].flush_lsn, rows[0].replay_lsn),
            (Some(300), Some(200), Some(100))
        );
        assert_eq!(rows[1].flush_lsn, None);
        assert_eq!(rows[1].client_addr, None);
        assert_eq!(rows[1].state, "catchup");
        assert!(parse_replication("[]").expect("empty").is_empty());
        assert!(parse_replication(r#"[["x"]]"#).is_err());
    }
}
