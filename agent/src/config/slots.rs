//! Patroni's permanent replication slots (`slots` in the dynamic configuration) and the slots
//! it must leave alone (`ignore_slots`).
//!
//! A permanent physical slot is created on the leader and never dropped there; after a failover
//! the new leader creates it again. A permanent logical slot is created on the primary in its
//! database, copied to the replicas that could take over and kept advanced there, so a logical
//! consumer continues on the new primary (see `ha::slots` for the rules and `postgres::slots`
//! for the copy). `ignore_slots` names the slots, physical or logical, pgwarden leaves alone.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One `ignore_slots` entry: a slot matches when every attribute given here is equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct IgnoreSlot {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// Anything else: no slot has such an attribute, so (as in Patroni) the entry matches none.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl IgnoreSlot {
    /// Whether the physical slot `name` matches (a physical slot has no database or plugin).
    pub fn matches_physical(&self, name: &str) -> bool {
        self.matches(name, "physical", None, None)
    }

    /// Patroni's `ignore_replication_slot`: every attribute this entry gives equals the slot's
    /// (`kind` is `physical` or `logical`; a physical slot has no database or plugin).
    pub fn matches(
        &self,
        name: &str,
        kind: &str,
        database: Option<&str>,
        plugin: Option<&str>,
    ) -> bool {
        let equal = |wanted: &Option<String>, actual: Option<&str>| {
            wanted.as_deref().is_none_or(|w| Some(w) == actual)
        };
        equal(&self.name, Some(name))
            && equal(&self.kind, Some(kind))
            && equal(&self.database, database)
            && equal(&self.plugin, plugin)
            && self.extra.is_empty()
    }
}

/// A warning by path for every `ignore_slots` attribute no slot has.
pub fn ignore_warnings(ignore: &[IgnoreSlot], prefix: &str) -> Vec<String> {
    ignore
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            m.extra.keys().map(move |k| {
                format!(
                    "`{prefix}.ignore_slots[{i}].{k}` is not a slot attribute (name, type, \
                     database, plugin): this entry matches no slot"
                )
            })
        })
        .collect()
}

/// Patroni's rule for slot names (`[a-z0-9_]`, at most 63 characters).
pub fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The database and output plugin of a permanent logical slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalSlot {
    pub database: String,
    pub plugin: String,
}

/// What one `slots` entry asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotKind {
    Physical,
    Logical(LogicalSlot),
}

/// Reads one `slots` entry as Patroni's `_merge_permanent_slots` does: a value that is not an
/// object (`test_physical: 0`) is a physical slot; an object without `type` is logical when it
/// names both `database` and `plugin`, else physical; `type: logical` needs both.
pub fn slot_kind(value: &Value) -> Result<SlotKind, String> {
    let Some(obj) = value.as_object() else {
        return Ok(SlotKind::Physical);
    };
    let text = |key: &str| {
        obj.get(key)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
    };
    let logical = match (text("database"), text("plugin")) {
        (Some(database), Some(plugin)) => Some(LogicalSlot {
            database: database.to_owned(),
            plugin: plugin.to_owned(),
        }),
        _ => None,
    };
    match obj.get("type") {
        None => Ok(logical.map_or(SlotKind::Physical, SlotKind::Logical)),
        Some(kind) => match kind.as_str() {
            Some("physical") => Ok(SlotKind::Physical),
            Some("logical") => logical
                .map(SlotKind::Logical)
                .ok_or_else(|| "a logical slot needs `database` and `plugin`".to_owned()),
            _ => Err(format!("unknown slot type {kind}")),
        },
    }
}

/// The `slots` entry `name` as pgwarden keeps it, or why it is not kept: the start-up warning
/// and `PATCH /config`'s refusal give the same reason.
fn read_entry(name: &str, value: &Value) -> Result<SlotKind, String> {
    if !valid_slot_name(name) {
        return Err("a slot name is 1-63 characters of a-z, 0-9 and _".into());
    }
    slot_kind(value)
}

/// The permanent slots of the dynamic configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PermanentSlots {
    pub physical: BTreeSet<String>,
    pub logical: BTreeMap<String, LogicalSlot>,
}

/// The permanent slots of `slots`, and a warning by path (`prefix.slots.<name>`) for every
/// entry that is neither.
pub fn permanent(slots: &BTreeMap<String, Value>, prefix: &str) -> (PermanentSlots, Vec<String>) {
    let mut permanent = PermanentSlots::default();
    let mut warnings = Vec::new();
    for (name, value) in slots {
        match read_entry(name, value) {
            Ok(SlotKind::Physical) => {
                permanent.physical.insert(name.clone());
            }
            Ok(SlotKind::Logical(slot)) => {
                permanent.logical.insert(name.clone(), slot);
            }
            Err(why) => warnings.push(format!("`{prefix}.slots.{name}` ignored: {why}")),
        }
    }
    (permanent, warnings)
}

/// `PATCH /config`'s check of `slots`: what the members could not use is refused.
pub fn check_slots(value: &Value) -> Result<(), String> {
    let Some(slots) = value.as_object() else {
        return Err(format!("`slots`: {value} is not an object"));
    };
    match slots
        .iter()
        .find_map(|(name, value)| read_entry(name, value).err().map(|why| (name, why)))
    {
        Some((name, why)) => Err(format!("`slots.{name}`: {why}")),
        None => Ok(()),
    }
}

/// `PATCH /config`'s check of `ignore_slots`: a list of objects with string attributes.
pub fn check_ignore_slots(value: &Value) -> Result<(), String> {
    let Some(list) = value.as_array() else {
        return Err(format!("`ignore_slots`: {value} is not a list"));
    };
    for (i, entry) in list.iter().enumerate() {
        let Some(obj) = entry.as_object() else {
            return Err(format!("`ignore_slots[{i}]`: {entry} is not an object"));
        };
        for (key, v) in obj {
            if !["name", "type", "database", "plugin"].contains(&key.as_str()) {
                return Err(format!(
                    "`ignore_slots[{i}].{key}` is not a slot attribute (name, type, database, \
                     plugin)"
                ));
            }
            if !v.is_string() {
                return Err(format!("`ignore_slots[{i}].{key}`: {v} is not a string"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_are_read_as_patroni_reads_them() {
        let slots: BTreeMap<String, Value> = serde_json::from_value(json!({
            "test_physical": 0,
            "typed": {"type": "physical"},
            "untyped": {},
            "Bad-Name": 0,
            "test_logical": {"type": "logical", "database": "postgres", "plugin": "test_decoding"},
            "untyped_logical": {"database": "app", "plugin": "pgoutput"},
            "half_untyped": {"database": "app"},
            "half_logical": {"type": "logical", "database": "postgres"},
            "odd_type": {"type": "wal"},
        }))
        .expect("map");
        let (permanent, warnings) = permanent(&slots, "config");
        assert_eq!(
            permanent.physical.into_iter().collect::<Vec<_>>(),
            ["half_untyped", "test_physical", "typed", "untyped"]
        );
        assert_eq!(
            permanent.logical.into_iter().collect::<Vec<_>>(),
            [
                (
                    "test_logical".to_owned(),
                    LogicalSlot {
                        database: "postgres".into(),
                        plugin: "test_decoding".into()
                    }
                ),
                (
                    "untyped_logical".to_owned(),
                    LogicalSlot {
                        database: "app".into(),
                        plugin: "pgoutput".into()
                    }
                )
            ]
        );
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        for path in ["slots.Bad-Name", "slots.half_logical", "slots.odd_type"] {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains(&format!("`config.{path}`"))),
                "{path}: {warnings:?}"
            );
        }
        assert!(check_slots(&json!({"a": 0, "b": {"type": "physical"}})).is_ok());
        assert!(
            check_slots(&json!({"a": {"type": "logical", "database": "d", "plugin": "p"}})).is_ok()
        );
        assert!(
            check_slots(&json!({"a": {"type": "logical", "database": "d"}}))
                .is_err_and(|e| e.contains("`slots.a`"))
        );
        assert!(check_slots(&json!([1])).is_err());
    }

    #[test]
    fn ignore_matchers_match_on_every_given_attribute() {
        let by_name = IgnoreSlot {
            name: Some("ext".into()),
            ..IgnoreSlot::default()
        };
        assert!(by_name.matches_physical("ext"));
        assert!(!by_name.matches_physical("other"));
        let all_physical = IgnoreSlot {
            kind: Some("physical".into()),
            ..IgnoreSlot::default()
        };
        assert!(all_physical.matches_physical("anything"));
        let logical = IgnoreSlot {
            name: Some("ext".into()),
            database: Some("postgres".into()),
            ..IgnoreSlot::default()
        };
        assert!(
            !logical.matches_physical("ext"),
            "a physical slot has no database"
        );
        assert!(logical.matches("ext", "logical", Some("postgres"), Some("pgoutput")));
        assert!(!logical.matches("ext", "logical", Some("app"), Some("pgoutput")));
        let by_plugin = IgnoreSlot {
            plugin: Some("wal2json".into()),
            ..IgnoreSlot::default()
        };
        assert!(by_plugin.matches("cdc", "logical", Some("app"), Some("wal2json")));
        assert!(!by_plugin.matches("cdc", "logical", Some("app"), Some("pgoutput")));
        assert!(check_ignore_slots(&json!([{"name": "x", "type": "physical"}])).is_ok());
        assert!(check_ignore_slots(&json!([{"nme": "x"}]))
            .is_err_and(|e| e.contains("`ignore_slots[0].nme`")));
    }
}
