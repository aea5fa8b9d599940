//! Quorum commit (`synchronous_mode: quorum`): the order of changes to
//! `synchronous_standby_names` and the `sync` key, as a pure planner.
//!
//! Two "ANY n of set" pairs describe the state (Patroni 4's `QuorumStateResolver`, whose rules
//! this follows): postgres waits for `numsync` of the standbys in `sync`
//! (`synchronous_standby_names = ANY numsync (sync)`) before it acknowledges a commit; a member
//! racing for the lock must see `quorum` of the `voters` (`sync_standby` in the key) at or
//! behind its own position. Every acknowledged write survives a failover as long as any set of
//! members that can acknowledge a commit overlaps any set that can make a new leader:
//! `|voters ∪ sync ∪ {leader}| ≤ quorum + numsync + 1`, and one set contains the other. The
//! optimal state for the streaming members `active` is `sync = voters = active`,
//! `numsync = min(synchronous_node_count, |active|)`, `quorum = |active| − numsync`; the
//! planner reaches it in steps that each keep the invariant: an increase of `numsync` or
//! `quorum` goes first, a decrease last. Any prefix of the steps is safe, so the leader may stop
//! after any of them and plan again from what it then observes.

use std::collections::BTreeSet;

pub type Names = BTreeSet<String>;

/// One step towards the wanted state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Write `sync` = `{leader, sync_standby: voters, quorum}`.
    Quorum {
        leader: String,
        quorum: u32,
        voters: Names,
    },
    /// Run postgres with `synchronous_standby_names = ANY numsync (sync)`.
    Sync { numsync: u32, sync: Names },
    /// Nothing can change until standbys confirm: plan again on the next observation.
    Restart,
}

/// The state cannot be made safe by the planner's steps (it is then left as it is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("quorum state: {0}")]
pub struct QuorumError(String);

/// What the planner starts from. Names must be spelled as the members are (the caller maps
/// postgres' case-insensitive names to them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumInput {
    /// `leader` of the `sync` key.
    pub leader: String,
    /// `quorum` of the `sync` key.
    pub quorum: u32,
    /// `sync_standby` of the `sync` key.
    pub voters: Names,
    /// The `ANY n` of the running `synchronous_standby_names`.
    pub numsync: u32,
    /// The names in the running `synchronous_standby_names`.
    pub sync: Names,
    /// How many of `sync` are known to have caught up since they were listed.
    pub numsync_confirmed: u32,
    /// Streaming members that may be synchronous.
    pub active: Names,
    /// `synchronous_node_count`.
    pub sync_wanted: u32,
    /// Us: the leader the key must name.
    pub leader_wanted: String,
}

/// The steps from `input` to the wanted state, in the order they must be applied; consecutive
/// steps of the same kind are merged (nobody could observe the intermediate state), and
/// nothing after a [`Transition::Restart`] is returned.
pub fn transitions(input: QuorumInput) -> Result<Vec<Transition>, QuorumError> {
    let mut resolver = Resolver::new(input);
    resolver.generate()?;
    let steps = resolver.out;
    let mut merged = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let next_same = steps
            .get(i + 1)
            .is_some_and(|n| std::mem::discriminant(n) == std::mem::discriminant(step));
        if next_same {
            continue;
        }
        merged.push(step.clone());
        if *step == Transition::Restart {
            break;
        }
    }
    Ok(merged)
}

/// Whether `state` keeps every acknowledged write electable: postgres' `ANY numsync (sync)` and
/// the key's `quorum` of `voters` overlap (checked before an existing key is trusted).
pub fn overlaps(state: QuorumInput) -> bool {
    Resolver::new(state).check_invariants().is_ok()
}

/// `synchronous_standby_names` for `ANY numsync (sync)`: empty when nothing is waited for.
pub fn render_any(numsync: u32, sync: &Names) -> String {
    if numsync == 0 || sync.is_empty() {
        return String::new();
    }
    let names: Vec<String> = sync
        .iter()
        .map(|n| super::sync::quote_standby_name(n))
        .collect();
    format!("ANY {numsync} ({})", names.join(","))
}

/// Which listed standbys have caught up since they were listed (Patroni's
/// `_process_replica_readiness`): one counts once it reported the position the primary had
/// flushed when `synchronous_standby_names` last changed, in the `sync_state` that says postgres
/// waits for it (`quorum` with quorum commit, `sync` otherwise). Until then it may lack commits
/// acknowledged without it, so it is not yet counted on in the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    seen: Option<String>,
    caught_up_to: Option<u64>,
    ready: Names,
}

impl Readiness {
    /// Updates from this cycle's observation; returns the ready standbys among `streaming`.
    /// `listed` are the names in `running` (postgres' current value), spelled as members;
    /// `rows` maps to `(member name, sync_state, position)`.
    pub fn observe(
        &mut self,
        running: &str,
        listed: &Names,
        flush_lsn: Option<u64>,
        rows: &[(String, String, Option<u64>)],
        waited_state: &str,
    ) -> Names {
        if self.seen.as_deref() != Some(running) {
            self.seen = Some(running.to_owned());
            self.ready.retain(|n| listed.contains(n));
            self.caught_up_to = flush_lsn;
        }
        let streaming: Names = rows.iter().map(|(n, _, _)| n.clone()).collect();
        // A standby that disconnected must catch up again.
        self.ready.retain(|n| streaming.contains(n));
        if let Some(target) = self.caught_up_to {
            for (name, state, position) in rows {
                if listed.contains(name)
                    && state == waited_state
                    && position.is_some_and(|p| p >= target)
                {
                    self.ready.insert(name.clone());
                }
            }
        }
        self.ready.clone()
    }
}

fn len(s: &Names) -> i64 {
    i64::try_from(s.len()).unwrap_or(i64::MAX)
}

fn union(a: &Names, b: &Names) -> Names {
    a.union(b).cloned().collect()
}

fn minus(a: &Names, b: &Names) -> Names {
    a.difference(b).cloned().collect()
}

fn inter(a: &Names, b: &Names) -> Names {
    a.intersection(b).cloned().collect()
}

fn one(name: &str) -> Names {
    std::iter::once(name.to_owned()).collect()
}

fn to_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// Signed arithmetic as the rules are written; counts never leave `0..=members`.
struct Resolver {
    leader: String,
    quorum: i64,
    voters: Names,
    numsync: i64,
    sync: Names,
    numsync_confirmed: i64,
    active: Names,
    sync_wanted: i64,
    leader_wanted: String,
    out: Vec<Transition>,
}

impl Resolver {
    fn new(i: QuorumInput) -> Self {
        let sync_len = len(&i.sync);
        Resolver {
            leader: i.leader,
            quorum: i64::from(i.quorum),
            voters: i.voters,
            // `ANY n` cannot wait for more standbys than it lists.
            numsync: i64::from(i.numsync).min(sync_len),
            sync: i.sync,
            numsync_confirmed: i64::from(i.numsync_confirmed),
            active: i.active,
            sync_wanted: i64::from(i.sync_wanted),
            leader_wanted: i.leader_wanted,
            out: Vec::new(),
        }
    }

    fn check_invariants(&self) -> Result<(), QuorumError> {
        let voters = union(&self.voters, &one(&self.leader));
        let sync = union(&self.sync, &one(&self.leader_wanted));
        let nodes = len(&union(&voters, &sync));
        if !self.voters.is_empty() && nodes > self.quorum + self.numsync + 1 {
            return Err(QuorumError(format!(
                "quorum and sync are not guaranteed to overlap: {nodes} members > quorum {} + \
                 sync {} + 1",
                self.quorum, self.numsync
            )));
        }
        if !(voters.is_subset(&sync) || sync.is_subset(&voters)) {
            return Err(QuorumError(format!(
                "mismatched sets: voters only {:?}, synchronous only {:?}",
                minus(&voters, &sync),
                minus(&sync, &voters)
            )));
        }
        Ok(())
    }

    /// A new `sync` key; `adjust` raises `quorum` by the listed standbys not yet confirmed, so a
    /// race still finds one that has every acknowledged write.
    fn quorum_update(
        &mut self,
        mut quorum: i64,
        mut voters: Names,
        leader: Option<String>,
        adjust: bool,
    ) -> Result<(), QuorumError> {
        if quorum < 0 {
            return Err(QuorumError(format!("quorum {quorum} < 0 of {voters:?}")));
        }
        if quorum > 0 && quorum >= len(&voters) {
            return Err(QuorumError(format!("quorum {quorum} >= N of {voters:?}")));
        }
        let old_leader = self.leader.clone();
        if let Some(leader) = leader {
            self.leader = leader;
        } else if self.numsync_confirmed == 0 && self.voters.is_empty() {
            // No standby is known to have caught up: nobody but the leader may vote yet.
            quorum = 0;
            voters = Names::new();
        } else if adjust {
            quorum += (self.numsync - self.numsync_confirmed).max(0);
        }
        if self.leader == old_leader && quorum == self.quorum && voters == self.voters {
            if !self.voters.is_empty() {
                return Ok(());
            }
            self.out.push(Transition::Restart);
        }
        self.quorum = quorum;
        self.voters = voters;
        self.check_invariants()?;
        self.out.push(Transition::Quorum {
            leader: self.leader.clone(),
            quorum: to_u32(self.quorum),
            voters: self.voters.clone(),
        });
        Ok(())
    }

    fn sync_update(&mut self, numsync: i64, sync: Names) -> Result<(), QuorumError> {
        if numsync < 0 {
            return Err(QuorumError(format!("sync {numsync} < 0 of {sync:?}")));
        }
        if numsync > len(&sync) {
            return Err(QuorumError(format!("sync {numsync} > N of {sync:?}")));
        }
        self.numsync = numsync;
        self.sync = sync;
        self.check_invariants()?;
        self.out.push(Transition::Sync {
            numsync: to_u32(self.numsync),
            sync: self.sync.clone(),
        });
        Ok(())
    }

    fn generate(&mut self) -> Result<(), QuorumError> {
        match self.take_over() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("{e}; resetting the quorum to what postgres waits for");
                let quorum = len(&self.sync) - self.numsync;
                self.quorum_update(quorum, self.sync.clone(), None, true)?;
            }
        }
        if self.leader != self.leader_wanted {
            return Err(QuorumError(format!(
                "`sync` still names {} as leader",
                self.leader
            )));
        }
        // After a restart or a failover nothing is confirmed yet; what the key promises is.
        let listed_active = len(&inter(&self.sync, &self.active));
        if self.numsync_confirmed == 0 && listed_active > 0 {
            self.numsync_confirmed = listed_active.min(len(&self.voters) - self.quorum);
        }
        self.handle_non_steady_cases()?;
        self.remove_gone_members()?;
        self.add_new_members()?;
        self.handle_replication_factor_change()
    }

    /// The key names another leader (we were just promoted): the former one becomes a voter.
    /// `Ok(true)` when there is nothing more to do this time.
    fn take_over(&mut self) -> Result<bool, QuorumError> {
        if self.leader_wanted == self.leader {
            self.check_invariants()?;
            return Ok(false);
        }
        let voters = union(
            &minus(&self.voters, &one(&self.leader_wanted)),
            &one(&self.leader),
        );
        if self.sync.is_empty() {
            let numsync = len(&voters) - self.quorum;
            self.sync_update(numsync, voters.clone())?;
        }
        let quorum = self.quorum;
        let leader = self.leader_wanted.clone();
        self.quorum_update(quorum, voters, Some(leader), true)?;
        // Right after a promotion standbys may not have reconnected yet: give them a cycle
        // before they are removed from the quorum.
        Ok(inter(&self.sync, &self.active).is_empty())
    }

    /// A previous run stopped between its steps: finish it.
    fn handle_non_steady_cases(&mut self) -> Result<(), QuorumError> {
        let proper_subset = |a: &Names, b: &Names| a.len() < b.len() && a.is_subset(b);
        if proper_subset(&self.sync, &self.voters) {
            // Changing the voters: evict the dead ones not being synced.
            let remove = minus(&self.voters, &union(&self.sync, &self.active));
            if !remove.is_empty() {
                let quorum = len(&self.voters) - len(&remove) - self.numsync;
                let adjust = minus(&self.sync, &self.active).is_empty();
                self.quorum_update(quorum, minus(&self.voters, &remove), None, adjust)?;
            }
            let add = minus(&inter(&self.voters, &self.active), &self.sync);
            if !add.is_empty() {
                self.sync_update(self.numsync, union(&self.sync, &add))?;
            }
        } else if proper_subset(&self.voters, &self.sync) {
            // Changing the replication factor.
            let dead = minus(&self.sync, &self.active);
            let kept = minus(&self.sync, &dead);
            if !dead.is_empty()
                && !kept.is_empty()
                && (self.voters.is_empty() || !inter(&kept, &self.voters).is_empty())
            {
                let numsync = self.numsync.min(len(&self.sync) - len(&dead));
                self.sync_update(numsync, kept)?;
            }
            let add = inter(&minus(&self.sync, &self.voters), &self.active);
            if !add.is_empty() {
                let voters = union(&self.voters, &add);
                self.quorum_update(len(&voters) - self.numsync, voters, None, true)?;
            }
            let remove = minus(&self.sync, &self.voters);
            if !remove.is_empty() {
                let numsync = self.numsync.min(len(&self.sync) - len(&remove));
                self.sync_update(numsync, minus(&self.sync, &remove))?;
            }
        }
        if self.voters != self.sync {
            return Err(QuorumError(format!(
                "voters {:?} and synchronous standbys {:?} still differ",
                self.voters, self.sync
            )));
        }
        let all = len(&union(&self.voters, &self.sync));
        let margin = self.quorum + self.numsync.min(self.numsync_confirmed) - all;
        if margin > 0 {
            if self.numsync > self.sync_wanted {
                let numsync = self.sync_wanted.max(len(&self.voters) - self.quorum);
                self.sync_update(numsync, self.sync.clone())?;
            } else {
                let quorum = len(&self.sync) - self.numsync;
                self.quorum_update(quorum, self.voters.clone(), None, true)?;
            }
        } else {
            let margin = self.quorum + self.numsync - all;
            if self.numsync == self.sync_wanted
                && margin > 0
                && self.numsync > self.numsync_confirmed
            {
                let quorum = len(&self.sync) - self.numsync;
                self.quorum_update(quorum, self.voters.clone(), None, true)?;
            }
        }
        Ok(())
    }

    fn remove_gone_members(&mut self) -> Result<(), QuorumError> {
        let mut gone = minus(&self.sync, &self.active);
        if gone.is_empty() {
            return Ok(());
        }
        if gone == self.sync {
            self.quorum_update(0, Names::new(), None, false)?;
            return self.sync_update(0, Names::new());
        }
        let can_reduce_quorum_by = usize::try_from(self.quorum).unwrap_or(0);
        if can_reduce_quorum_by > 0 {
            // Reverse name order, so the choice is deterministic.
            let remove: Names = gone
                .iter()
                .rev()
                .take(can_reduce_quorum_by)
                .cloned()
                .collect();
            let sync = minus(&self.sync, &remove);
            // While removing members numsync may grow as wanted.
            let numsync = if self.sync_wanted > self.numsync {
                self.sync_wanted
            } else {
                self.numsync
            }
            .min(len(&sync));
            self.sync_update(numsync, sync)?;
            let voters = minus(&self.voters, &remove);
            gone = inter(&gone, &self.sync);
            let quorum = len(&voters) - self.numsync;
            self.quorum_update(quorum, voters, None, gone.is_empty())?;
        }
        if !gone.is_empty() {
            if self.quorum != 0 {
                return Err(QuorumError(format!(
                    "quorum {} left while removing {gone:?}",
                    self.quorum
                )));
            }
            let numsync = self.numsync - len(&gone);
            let sync = minus(&self.sync, &gone);
            let voters = minus(&self.voters, &gone);
            let sync_decrease = numsync - self.sync_wanted.min(len(&sync));
            let quorum = if sync_decrease != 0 {
                sync_decrease.min(len(&voters) - 1)
            } else {
                0
            };
            self.quorum_update(quorum, voters, None, false)?;
            self.sync_update(numsync, sync)?;
        }
        Ok(())
    }

    fn add_new_members(&mut self) -> Result<(), QuorumError> {
        let mut new = minus(&self.active, &self.sync);
        if new.is_empty() {
            return Ok(());
        }
        // First reach the wanted replication factor.
        let wanted = self.sync_wanted.min(len(&union(&self.sync, &new)));
        let mut increase = wanted - self.numsync;
        if increase > 0 {
            let add: Names = if self.sync.is_empty() {
                // Only the leader acknowledges now: all may be added at once.
                new.clone()
            } else {
                new.iter()
                    .take(usize::try_from(increase).unwrap_or(0))
                    .cloned()
                    .collect()
            };
            if !self.sync.is_empty() {
                increase = len(&add);
            }
            self.sync_update(self.numsync + increase, union(&self.sync, &add))?;
            let voters = union(&self.voters, &add);
            self.quorum_update(len(&voters) - wanted, voters, None, true)?;
            new = minus(&new, &self.sync);
        }
        if !new.is_empty() {
            let voters = union(&self.voters, &new);
            let adjust = wanted > self.numsync_confirmed;
            self.quorum_update(len(&voters) - wanted, voters, None, adjust)?;
            self.sync_update(wanted, union(&self.sync, &new))?;
        }
        Ok(())
    }

    fn handle_replication_factor_change(&mut self) -> Result<(), QuorumError> {
        let increase = self.sync_wanted.min(len(&self.sync)) - self.numsync;
        if increase > 0 {
            self.sync_update(self.numsync + increase, self.sync.clone())?;
            let quorum = len(&self.voters) - self.numsync;
            self.quorum_update(quorum, self.voters.clone(), None, true)?;
        } else if increase < 0 {
            if self.quorum - increase < len(&self.voters) {
                let quorum = len(&self.voters) - self.numsync - increase;
                let adjust = self.sync_wanted > self.numsync_confirmed;
                self.quorum_update(quorum, self.voters.clone(), None, adjust)?;
            }
            self.sync_update(self.numsync + increase, self.sync.clone())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Names {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    fn input(
        quorum: u32,
        voters: &[&str],
        numsync: u32,
        sync: &[&str],
        confirmed: u32,
        active: &[&str],
        wanted: u32,
    ) -> QuorumInput {
        QuorumInput {
            leader: "a".into(),
            quorum,
            voters: names(voters),
            numsync,
            sync: names(sync),
            numsync_confirmed: confirmed,
            active: names(active),
            sync_wanted: wanted,
            leader_wanted: "a".into(),
        }
    }

    fn q(quorum: u32, voters: &[&str]) -> Transition {
        Transition::Quorum {
            leader: "a".into(),
            quorum,
            voters: names(voters),
        }
    }

    fn s(numsync: u32, sync: &[&str]) -> Transition {
        Transition::Sync {
            numsync,
            sync: names(sync),
        }
    }

    /// Applies `steps` to the state of `i` as the leader would, checking after each step that
    /// every set of members that can acknowledge a commit overlaps every set that can elect.
    fn apply(mut i: QuorumInput, steps: &[Transition]) -> QuorumInput {
        for step in steps {
            match step {
                Transition::Quorum {
                    leader,
                    quorum,
                    voters,
                } => {
                    i.leader = leader.clone();
                    i.quorum = *quorum;
                    i.voters = voters.clone();
                }
                Transition::Sync { numsync, sync } => {
                    i.numsync = *numsync;
                    i.sync = sync.clone();
                }
                Transition::Restart => break,
            }
            let r = Resolver::new(i.clone());
            assert_eq!(r.check_invariants(), Ok(()), "after {step:?}");
        }
        i
    }

    #[test]
    fn standbys_are_added_to_postgres_first_then_to_the_key_once_confirmed() {
        // Nothing synchronous yet; two standbys stream.
        let start = input(0, &[], 0, &[], 0, &["b", "c"], 1);
        let steps = transitions(start.clone()).expect("plans");
        assert_eq!(steps, vec![s(1, &["b", "c"]), Transition::Restart]);
        let mut next = apply(start, &steps);
        // One of them caught up.
        next.numsync_confirmed = 1;
        let steps = transitions(next.clone()).expect("plans");
        assert_eq!(steps, vec![q(1, &["b", "c"])]);
        let done = apply(next, &steps);
        assert_eq!(transitions(done).expect("plans"), vec![]);
    }

    #[test]
    fn a_gone_standby_leaves_the_key_before_postgres_stops_waiting_for_it() {
        let start = input(1, &["b", "c"], 1, &["b", "c"], 1, &["b"], 1);
        let steps = transitions(start.clone()).expect("plans");
        assert_eq!(steps, vec![s(1, &["b"]), q(0, &["b"])]);
        apply(start, &steps);
        // The last one going empties the key first.
        let start = input(0, &["b"], 1, &["b"], 1, &[], 1);
        let steps = transitions(start.clone()).expect("plans");
        assert_eq!(steps, vec![q(0, &[]), s(0, &[])]);
        apply(start, &steps);
    }

    #[test]
    fn a_higher_node_count_raises_numsync_before_the_quorum_drops() {
        let start = input(
            2,
            &["b", "c", "d"],
            1,
            &["b", "c", "d"],
            1,
            &["b", "c", "d"],
            2,
        );
        let steps = transitions(start.clone()).expect("plans");
        // The quorum stays until a second standby confirms it has caught up.
        assert_eq!(steps, vec![s(2, &["b", "c", "d"])]);
        let mut next = apply(start, &steps);
        next.numsync_confirmed = 2;
        let steps = transitions(next.clone()).expect("plans");
        assert_eq!(steps, vec![q(1, &["b", "c", "d"])]);
        let mut next = apply(next, &steps);
        assert_eq!(transitions(next.clone()).expect("plans"), vec![]);
        // And back down: the quorum rises first.
        next.sync_wanted = 1;
        let steps = transitions(next.clone()).expect("plans");
        assert_eq!(steps, vec![q(2, &["b", "c", "d"]), s(1, &["b", "c", "d"])]);
        apply(next, &steps);
    }

    #[test]
    fn a_new_leader_counts_the_former_one_as_a_voter() {
        // b was promoted; the key still names a with voters b, c.
        let start = QuorumInput {
            leader: "a".into(),
            quorum: 1,
            voters: names(&["b", "c"]),
            numsync: 1,
            sync: names(&["a", "c"]),
            numsync_confirmed: 0,
            active: names(&["c"]),
            sync_wanted: 1,
            leader_wanted: "b".into(),
        };
        let steps = transitions(start.clone()).expect("plans");
        let first = steps.first().expect("a step");
        assert_eq!(
            *first,
            Transition::Quorum {
                leader: "b".into(),
                quorum: 1,
                voters: names(&["a", "c"]),
            }
        );
    }

    #[test]
    fn a_broken_state_is_reset_to_what_postgres_waits_for() {
        // Voters b, c with quorum 0 while postgres waits for one of b, c, d: two could elect
        // without the one that acknowledged.
        let start = input(0, &["b", "c"], 1, &["b", "c", "d"], 1, &["b", "c", "d"], 1);
        let steps = transitions(start.clone()).expect("plans");
        assert!(matches!(
            steps.first(),
            Some(Transition::Quorum { quorum: 2, .. })
        ));
        apply(start, &steps);
    }

    #[test]
    fn a_listed_standby_is_ready_once_it_reached_the_position_of_its_listing() {
        let mut r = Readiness::default();
        let listed = names(&["b", "c"]);
        let row = |n: &str, at: u64| (n.to_owned(), "quorum".to_owned(), Some(at));
        // Listed when the leader had flushed 100.
        let ready = r.observe(
            "ANY 1 (b,c)",
            &listed,
            Some(100),
            &[row("b", 90), row("c", 100)],
            "quorum",
        );
        assert_eq!(ready, names(&["c"]));
        let ready = r.observe(
            "ANY 1 (b,c)",
            &listed,
            Some(150),
            &[row("b", 100), row("c", 120)],
            "quorum",
        );
        assert_eq!(
            ready,
            names(&["b", "c"]),
            "the target stays that of the listing"
        );
        // Disconnected: it must catch up again.
        let ready = r.observe(
            "ANY 1 (b,c)",
            &listed,
            Some(150),
            &[row("b", 150)],
            "quorum",
        );
        assert_eq!(ready, names(&["b"]));
        // A new value resets the target; a standby reported in another state does not count.
        let ready = r.observe(
            "ANY 2 (b,c)",
            &listed,
            Some(200),
            &[row("b", 150), ("c".into(), "potential".into(), Some(300))],
            "quorum",
        );
        assert_eq!(
            ready,
            names(&["b"]),
            "b stays ready; c is not a quorum standby yet"
        );
    }

    #[test]
    fn every_plan_from_any_state_keeps_the_overlap() {
        // Exhaustive over small states: whatever the plan, each step keeps the invariant.
        let all = ["b", "c", "d"];
        let subsets: Vec<Vec<&str>> = (0..8)
            .map(|m| {
                all.iter()
                    .enumerate()
                    .filter(|(i, _)| m & (1 << i) != 0)
                    .map(|(_, n)| *n)
                    .collect()
            })
            .collect();
        for voters in &subsets {
            for sync in &subsets {
                for active in &subsets {
                    for quorum in 0..3u32 {
                        for numsync in 0..=u32::try_from(sync.len()).unwrap_or(0) {
                            for wanted in 1..3u32 {
                                for confirmed in 0..=numsync {
                                    let i = input(
                                        quorum, voters, numsync, sync, confirmed, active, wanted,
                                    );
                                    if Resolver::new(i.clone()).check_invariants().is_err() {
                                        continue;
                                    }
                                    if let Ok(steps) = transitions(i.clone()) {
                                        apply(i, &steps);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
