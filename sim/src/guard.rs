//! The fence guard after its agent is killed: the proof-of-death release (issue 20 item 1, as
//! `agent/src/postgres/crash_release.rs` and `docs/fencing.md` describe it).
//!
//! The agent's DCS client gives its guard a token after every acquire or renewal that showed the
//! leader key ours (etcd: the lease the key hangs on; Kubernetes: the agent's incarnation, written into the Lease),
//! and clears it when the key is not ours (released, rejected, lease lost). When the agent dies
//! without a clean stop and the guard holds a token, the guard
//!
//! 1. proves postgres stopped (the postmaster got SIGQUIT with the agent; the guard polls every
//!    5 ms and kills what is left after 6 s), holding the data directory's lock meanwhile;
//! 2. runs the release command (at most 10 s): it reads the cluster, keeps the record when the
//!    cluster is paused or no other member could take over (the race's own rule,
//!    `pgwarden::ha::decide::someone_else_may_take_over`, on the members' answers), and otherwise
//!    releases the record only if it is still the one the token names ([`crate::agent::SimDcs`]'s
//!    `release_dead_leader`: etcd deletes `leader` if it names us on that lease, then revokes the
//!    lease; Kubernetes clears the holder if that incarnation wrote it);
//! 3. lets go of the lock: a restarted agent waits for it.
//!
//! Without a token the guard just exits. When the whole host dies, nothing is released.
//!
//! Every request of the release command goes through the simulated DCS like the agent's (latency,
//! cuts, slow requests that time out after having been applied); one fate makes its release
//! request time out and be applied afterwards, after the guard gave up on it.

use std::time::Duration;

use pgwarden::config::DynamicConfig;
use pgwarden::dcs::Dcs;
use pgwarden::ha::observe::PeerAnswer;
use pgwarden::ha::ports::Peers;

use crate::agent::{SimDcs, SimPeers};
use crate::world::{Shared, Store, Us, World, MS, SEC};

/// How long the guard lets postgres die of its SIGQUIT before it kills what is left
/// (`QUIT_GRACE`); postgres's own immediate shutdown kills its children after 5 s too.
pub const QUIT_GRACE: Us = 6 * SEC;
/// How long the release command may take (`RELEASE_DEADLINE`).
pub const RELEASE_DEADLINE: Us = 10 * SEC;

/// The leader record as the agent's DCS client last confirmed it: the lease `leader` hangs on
/// (etcd's token) and the key's revision then (the stand-in for Kubernetes' resourceVersion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub lease: i64,
    pub revision: i64,
}

impl Token {
    pub fn encode(&self) -> String {
        format!("sim:{}:{}", self.lease, self.revision)
    }

    pub fn decode(token: &str) -> Option<Token> {
        let mut parts = token.strip_prefix("sim:")?.split(':');
        let lease = parts.next()?.parse().ok()?;
        let revision = parts.next()?.parse().ok()?;
        Some(Token { lease, revision })
    }
}

/// Which DCS the cluster runs on, for the release's condition (one per schedule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Delete `leader` if it names us on the token's lease, then revoke that lease.
    Etcd,
    /// Clear the holder if the record names us and was written by the dead agent's process (the
    /// Lease's `pgwarden.io/holder-incarnation`). The simulated store is etcd's; the lease the
    /// key hangs on stands in for the incarnation (it is narrower: an agent that lost its lease
    /// and took the key on a new one is one incarnation in Kubernetes, two leases here). Unlike
    /// etcd, the lease is not revoked.
    Kubernetes,
}

/// What a crash does beyond killing the agent (drawn from the schedule's own stream).
#[derive(Debug, Clone, Copy)]
pub struct Death {
    /// Postgres, SIGQUIT with the agent, is gone this long after (the guard kills it at
    /// [`QUIT_GRACE`]); until then the model lets it run, and a primary acknowledge writes
    /// (real backends stop at SIGQUIT: the model is the harder case).
    pub linger: Us,
    pub fate: Fate,
    /// The crash hits whoever holds `leader` at that instant (if anyone) instead of the
    /// fault's member.
    pub hits_leader: bool,
}

/// What happens to the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It proves postgres stopped and runs the release command.
    Releases,
    /// As `Releases`, but the release request times out and is applied `after` the timeout (if
    /// the member reaches the DCS then), after the guard has given up and let go of the lock.
    AppliesLate { after: Us },
    /// The host died: agent, guard and postgres at once. Nothing is released.
    HostLost,
}

/// A guard at work after its agent died: it holds the lock a restarted agent waits on.
#[derive(Debug, Clone)]
pub struct Guard {
    token: Token,
    fate: Fate,
    phase: Phase,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Postgres is not proven stopped yet.
    Proving,
    /// The guard's poll sees no postgres process left at `at`.
    Proven { at: Us },
    /// The release command runs (the scheduler polls it) until it ends or `deadline`.
    Releasing { deadline: Us },
}

/// The postgres of a killed agent: it runs until `at`. `started` tells it from a postgres the
/// restarted agent started since.
#[derive(Debug, Clone, Copy)]
pub struct Dying {
    at: Us,
    started: Us,
}

/// A release request that timed out and reaches the store later.
#[derive(Debug, Clone)]
pub struct Late {
    node: usize,
    at: Us,
    token: Token,
}

impl Store {
    /// The release's compare-and-delete: `leader` only if it names `name` and is still the record
    /// `token` names. Recorded in `released` for the checker.
    pub fn release_dead_leader(&mut self, name: &str, token: Token) -> bool {
        let same = self
            .leader
            .as_ref()
            .is_some_and(|l| l.name == name && l.lease == token.lease);
        if same {
            self.leader = None;
            self.rev += 1;
            self.changed = true;
            self.released.push(name.to_owned());
        }
        same
    }
}

/// What the scheduler must do with guard tasks after [`step`].
#[derive(Default)]
pub struct Tasks {
    /// Start the release command of these members.
    pub start: Vec<usize>,
    /// Kill the release command of these members (its deadline passed).
    pub kill: Vec<usize>,
}

/// The agent of `node` was killed (or, with [`Fate::HostLost`], its whole host died; then
/// `agent_was_alive` may be false: the guard at work, if any, dies too, and the scheduler drops
/// its task; a request it sent is still on the wire).
pub fn crash(w: &mut World, node: usize, death: Death, agent_was_alive: bool) {
    let now = w.now;
    let n = &mut w.nodes[node];
    if death.fate == Fate::HostLost {
        n.guard = None;
        n.guard_token = None;
        n.fence = None;
        n.dying = None;
        if n.pg.is_up() {
            n.pg.stop(false);
        }
        return;
    }
    if !agent_was_alive {
        return;
    }
    if n.pg.is_up() {
        n.dying = Some(Dying {
            at: now + death.linger.min(QUIT_GRACE),
            started: n.pg.started_at,
        });
    }
    // The deadline stays armed while postgres lingers (as a bound on what it may acknowledge).
    if let Some(token) = n.guard_token.take() {
        n.guard = Some(Guard {
            token,
            fate: death.fate,
            phase: Phase::Proving,
        });
    } else {
        let name = n.name.clone();
        w.log(|| format!("{name}: the fence guard has no release token and exits"));
    }
}

/// A restarted agent waits for this member's guard to finish.
pub fn lock_held(w: &World, node: usize) -> bool {
    w.nodes[node].guard.is_some()
}

/// The next instant something here happens (the release command's sleeps wake the scheduler
/// through the member's `wake_at`).
pub fn next_event(w: &World) -> Option<Us> {
    let mut times = Vec::new();
    for n in &w.nodes {
        times.extend(n.dying.map(|d| d.at));
        match n.guard.as_ref().map(|g| g.phase) {
            Some(Phase::Proven { at }) => times.push(at),
            Some(Phase::Releasing { deadline }) => times.push(deadline),
            _ => {}
        }
    }
    times.extend(w.late.iter().map(|l| l.at));
    times.into_iter().min()
}

/// Lingering postgres instances die, guards prove it and start their release command (the
/// scheduler runs it), late requests reach the store.
pub fn step(w: &mut World) -> Tasks {
    let now = w.now;
    let mut tasks = Tasks::default();
    for i in 0..w.nodes.len() {
        if let Some(d) = w.nodes[i].dying {
            let n = &mut w.nodes[i];
            let same = n.pg.is_up() && n.pg.started_at == d.started;
            if !same {
                n.dying = None;
            } else if d.at <= now {
                n.dying = None;
                n.pg.stop(false);
                if !n.alive {
                    n.fence = None;
                }
                let name = n.name.clone();
                w.log(|| format!("{name}: the killed agent's postgres is gone"));
            }
        }
        let Some(phase) = w.nodes[i].guard.as_ref().map(|g| g.phase) else {
            continue;
        };
        match phase {
            Phase::Proving if w.nodes[i].dying.is_none() => {
                let at = now + w.guard_between(0, 5 * MS);
                set_phase(w, i, Phase::Proven { at });
            }
            Phase::Proven { at } if at <= now => {
                set_phase(
                    w,
                    i,
                    Phase::Releasing {
                        deadline: now + RELEASE_DEADLINE,
                    },
                );
                let name = w.nodes[i].name.clone();
                w.log(|| {
                    format!("{name}: postgres proven stopped; the fence guard runs the release")
                });
                tasks.start.push(i);
            }
            Phase::Releasing { deadline } if deadline <= now => {
                w.nodes[i].guard = None;
                let name = w.nodes[i].name.clone();
                w.log(|| format!("{name}: the release did not finish in time; the guard exits"));
                tasks.kill.push(i);
            }
            _ => {}
        }
    }
    let (due, later): (Vec<Late>, Vec<Late>) = std::mem::take(&mut w.late)
        .into_iter()
        .partition(|l| l.at <= now);
    w.late = later;
    for l in due {
        let name = w.nodes[l.node].name.clone();
        if !w.reaches_dcs(l.node) {
            w.log(|| format!("{name}: the late release request is lost"));
            continue;
        }
        let released = w.store.release_dead_leader(&name, l.token);
        w.log(|| format!("{name}: the late release request is applied (released {released})"));
    }
    tasks
}

/// The release command ended: the guard exits and lets go of the lock.
pub fn finished(w: &mut World, node: usize) {
    w.nodes[node].guard = None;
    let name = w.nodes[node].name.clone();
    w.log(|| format!("{name}: the fence guard is done"));
}

fn set_phase(w: &mut World, node: usize, phase: Phase) {
    if let Some(g) = w.nodes[node].guard.as_mut() {
        g.phase = phase;
    }
}

/// The release command (`pgwarden release-leader`) of member `node`'s guard.
pub async fn release(w: Shared, node: usize) {
    let Some((token, fate)) = w.borrow().nodes[node]
        .guard
        .as_ref()
        .map(|g| (g.token, g.fate))
    else {
        return;
    };
    let config = crate::agent::config(&w, node);
    // A new process: it starts and connects to the DCS.
    let start = w.borrow_mut().guard_between(20 * MS, 200 * MS);
    crate::agent::sleep_for(&w, node, start).await;
    let dcs = SimDcs::client(&w, node, &config);
    let outcome = if !replaceable(&w, node, &config, &dcs).await {
        "no other member can take over (or paused): the record is kept".to_owned()
    } else if let Fate::AppliesLate { after } = fate {
        let timeout = u64::from(config.bootstrap.dcs.retry_timeout) * SEC;
        let at = w.borrow().now + timeout + after;
        w.borrow_mut().late.push(Late { node, at, token });
        crate::agent::sleep_for(&w, node, timeout).await;
        "the release request timed out".to_owned()
    } else {
        match dcs.release_dead_leader(&token.encode()).await {
            Ok(true) => "released the leader record".to_owned(),
            Ok(false) => "the record was no longer ours".to_owned(),
            Err(e) => format!("the release failed: {e}"),
        }
    };
    let mut w = w.borrow_mut();
    let name = w.nodes[node].name.clone();
    w.log(|| format!("{name}: release command: {outcome}"));
}

/// Could another member take over now (the release command's check before it releases)? A read
/// that fails counts as yes: the release stays conditional, and the lease would run out anyway.
async fn replaceable(
    w: &Shared,
    node: usize,
    config: &pgwarden::config::Config,
    dcs: &SimDcs,
) -> bool {
    let Ok(view) = dcs.cluster().await else {
        return true;
    };
    if view.is_paused() {
        return false;
    }
    let settings: DynamicConfig = match &view.config {
        None => config.bootstrap.dcs.clone(),
        Some(raw) => DynamicConfig::from_dcs(&raw.value, &config.bootstrap.dcs).0,
    };
    // One member after the other, each with a 2 s timeout, as the command asks them.
    let peers = SimPeers::new(w, node);
    let mut answers: Vec<PeerAnswer> = Vec::new();
    for m in &view.members {
        if m.name != config.name {
            let one = vec![(m.name.clone(), m.record.api_url.clone())];
            answers.extend(peers.ask(one, Duration::from_secs(2)).await);
        }
    }
    pgwarden::ha::decide::someone_else_may_take_over(
        &view,
        &config.name,
        &answers,
        settings.synchronous_mode.race_rule(),
        settings.maximum_lag_on_failover,
    )
}
