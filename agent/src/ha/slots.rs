//! Which replication slots to create, drop, advance or copy from the primary, as Patroni's
//! `SlotsHandler.sync_replication_slots` decides it (`patroni/postgresql/slots.py`): a pure
//! function of the slots postgres has, the slots the cluster wants and the `ignore_slots`
//! matchers. The HA loop carries the plan out (`HaLoop::sync_slots`).
//!
//! Logical slots, in Patroni's way:
//! - on the primary a permanent logical slot is created in its database and kept; its
//!   `confirmed_flush_lsn` is published in the `status` key (`slots`);
//! - on a replica that could take over, a permanent logical slot it lacks is copied from the
//!   primary (its `state` file, postgres stopped), but only once the primary publishes a position
//!   for it; a copy it has is advanced to that position, never past its own replay position;
//! - a slot whose type, database or plugin differ from the configuration is dropped (and then
//!   created or copied again), and so is one whose WAL is lost;
//! - a slot that is neither wanted nor matched by `ignore_slots` is dropped, logical ones too,
//!   except while the cluster is paused; an active slot is never dropped.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::slots::{IgnoreSlot, LogicalSlot};
use crate::postgres::slots::{ReplicationSlot, SlotType};

/// A permanent logical slot as this member wants it, with the position the primary publishes
/// for it (`status.slots`), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedLogical {
    pub slot: LogicalSlot,
    pub published_lsn: Option<u64>,
}

/// The slots this member must have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WantedSlots {
    pub physical: BTreeSet<String>,
    pub logical: BTreeMap<String, WantedLogical>,
    /// Physical slots of `physical` that nobody is expected to stream from here, with the
    /// position the leader publishes for them (`status.slots`): Patroni advances such a slot to
    /// it, so a replica keeps the slots the members need once it leads without retaining WAL
    /// forever.
    pub advance_physical: BTreeMap<String, u64>,
}

/// Why a slot is dropped (for the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Neither wanted nor ignored.
    Unknown,
    /// Wanted with another type, database or plugin.
    Changed,
    /// Its WAL is gone (`wal_status = 'lost'`): it can never be used again.
    WalLost,
    /// A physical slot to advance that reserves no WAL (created by someone else without
    /// reserving): it cannot be advanced, so it is created again.
    NoReservedWal,
    /// A physical slot nobody is expected to stream from, with an `xmin` a former consumer's
    /// `hot_standby_feedback` left: it would hold back vacuum for good, so it is made again.
    StaleFeedback,
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DropReason::Unknown => "neither a member's nor permanent nor ignored",
            DropReason::Changed => "its type, database or plugin differ from the configuration",
            DropReason::WalLost => "its WAL is lost",
            DropReason::NoReservedWal => {
                "it reserves no WAL, so it cannot be advanced (not created by pgwarden?)"
            }
            DropReason::StaleFeedback => {
                "nobody streams from it here, but it holds an xmin that would stop vacuum"
            }
        })
    }
}

/// One SQL step of a plan, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotChange {
    Drop {
        name: String,
        reason: DropReason,
    },
    CreatePhysical {
        name: String,
    },
    /// `pg_create_logical_replication_slot` in `slot.database` (a primary only).
    CreateLogical {
        name: String,
        slot: LogicalSlot,
    },
    /// `pg_replication_slot_advance` of a replica's copy, in `database`.
    Advance {
        name: String,
        database: String,
        lsn: u64,
    },
    /// `pg_replication_slot_advance` of a physical slot nobody streams from here.
    AdvancePhysical {
        name: String,
        lsn: u64,
    },
}

/// What [`plan`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotPlan {
    pub changes: Vec<SlotChange>,
    /// Logical slots to copy from the primary (a replica only).
    pub copy_from_primary: Vec<String>,
    /// `confirmed_flush_lsn` of the permanent logical slots a primary has, for `status.slots`.
    pub positions: BTreeMap<String, u64>,
}

/// Where postgres stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalState {
    /// Not in recovery: logical slots are created here, not copied.
    pub primary: bool,
    /// The replay position of a replica: its copies are never advanced past it.
    pub replay_lsn: Option<u64>,
    /// Maintenance mode: Patroni drops no unknown slot then.
    pub paused: bool,
}

/// Patroni's `compare_slots`: a wanted logical slot matches an existing one of the same
/// database and plugin.
fn matches_logical(existing: &ReplicationSlot, wanted: &LogicalSlot) -> bool {
    existing.kind == SlotType::Logical
        && existing.database.as_deref() == Some(wanted.database.as_str())
        && existing.plugin.as_deref() == Some(wanted.plugin.as_str())
}

fn ignored(slot: &ReplicationSlot, ignore: &[IgnoreSlot]) -> bool {
    ignore.iter().any(|m| {
        m.matches(
            &slot.name,
            slot.kind.as_str(),
            slot.database.as_deref(),
            slot.plugin.as_deref(),
        )
    })
}

/// The plan that brings `existing` to `wanted` (see the module docs for the rules).
pub fn plan(
    wanted: &WantedSlots,
    existing: &[ReplicationSlot],
    ignore: &[IgnoreSlot],
    local: LocalState,
) -> SlotPlan {
    let mut plan = SlotPlan::default();
    // Slots left in place after the drops below, by name.
    let mut kept: BTreeMap<&str, &ReplicationSlot> = BTreeMap::new();
    for slot in existing {
        let is_wanted =
            wanted.physical.contains(&slot.name) || wanted.logical.contains_key(&slot.name);
        let reason = if !is_wanted {
            // Patroni leaves unknown slots alone in maintenance mode and when ignored.
            (!local.paused && !ignored(slot, ignore)).then_some(DropReason::Unknown)
        } else if slot.wal_lost {
            (!local.paused && !ignored(slot, ignore)).then_some(DropReason::WalLost)
        } else if slot.kind == SlotType::Physical
            && wanted.advance_physical.contains_key(&slot.name)
            && (slot.restart_lsn.is_none() || slot.xmin.is_some())
        {
            Some(if slot.restart_lsn.is_none() {
                DropReason::NoReservedWal
            } else {
                DropReason::StaleFeedback
            })
        } else {
            let same = match wanted.logical.get(&slot.name) {
                Some(w) => matches_logical(slot, &w.slot),
                None => slot.kind == SlotType::Physical,
            };
            (!same).then_some(DropReason::Changed)
        };
        match reason {
            // An active slot cannot be dropped; Patroni tries again next cycle.
            Some(reason) if !slot.active => plan.changes.push(SlotChange::Drop {
                name: slot.name.clone(),
                reason,
            }),
            Some(_) => {}
            None => {
                kept.insert(&slot.name, slot);
            }
        }
    }
    // An active slot that should have gone stays, and blocks its name, until it can be dropped.
    let blocked = |name: &str| {
        !kept.contains_key(name) && existing.iter().any(|s| s.name == name && s.active)
    };
    for name in &wanted.physical {
        match kept.get(name.as_str()) {
            None if !blocked(name) => plan
                .changes
                .push(SlotChange::CreatePhysical { name: name.clone() }),
            None => {}
            Some(slot) => {
                let target = wanted.advance_physical.get(name).copied();
                if let (Some(lsn), Some(at), false) = (target, slot.restart_lsn, slot.active) {
                    if lsn > at {
                        plan.changes.push(SlotChange::AdvancePhysical {
                            name: name.clone(),
                            lsn,
                        });
                    }
                }
            }
        }
    }
    for (name, want) in &wanted.logical {
        let here = kept.get(name.as_str());
        if blocked(name) {
            continue;
        }
        match (here, local.primary) {
            (Some(slot), true) => {
                if let Some(lsn) = slot.confirmed_flush_lsn {
                    plan.positions.insert(name.clone(), lsn);
                }
            }
            (None, true) => plan.changes.push(SlotChange::CreateLogical {
                name: name.clone(),
                slot: want.slot.clone(),
            }),
            (Some(slot), false) => {
                let target = match (want.published_lsn, local.replay_lsn) {
                    (Some(published), Some(replayed)) => Some(published.min(replayed)),
                    _ => None,
                };
                if let Some(target) = target {
                    if slot.confirmed_flush_lsn.is_none_or(|at| at < target) {
                        plan.changes.push(SlotChange::Advance {
                            name: name.clone(),
                            database: want.slot.database.clone(),
                            lsn: target,
                        });
                    }
                }
            }
            // Patroni copies only slots the primary publishes a position for: one it has not
            // created yet has nothing to copy.
            (None, false) => {
                if want.published_lsn.is_some() {
                    plan.copy_from_primary.push(name.clone());
                }
            }
        }
    }
    plan
}

/// Patroni's check that a copied logical slot is safe to use after a failover
/// (`_ready_logical_slots`): the primary must keep the catalog rows the copy needs, which it
/// does once this replica's physical slot there has a `catalog_xmin` (hot_standby_feedback
/// carries the copy's `catalog_xmin` to it) that is at least the primary's slot's
/// `catalog_xmin` (remembered when the physical one first became valid) and at most the copy's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Copied slots not yet known safe, with the primary's `catalog_xmin` once remembered.
    pending: BTreeMap<String, Option<u64>>,
}

impl Readiness {
    /// A slot was copied (or found at start): it is unsafe until proven otherwise.
    pub fn copied(&mut self, name: &str) {
        self.pending.insert(name.to_owned(), None);
    }

    /// A slot was dropped or is no longer wanted.
    pub fn forget(&mut self, name: &str) {
        self.pending.remove(name);
    }

    /// The slots not yet known safe.
    pub fn pending(&self) -> impl Iterator<Item = &str> {
        self.pending.keys().map(String::as_str)
    }

    /// The slots whose primary `catalog_xmin` is still to be remembered.
    pub fn unremembered(&self) -> Vec<String> {
        self.pending
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// One check: `physical_catalog_xmin` of this replica's slot on the primary,
    /// `primary_catalog_xmin` of the logical slots there (as read now), `local` the copies'
    /// own `catalog_xmin`. Returns the slots that became safe.
    pub fn check(
        &mut self,
        physical_catalog_xmin: u64,
        primary_catalog_xmin: &BTreeMap<String, u64>,
        local: &BTreeMap<String, u64>,
    ) -> Vec<String> {
        for (name, remembered) in self.pending.iter_mut() {
            if remembered.is_none() {
                *remembered = primary_catalog_xmin.get(name).copied();
            }
        }
        let safe: Vec<String> = self
            .pending
            .iter()
            .filter(|(name, remembered)| {
                remembered.is_some_and(|primary| {
                    local.get(*name).is_some_and(|copy| {
                        primary <= physical_catalog_xmin && physical_catalog_xmin <= *copy
                    })
                })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &safe {
            self.pending.remove(name);
        }
        safe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn physical(name: &str, active: bool) -> ReplicationSlot {
        ReplicationSlot {
            name: name.into(),
            kind: SlotType::Physical,
            database: None,
            plugin: None,
            active,
            confirmed_flush_lsn: None,
            catalog_xmin: None,
            wal_lost: false,
            restart_lsn: Some(0x100),
            xmin: None,
        }
    }

    fn logical(name: &str, database: &str, plugin: &str, at: u64) -> ReplicationSlot {
        ReplicationSlot {
            name: name.into(),
            kind: SlotType::Logical,
            database: Some(database.into()),
            plugin: Some(plugin.into()),
            active: false,
            confirmed_flush_lsn: Some(at),
            catalog_xmin: Some(740),
            wal_lost: false,
            restart_lsn: at.checked_sub(0x10),
            xmin: None,
        }
    }

    fn wanted(logical: &[(&str, &str, &str, Option<u64>)]) -> WantedSlots {
        WantedSlots {
            physical: ["pg1".to_owned()].into(),
            logical: logical
                .iter()
                .map(|(name, database, plugin, lsn)| {
                    (
                        (*name).to_owned(),
                        WantedLogical {
                            slot: LogicalSlot {
                                database: (*database).into(),
                                plugin: (*plugin).into(),
                            },
                            published_lsn: *lsn,
                        },
                    )
                })
                .collect(),
            advance_physical: Default::default(),
        }
    }

    const PRIMARY: LocalState = LocalState {
        primary: true,
        replay_lsn: None,
        paused: false,
    };

    fn replica(replay: u64) -> LocalState {
        LocalState {
            primary: false,
            replay_lsn: Some(replay),
            paused: false,
        }
    }

    /// `_ensure_logical_slots_primary`: created when missing, kept and published when present.
    #[test]
    fn the_primary_creates_missing_logical_slots_and_publishes_the_present_ones() {
        let want = wanted(&[
            ("cdc", "app", "pgoutput", None),
            ("audit", "postgres", "test_decoding", None),
        ]);
        let existing = [
            physical("pg1", true),
            logical("cdc", "app", "pgoutput", 500),
        ];
        let plan = plan(&want, &existing, &[], PRIMARY);
        assert_eq!(
            plan.changes,
            [SlotChange::CreateLogical {
                name: "audit".into(),
                slot: LogicalSlot {
                    database: "postgres".into(),
                    plugin: "test_decoding".into()
                }
            }]
        );
        assert_eq!(plan.positions, [("cdc".to_owned(), 500)].into());
        assert!(plan.copy_from_primary.is_empty());
    }

    /// `_drop_incorrect_slots`: another plugin or database means drop, then create again.
    #[test]
    fn a_logical_slot_with_another_plugin_is_dropped_and_created_again() {
        let want = wanted(&[("cdc", "app", "pgoutput", None)]);
        let existing = [
            physical("pg1", false),
            logical("cdc", "app", "test_decoding", 500),
        ];
        let plan = plan(&want, &existing, &[], PRIMARY);
        assert_eq!(
            plan.changes,
            [
                SlotChange::Drop {
                    name: "cdc".into(),
                    reason: DropReason::Changed
                },
                SlotChange::CreateLogical {
                    name: "cdc".into(),
                    slot: LogicalSlot {
                        database: "app".into(),
                        plugin: "pgoutput".into()
                    }
                }
            ]
        );
        assert!(plan.positions.is_empty());
    }

    /// Unknown logical slots are dropped as physical ones are, unless ignored, active or paused.
    #[test]
    fn unknown_logical_slots_are_dropped_unless_ignored_active_or_paused() {
        let want = wanted(&[]);
        let mut active = logical("busy", "app", "pgoutput", 1);
        active.active = true;
        let existing = [
            physical("pg1", false),
            logical("stray", "app", "pgoutput", 1),
            logical("external", "app", "wal2json", 1),
            active,
        ];
        let ignore = [IgnoreSlot {
            plugin: Some("wal2json".into()),
            ..IgnoreSlot::default()
        }];
        let p = plan(&want, &existing, &ignore, PRIMARY);
        assert_eq!(
            p.changes,
            [SlotChange::Drop {
                name: "stray".into(),
                reason: DropReason::Unknown
            }]
        );
        let paused = LocalState {
            paused: true,
            ..PRIMARY
        };
        assert!(plan(&want, &existing, &ignore, paused).changes.is_empty());
    }

    /// `_ensure_logical_slots_replica`: copy only what the primary publishes, advance a copy
    /// to the published position but not past the replica's replay.
    #[test]
    fn a_replica_copies_published_slots_and_advances_its_copies_up_to_its_replay() {
        let want = wanted(&[
            ("cdc", "app", "pgoutput", Some(900)),
            ("new", "app", "pgoutput", None),
            ("later", "app", "pgoutput", Some(300)),
            ("ahead", "app", "pgoutput", Some(400)),
        ]);
        let existing = [
            logical("cdc", "app", "pgoutput", 500),
            logical("ahead", "app", "pgoutput", 400),
            physical("pg1", false),
        ];
        let p = plan(&want, &existing, &[], replica(800));
        assert_eq!(
            p.changes,
            [SlotChange::Advance {
                name: "cdc".into(),
                database: "app".into(),
                lsn: 800
            }]
        );
        assert_eq!(p.copy_from_primary, ["later"]);
        assert!(p.positions.is_empty(), "a replica publishes nothing");
    }

    /// A copy whose plugin no longer matches is dropped and copied again.
    #[test]
    fn a_replica_copies_again_a_slot_whose_configuration_changed() {
        let want = wanted(&[("cdc", "app", "pgoutput", Some(900))]);
        let existing = [logical("cdc", "other", "pgoutput", 500)];
        let p = plan(&want, &existing, &[], replica(1000));
        assert_eq!(
            p.changes,
            [
                SlotChange::Drop {
                    name: "cdc".into(),
                    reason: DropReason::Changed
                },
                SlotChange::CreatePhysical { name: "pg1".into() }
            ]
        );
        assert_eq!(p.copy_from_primary, ["cdc"]);
    }

    /// A wanted slot whose WAL is lost is dropped (then made again), but not while paused.
    #[test]
    fn a_permanent_slot_with_lost_wal_is_dropped_and_made_again() {
        let want = wanted(&[("cdc", "app", "pgoutput", None)]);
        let mut lost = logical("cdc", "app", "pgoutput", 5);
        lost.wal_lost = true;
        let p = plan(&want, &[lost, physical("pg1", true)], &[], PRIMARY);
        assert_eq!(
            p.changes,
            [
                SlotChange::Drop {
                    name: "cdc".into(),
                    reason: DropReason::WalLost
                },
                SlotChange::CreateLogical {
                    name: "cdc".into(),
                    slot: LogicalSlot {
                        database: "app".into(),
                        plugin: "pgoutput".into()
                    }
                }
            ]
        );
    }

    /// `_ready_logical_slots`: safe once the physical slot's catalog_xmin lies between the
    /// primary's logical catalog_xmin and the copy's.
    #[test]
    fn a_copy_is_safe_once_the_physical_slot_holds_its_catalog_xmin() {
        let mut readiness = Readiness::default();
        readiness.copied("cdc");
        assert_eq!(readiness.unremembered(), ["cdc"]);
        let primary: BTreeMap<String, u64> = [("cdc".to_owned(), 740)].into();
        // The copy's catalog_xmin has not reached the primary yet.
        let copy: BTreeMap<String, u64> = [("cdc".to_owned(), 740)].into();
        assert!(readiness.check(700, &primary, &copy).is_empty());
        assert!(readiness.unremembered().is_empty(), "remembered once");
        assert_eq!(readiness.check(740, &primary, &copy), ["cdc"]);
        assert_eq!(readiness.pending().count(), 0);
    }

    /// Patroni's `_ensure_physical_slots` on a replica: a kept physical slot nobody streams
    /// from is advanced to the leader's published position, never backwards and never while
    /// in use; one that reserves no WAL cannot be advanced and is created again.
    #[test]
    fn a_replica_advances_the_physical_slots_it_keeps_for_after_a_failover() {
        let mut want = wanted(&[]);
        want.physical = ["pg0".to_owned(), "pg1".to_owned(), "pg2".to_owned()].into();
        want.advance_physical = [("pg0".to_owned(), 0x500), ("pg2".to_owned(), 0x80)].into();
        let replica = replica(0x600);
        let mut unreserved = physical("pg2", false);
        unreserved.restart_lsn = None;
        let existing = [physical("pg0", false), physical("pg1", false), unreserved];
        let p = plan(&want, &existing, &[], replica);
        assert_eq!(
            p.changes,
            vec![
                SlotChange::Drop {
                    name: "pg2".into(),
                    reason: DropReason::NoReservedWal
                },
                SlotChange::AdvancePhysical {
                    name: "pg0".into(),
                    lsn: 0x500
                },
                SlotChange::CreatePhysical { name: "pg2".into() },
            ]
        );
        // Behind the slot, or in use (pg1 streams from us): left alone.
        want.advance_physical.insert("pg0".into(), 0x80);
        let existing = [
            physical("pg0", true),
            physical("pg1", false),
            physical("pg2", false),
        ];
        assert!(plan(&want, &existing, &[], replica).changes.is_empty());
        // A former cascading consumer's feedback left an xmin on pg2: made again.
        let mut stale = physical("pg2", false);
        stale.xmin = Some(731);
        let existing = [physical("pg0", true), physical("pg1", false), stale];
        assert_eq!(
            plan(&want, &existing, &[], replica).changes,
            vec![
                SlotChange::Drop {
                    name: "pg2".into(),
                    reason: DropReason::StaleFeedback
                },
                SlotChange::CreatePhysical { name: "pg2".into() },
            ]
        );
    }
}
