//! Patroni's permanent replication slots (`slots` in the dynamic configuration) and the slots
//! it must leave alone (`ignore_slots`).
//!
//! A permanent physical slot is created on the leader and never dropped there; after a failover
//! the new leader creates it again. pgwarden manages physical slots only: it never drops a
//! logical slot, so `ignore_slots` matters for physical ones, and a logical entry in `slots` is
//! warned about by path (not created, not copied to replicas).

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
        self.name.as_deref().is_none_or(|n| n == name)
            && self.kind.as_deref().is_none_or(|k| k == "physical")
            && self.database.is_none()
            && self.plugin.is_none()
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
                    "`{prefix}.ignore_slots[{i}].{k}` is not a slot attribute (name, type,                      database, plugin): this entry matches no slot"
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

/// What one `slots` entry asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotKind {
    Physical,
    Logical,
}

/// Reads one `slots` entry as Patroni does: a value that is not an object (`test_physical: 0`)
/// or an object without `type` is a physical slot; `type: logical` needs `database` and
/// `plugin`.
pub fn slot_kind(value: &Value) -> Result<SlotKind, String> {
    let Some(obj) = value.as_object() else {
        return Ok(SlotKind::Physical);
    };
    match obj
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("physical")
    {
        "physical" => Ok(SlotKind::Physical),
        "logical" => {
            for key in ["database", "plugin"] {
                if !obj.get(key).is_some_and(Value::is_string) {
                    return Err(format!("a logical slot needs `{key}`"));
                }
            }
            Ok(SlotKind::Logical)
        }
        other => Err(format!("unknown slot type {other:?}")),
    }
}

/// Why the `slots` entry `name` is not a permanent physical slot pgwarden creates, if it is
/// not one: the start-up warning and `PATCH /config`'s refusal give the same reason.
fn not_physical(name: &str, value: &Value) -> Option<String> {
    if !valid_slot_name(name) {
        return Some("a slot name is 1-63 characters of a-z, 0-9 and _".into());
    }
    match slot_kind(value) {
        Ok(SlotKind::Physical) => None,
        Ok(SlotKind::Logical) => Some(
            "permanent logical slots are not implemented by pgwarden (an existing logical \
             slot is never dropped)"
                .into(),
        ),
        Err(why) => Some(why),
    }
}

/// The permanent physical slots of `slots`, and a warning by path (`prefix.slots.<name>`) for
/// every entry that is not one.
pub fn permanent_physical(
    slots: &BTreeMap<String, Value>,
    prefix: &str,
) -> (BTreeSet<String>, Vec<String>) {
    let mut physical = BTreeSet::new();
    let mut warnings = Vec::new();
    for (name, value) in slots {
        match not_physical(name, value) {
            None => {
                physical.insert(name.clone());
            }
            Some(why) => warnings.push(format!("`{prefix}.slots.{name}` ignored: {why}")),
        }
    }
    (physical, warnings)
}

/// `PATCH /config`'s check of `slots`: what the members could not use is refused.
pub fn check_slots(value: &Value) -> Result<(), String> {
    let Some(slots) = value.as_object() else {
        return Err(format!("`slots`: {value} is not an object"));
    };
    match slots
        .iter()
        .find_map(|(name, value)| not_physical(name, value).map(|why| (name, why)))
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
            "half_logical": {"type": "logical", "database": "postgres"},
        }))
        .expect("map");
        let (physical, warnings) = permanent_physical(&slots, "config");
        assert_eq!(
            physical.into_iter().collect::<Vec<_>>(),
            ["test_physical", "typed", "untyped"]
        );
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        for path in ["slots.Bad-Name", "slots.test_logical", "slots.half_logical"] {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains(&format!("`config.{path}`"))),
                "{path}: {warnings:?}"
            );
        }
        assert!(check_slots(&json!({"a": 0, "b": {"type": "physical"}})).is_ok());
        assert!(
            check_slots(&json!({"a": {"type": "logical", "database": "d", "plugin": "p"}}))
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
        assert!(check_ignore_slots(&json!([{"name": "x", "type": "physical"}])).is_ok());
        assert!(check_ignore_slots(&json!([{"nme": "x"}]))
            .is_err_and(|e| e.contains("`ignore_slots[0].nme`")));
    }
}
