//! A writer that records every acknowledged write, and the split-brain check over its record.
//!
//! Every tick (~20 ms) the writer tries one INSERT on **every** member at once. A replica refuses
//! (read-only); a primary acknowledges. Two members acknowledging in the same tick means two
//! writable primaries at the same time: split brain. Every acknowledged id is kept, so a test can
//! check that none is missing from the member that leads afterwards.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// Where one member can be reached.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub port: u16,
    pub password: String,
}

/// One acknowledged INSERT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub id: i64,
    pub member: String,
    pub tick: u64,
    pub at: Instant,
}

/// A running writer; [`Writer::stop`] returns its record.
pub struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Ack>>,
}

/// The table the writer uses; create it on the primary before starting.
pub const CREATE_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS pgwarden_writer (id bigint PRIMARY KEY, member text NOT NULL)";

async fn connect(host: &str, t: &Target) -> Option<tokio_postgres::Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(host)
        .port(t.port)
        .user("postgres")
        .password(&t.password)
        .dbname("postgres")
        .connect_timeout(Duration::from_millis(300));
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(conn);
    // No statement_timeout: a timeout that fires while a COMMIT waits for the synchronous
    // standby only cancels the wait, and PostgreSQL then reports success for a write that only
    // the primary has (with a WARNING the client would have to parse), an acknowledgement that
    // synchronous mode does not promise. The writer's own timeout drops the connection instead,
    // which acknowledges nothing.
    Some(client)
}

impl Writer {
    /// Writes to members on loopback ports.
    pub fn start(targets: Vec<Target>) -> Writer {
        Writer::start_at(
            targets
                .into_iter()
                .map(|t| ("127.0.0.1".to_owned(), t))
                .collect(),
        )
    }

    /// Writes to members at `(host, target)`: containers, each at its own address.
    pub fn start_at(targets: Vec<(String, Target)>) -> Writer {
        // Writers of one process share the table (the benchmark repeats failovers on one
        // cluster): each writer gets its own id range, or a later writer's INSERTs would fail on
        // the earlier rows' primary keys and look like refused writes.
        static WRITERS: AtomicI64 = AtomicI64::new(0);
        let base = WRITERS.fetch_add(1, Ordering::Relaxed) << 32;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let clients: Vec<Arc<Mutex<Option<tokio_postgres::Client>>>> =
                targets.iter().map(|_| Arc::new(Mutex::new(None))).collect();
            let mut acks = Vec::new();
            let mut tick: u64 = 0;
            while !flag.load(Ordering::Relaxed) {
                tick += 1;
                let started = Instant::now();
                let attempts = targets.iter().enumerate().map(|(i, (host, t))| {
                    let slot = clients[i].clone();
                    let id = base + i64::try_from(tick * 16 + i as u64).unwrap_or(i64::MAX >> 1);
                    async move {
                        let mut guard = slot.lock().await;
                        if guard.as_ref().is_none_or(|c| c.is_closed()) {
                            *guard = connect(host, t).await;
                        }
                        let client = guard.as_ref()?;
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                            [&id, &t.name];
                        let insert = client.execute(
                            "INSERT INTO pgwarden_writer (id, member) VALUES ($1, $2)",
                            &params,
                        );
                        match tokio::time::timeout(Duration::from_secs(3), insert).await {
                            Ok(Ok(1)) => Some(Ack {
                                id,
                                member: t.name.clone(),
                                tick,
                                at: Instant::now(),
                            }),
                            Ok(_) => None,
                            Err(_) => {
                                *guard = None;
                                None
                            }
                        }
                    }
                });
                acks.extend(
                    futures::future::join_all(attempts)
                        .await
                        .into_iter()
                        .flatten(),
                );
                let spent = started.elapsed();
                if spent < Duration::from_millis(20) {
                    tokio::time::sleep(Duration::from_millis(20) - spent).await;
                }
            }
            acks
        });
        Writer { stop, task }
    }

    /// Writes to each member on loopback ports in a loop of its own (one INSERT every ~20 ms),
    /// so that a member that does not answer at all (a frozen host, whose kernel still accepts
    /// connections) holds back only its own writes, not the others'. An ack's `tick` is its
    /// 20 ms time slot since the start: [`split_brain_ticks`] then finds two members that
    /// acknowledged within the same 20 ms.
    pub fn start_independent(targets: Vec<Target>) -> Writer {
        static WRITERS: AtomicI64 = AtomicI64::new(1 << 20);
        let base = WRITERS.fetch_add(1, Ordering::Relaxed) << 32;
        let stop = Arc::new(AtomicBool::new(false));
        let origin = Instant::now();
        let loops: Vec<_> = targets
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let flag = stop.clone();
                tokio::spawn(async move {
                    let mut acks = Vec::new();
                    let mut client: Option<tokio_postgres::Client> = None;
                    let mut seq: u64 = 0;
                    while !flag.load(Ordering::Relaxed) {
                        seq += 1;
                        let started = Instant::now();
                        if client.as_ref().is_none_or(|c| c.is_closed()) {
                            // The handshake with a frozen postgres never ends: bound it all.
                            client = tokio::time::timeout(
                                Duration::from_millis(500),
                                connect("127.0.0.1", &t),
                            )
                            .await
                            .ok()
                            .flatten();
                        }
                        if let Some(c) = client.as_ref() {
                            let id = base + i64::try_from(seq * 16 + i as u64).unwrap_or(0);
                            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                                [&id, &t.name];
                            let insert = c.execute(
                                "INSERT INTO pgwarden_writer (id, member) VALUES ($1, $2)",
                                &params,
                            );
                            match tokio::time::timeout(Duration::from_secs(3), insert).await {
                                Ok(Ok(1)) => {
                                    let at = Instant::now();
                                    let slot = at.duration_since(origin).as_millis() / 20;
                                    acks.push(Ack {
                                        id,
                                        member: t.name.clone(),
                                        tick: u64::try_from(slot).unwrap_or(u64::MAX),
                                        at,
                                    });
                                }
                                Ok(_) => {}
                                Err(_) => client = None,
                            }
                        }
                        let spent = started.elapsed();
                        if spent < Duration::from_millis(20) {
                            tokio::time::sleep(Duration::from_millis(20) - spent).await;
                        }
                    }
                    acks
                })
            })
            .collect();
        let task = tokio::spawn(async move {
            let mut acks = Vec::new();
            for l in loops {
                acks.extend(l.await.unwrap_or_default());
            }
            acks.sort_by_key(|a| a.at);
            acks
        });
        Writer { stop, task }
    }

    pub async fn stop(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// Ticks in which more than one member acknowledged a write.
pub fn split_brain_ticks(acks: &[Ack]) -> Vec<(u64, Vec<String>)> {
    let mut by_tick: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    for a in acks {
        let members = by_tick.entry(a.tick).or_default();
        // Two acks of one member in one tick (20 ms slot of an independent writer) are one.
        if !members.contains(&a.member) {
            members.push(a.member.clone());
        }
    }
    by_tick.into_iter().filter(|(_, m)| m.len() > 1).collect()
}

/// Panics with a clear message if two members ever acknowledged in the same tick.
pub fn assert_no_split_brain(acks: &[Ack]) {
    let bad = split_brain_ticks(acks);
    assert!(
        bad.is_empty(),
        "split brain: two members acknowledged writes at the same time in ticks {bad:?}"
    );
}

/// The longest time between consecutive acknowledged writes (the write gap).
pub fn longest_gap(acks: &[Ack]) -> Duration {
    acks.windows(2)
        .map(|w| w[1].at.saturating_duration_since(w[0].at))
        .max()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_members_in_one_tick_is_split_brain() {
        let now = Instant::now();
        let ack = |tick, member: &str| Ack {
            id: 0,
            member: member.into(),
            tick,
            at: now,
        };
        assert!(split_brain_ticks(&[ack(1, "a"), ack(2, "b")]).is_empty());
        assert!(split_brain_ticks(&[ack(1, "a"), ack(1, "a")]).is_empty());
        assert_eq!(
            split_brain_ticks(&[ack(1, "a"), ack(1, "b")]),
            vec![(1, vec!["a".to_owned(), "b".to_owned()])]
        );
    }
}
