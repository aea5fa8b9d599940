//! The cluster-wide ("dynamic") configuration as Patroni users write it: in `bootstrap.dcs`, in
//! the DCS `config` key, and in `PATCH /config`.
//!
//! - Patroni's pre-4.0 names (`master_start_timeout`) are renamed.
//! - An option pgwarden does not implement is warned about by its full path, never dropped
//!   silently.
//! - `loop_wait + 2 × retry_timeout ≤ ttl` is restored as Patroni does, with a warning.
//! - In the DCS key, an invalid value costs only that value ([`DynamicConfig::from_dcs`]).

use serde_json::{Map, Value};
use serde_path_to_error::Segment;

use super::flex;
use super::schema::DynamicConfig;

/// Below this, pgwarden raises `ttl`: the fence (docs/fencing.md) stops postgres
/// `ttl·(1 − 1 %) − 1.5 s` after a renewal, which must leave room for one `loop_wait` of 1 s
/// and a 2 s renewal.
pub const MIN_TTL: u32 = 5;
/// Patroni 4 raises a smaller `ttl` to this; pgwarden keeps it (see [`MIN_TTL`]).
pub const PATRONI_MIN_TTL: u32 = 20;

/// Top-level options pgwarden implements.
const IMPLEMENTED: [&str; 17] = [
    "ttl",
    "loop_wait",
    "retry_timeout",
    "maximum_lag_on_failover",
    "primary_start_timeout",
    "member_slots_ttl",
    "synchronous_mode",
    "synchronous_mode_strict",
    "synchronous_node_count",
    "maximum_lag_on_syncnode",
    "check_timeline",
    "failsafe_mode",
    "postgresql",
    "pause",
    "standby_cluster",
    "slots",
    "ignore_slots",
];

/// Patroni's names for the permanent slots, the one it prefers first.
const SLOTS_NAMES: [&str; 3] = ["permanent_replication_slots", "permanent_slots", "slots"];

/// `standby_cluster.*` options pgwarden implements (all of Patroni's).
const STANDBY_CLUSTER_KEYS: [&str; 7] = [
    "host",
    "port",
    "primary_slot_name",
    "create_replica_methods",
    "restore_command",
    "archive_cleanup_command",
    "recovery_min_apply_delay",
];

/// `postgresql.*` options pgwarden implements in the dynamic configuration.
const POSTGRESQL_IMPLEMENTED: [&str; 4] = ["parameters", "use_pg_rewind", "use_slots", "pg_hba"];

/// Patroni's pre-4.0 option names and their current names.
const RENAMED: [(&str, &str); 2] = [
    ("master_start_timeout", "primary_start_timeout"),
    ("master_stop_timeout", "primary_stop_timeout"),
];

/// Renames the old `master_*` names; `prefix` is the path
/// of `obj` in messages (`bootstrap.dcs`, `config`).
pub fn normalize(obj: &mut Map<String, Value>, prefix: &str) -> Vec<String> {
    let mut warnings = Vec::new();
    for (old, new) in RENAMED {
        if let Some(value) = obj.remove(old) {
            if obj.contains_key(new) {
                warnings.push(format!(
                    "`{prefix}.{old}` ignored: `{prefix}.{new}`, its current name, is also set"
                ));
            } else {
                obj.insert(new.to_owned(), value);
            }
        }
    }
    // Patroni reads the first of its three names that is set; the others are ignored.
    let mut chosen: Option<&str> = None;
    for name in SLOTS_NAMES {
        if obj.get(name).is_none_or(Value::is_null) {
            continue;
        }
        match chosen {
            None => chosen = Some(name),
            Some(first) => {
                obj.remove(name);
                warnings.push(format!(
                    "`{prefix}.{name}` ignored: `{prefix}.{first}` is also set and takes                      precedence, as in Patroni"
                ));
            }
        }
    }
    if let Some(name) = chosen.filter(|n| *n != "slots") {
        if let Some(value) = obj.remove(name) {
            obj.insert("slots".to_owned(), value);
        }
    }
    warnings
}

impl DynamicConfig {
    /// Warnings for every option that is set but not implemented, by full path.
    pub fn unimplemented(&self, prefix: &str) -> Vec<String> {
        let mut warnings: Vec<String> = self
            .extra
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, _)| format!("`{prefix}.{k}` ignored: is not implemented by pgwarden"))
            .collect();
        warnings.extend(
            self.postgresql
                .extra
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| {
                    format!("`{prefix}.postgresql.{k}` ignored: is not implemented by pgwarden")
                }),
        );
        if let Some(standby) = &self.standby_cluster {
            warnings.extend(
                standby
                    .extra
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, _)| {
                        format!(
                            "`{prefix}.standby_cluster.{k}` ignored: is not a standby_cluster \
                             option"
                        )
                    }),
            );
            if !standby.names_a_source() {
                warnings.push(format!(
                    "`{prefix}.standby_cluster` ignored: it names neither `host`, `port` nor \
                     `restore_command`, so this is not a standby cluster (as in Patroni)"
                ));
            }
        }
        let (permanent, slot_warnings) = super::slots::permanent(&self.slots, prefix);
        warnings.extend(slot_warnings);
        // Patroni's `_get_permanent_slots` keeps none without `use_slots`, and no logical one
        // in a standby cluster (it cannot decode: a standby before PostgreSQL 16).
        let names = permanent.physical.iter().chain(permanent.logical.keys());
        if !self.postgresql.use_slots {
            warnings.extend(names.map(|name| {
                format!("`{prefix}.slots.{name}` ignored: `{prefix}.postgresql.use_slots` is off")
            }));
        } else if self.standby_source().is_some() {
            warnings.extend(permanent.logical.keys().map(|name| {
                format!(
                    "`{prefix}.slots.{name}` ignored: a standby cluster keeps no logical slot \
                     (as in Patroni)"
                )
            }));
        }
        warnings.extend(super::slots::ignore_warnings(&self.ignore_slots, prefix));
        warnings
    }

    /// Restores Patroni's timing rule instead of refusing a configuration that breaks it: too
    /// small values are raised, then `loop_wait` is lowered, and if that is not enough
    /// `loop_wait` becomes 1 and `retry_timeout` `(ttl − 1) / 2` (Patroni ≥ 3.2). Patroni 4 also
    /// raises `ttl` below 20 s to 20; pgwarden keeps it down to [`MIN_TTL`] because its fence
    /// stops postgres before the lease can expire at any such ttl (docs/fencing.md).
    pub fn adjust_timeouts(&mut self, prefix: &str) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.loop_wait < 1 {
            warnings.push(format!(
                "`{prefix}.loop_wait` = {} raised to 1 second",
                self.loop_wait
            ));
            self.loop_wait = 1;
        }
        if self.retry_timeout < 1 {
            warnings.push(format!(
                "`{prefix}.retry_timeout` = {} raised to 1 second",
                self.retry_timeout
            ));
            self.retry_timeout = 1;
        }
        if self.ttl < MIN_TTL {
            warnings.push(format!(
                "`{prefix}.ttl` = {} raised to {MIN_TTL} seconds, the least pgwarden's fence \
                 works with",
                self.ttl
            ));
            self.ttl = MIN_TTL;
        }
        if self.ttl < PATRONI_MIN_TTL {
            warnings.push(format!(
                "`{prefix}.ttl` = {} is below Patroni 4's minimum of {PATRONI_MIN_TTL} seconds \
                 (Patroni would raise it to {PATRONI_MIN_TTL}); pgwarden keeps it: its fence \
                 stops postgres before the leader lease can expire (docs/fencing.md)",
                self.ttl
            ));
        }
        let (ttl, loop_wait, retry) = (self.ttl, self.loop_wait, self.retry_timeout);
        if u64::from(loop_wait) + 2 * u64::from(retry) > u64::from(ttl) {
            if ttl > 2 * retry {
                self.loop_wait = ttl - 2 * retry;
            } else {
                self.loop_wait = 1;
                self.retry_timeout = (ttl - 1) / 2;
            }
            warnings.push(format!(
                "`{prefix}`: loop_wait ({loop_wait}) + 2 × retry_timeout ({retry}) exceeds ttl \
                 ({ttl}), so the leader lease could expire before the leader notices; adjusted \
                 as Patroni does: loop_wait = {}, retry_timeout = {}",
                self.loop_wait, self.retry_timeout
            ));
        }
        warnings
    }

    /// Parses the DCS `config` value. Each invalid value is replaced by its `previous` value
    /// (or the default) with a warning naming its key, so one bad value never costs the
    /// others; a value that is not a JSON object keeps `previous` whole.
    pub fn from_dcs(raw: &Value, previous: &DynamicConfig) -> (DynamicConfig, Vec<String>) {
        let mut warnings = Vec::new();
        let Some(obj) = raw.as_object() else {
            warnings.push(format!(
                "the DCS `config` key is not a JSON object ({raw}); keeping the previous \
                 configuration"
            ));
            return (previous.clone(), warnings);
        };
        let mut obj = obj.clone();
        warnings.extend(normalize(&mut obj, "config"));
        let mut invalid: Vec<Vec<String>> = Vec::new();
        let mut parsed = None;
        // Each round removes one invalid value; the bound only guards against a loop.
        for _ in 0..64 {
            match serde_path_to_error::deserialize::<_, DynamicConfig>(&Value::Object(obj.clone()))
            {
                Ok(c) => {
                    parsed = Some(c);
                    break;
                }
                Err(e) => {
                    let path = key_path(e.path());
                    if path.is_empty() || !remove(&mut obj, &path) {
                        break;
                    }
                    warnings.push(format!(
                        "`config.{}`: {}; using the previous value",
                        path.join("."),
                        e.inner()
                    ));
                    invalid.push(path);
                }
            }
        }
        if !invalid.is_empty() {
            if let Ok(Value::Object(prev)) = serde_json::to_value(previous) {
                for path in &invalid {
                    if let Some(v) = lookup(&prev, path) {
                        insert(&mut obj, path, v.clone());
                    }
                }
            }
            parsed = serde_json::from_value(Value::Object(obj)).ok();
        }
        let Some(mut config) = parsed else {
            warnings.push(
                "the DCS `config` key cannot be used; keeping the previous configuration".into(),
            );
            return (previous.clone(), warnings);
        };
        warnings.extend(config.unimplemented("config"));
        warnings.extend(managed_warnings(
            config
                .postgresql
                .parameters
                .iter()
                .map(|(k, v)| (k, v.as_setting())),
            "config.postgresql.parameters",
        ));
        warnings.extend(config.adjust_timeouts("config"));
        (config, warnings)
    }
}

fn key_path(path: &serde_path_to_error::Path) -> Vec<String> {
    let mut out = Vec::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key } => out.push(key.clone()),
            // Values inside lists (pg_hba lines) are removed as the whole list.
            Segment::Seq { .. } | Segment::Enum { .. } | Segment::Unknown => break,
        }
    }
    out
}

fn remove(obj: &mut Map<String, Value>, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => obj.remove(last).is_some(),
        [first, rest @ ..] => match obj.get_mut(first) {
            Some(Value::Object(inner)) => remove(inner, rest),
            // A non-object where an object is expected: drop the whole value.
            Some(_) => obj.remove(first).is_some(),
            None => false,
        },
    }
}

fn lookup<'a>(obj: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let v = obj.get(first)?;
    if rest.is_empty() {
        return Some(v);
    }
    lookup(v.as_object()?, rest)
}

fn insert(obj: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        obj.insert(first.clone(), value);
        return;
    }
    let entry = obj
        .entry(first.clone())
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    if let Value::Object(inner) = entry {
        insert(inner, rest, value);
    }
}

/// Parameters replication depends on, with Patroni's lower bounds and the value used instead of
/// one below it (Patroni's `CMDLINE_OPTIONS`): `(name, minimum or required value, default)`.
const MANAGED: [(&str, Managed, &str); 10] = [
    (
        "wal_level",
        Managed::OneOf(&["replica", "hot_standby", "logical"]),
        "replica",
    ),
    ("hot_standby", Managed::On, "on"),
    ("wal_log_hints", Managed::On, "on"),
    ("max_connections", Managed::AtLeast(25), "100"),
    ("max_wal_senders", Managed::AtLeast(3), "10"),
    ("max_replication_slots", Managed::AtLeast(4), "10"),
    ("max_worker_processes", Managed::AtLeast(2), "8"),
    ("max_locks_per_transaction", Managed::AtLeast(32), "64"),
    ("max_prepared_transactions", Managed::AtLeast(0), "0"),
    ("wal_keep_segments", Managed::AtLeast(1), "8"),
];

enum Managed {
    OneOf(&'static [&'static str]),
    On,
    AtLeast(i64),
}

/// The value postgres must run with instead of `value` for `name`, when Patroni would refuse
/// it (`wal_level: minimal`, `hot_standby: off`, `max_wal_senders: 1`, …).
pub fn managed_replacement(name: &str, value: &str) -> Option<&'static str> {
    let (_, rule, default) = MANAGED
        .iter()
        .find(|(n, _, _)| n.eq_ignore_ascii_case(name))?;
    let v = Value::String(value.to_owned());
    let ok = match rule {
        Managed::OneOf(allowed) => allowed.iter().any(|a| a.eq_ignore_ascii_case(value.trim())),
        Managed::On => flex::parse_bool(&v) == Some(true),
        Managed::AtLeast(min) => flex::parse_int(&v).is_some_and(|i| i >= *min),
    };
    (!ok).then_some(*default)
}

/// Warnings for parameters under `prefix` that [`managed_replacement`] overrides.
pub fn managed_warnings<'a>(
    params: impl IntoIterator<Item = (&'a String, String)>,
    prefix: &str,
) -> Vec<String> {
    params
        .into_iter()
        .filter_map(|(name, value)| {
            managed_replacement(name, &value).map(|default| {
                format!(
                    "`{prefix}.{name}` = {value:?} would break replication or failover; \
                     {default} is used instead (as Patroni does)"
                )
            })
        })
        .collect()
}

/// Checks the keys a `PATCH /config` (or `PUT /config`) body sets; `Err` names the key and
/// why. `null` (delete) is always accepted. Whatever the members would ignore is refused here,
/// so a client never gets 200 for a change that does nothing.
pub fn check_patch(patch: &Map<String, Value>) -> Result<(), String> {
    for (key, value) in patch {
        if value.is_null() {
            continue;
        }
        let key = RENAMED
            .iter()
            .find(|(old, _)| old == key)
            .map_or(key.as_str(), |(_, new)| new);
        match key {
            "ttl" => check_int(key, value, i64::from(MIN_TTL))?,
            "loop_wait" | "retry_timeout" => check_int(key, value, 1)?,
            "maximum_lag_on_failover" | "primary_start_timeout" | "member_slots_ttl" => {
                check_int(key, value, 0)?
            }
            "synchronous_mode" => {
                if !value
                    .as_str()
                    .is_some_and(|s| s.trim().eq_ignore_ascii_case("quorum"))
                {
                    check_bool(key, value)?
                }
            }
            "synchronous_mode_strict" | "pause" | "failsafe_mode" => check_bool(key, value)?,
            "synchronous_node_count" => check_int(key, value, 1)?,
            "maximum_lag_on_syncnode" => match flex::parse_int(value) {
                Some(i) if i >= -1 => {}
                Some(i) => {
                    return Err(format!(
                        "`{key}`: {i} is out of range: bytes, or -1 (or 0) to turn it off"
                    ))
                }
                None => return Err(format!("`{key}`: {value} is not an integer")),
            },
            "check_timeline" => check_bool(key, value)?,
            "postgresql" => check_postgresql(value)?,
            "standby_cluster" => check_standby_cluster(value)?,
            "slots" | "permanent_slots" | "permanent_replication_slots" => {
                super::slots::check_slots(value)?
            }
            "ignore_slots" => super::slots::check_ignore_slots(value)?,
            other => {
                debug_assert!(!IMPLEMENTED.contains(&other));
                return Err(format!("`{other}` is not implemented by pgwarden"));
            }
        }
    }
    Ok(())
}

fn check_standby_cluster(value: &Value) -> Result<(), String> {
    let Some(section) = value.as_object() else {
        return Err(format!("`standby_cluster`: {value} is not an object"));
    };
    for (key, value) in section {
        if value.is_null() {
            continue;
        }
        let path = format!("standby_cluster.{key}");
        match key.as_str() {
            "port" => {
                if !flex::parse_int(value).is_some_and(|p| (1..=65535).contains(&p)) {
                    return Err(format!("`{path}`: {value} is not a port number (1-65535)"));
                }
            }
            "create_replica_methods" => {
                if !value
                    .as_array()
                    .is_some_and(|methods| methods.iter().all(Value::is_string))
                {
                    return Err(format!("`{path}`: must be a list of method names"));
                }
            }
            "recovery_min_apply_delay" => {
                if !(value.is_string() || value.is_number()) {
                    return Err(format!("`{path}`: {value} is not a duration"));
                }
            }
            k if STANDBY_CLUSTER_KEYS.contains(&k) => {
                if !value.is_string() {
                    return Err(format!("`{path}`: {value} is not a string"));
                }
            }
            _ => return Err(format!("`{path}` is not a standby_cluster option")),
        }
    }
    let names_source = ["host", "port", "restore_command"]
        .iter()
        .any(|k| section.get(*k).is_some_and(|v| !v.is_null()));
    if !names_source {
        return Err(
            "`standby_cluster`: needs `host` (and `port`) or `restore_command` to name the \
             source cluster"
                .into(),
        );
    }
    Ok(())
}

fn check_int(key: &str, value: &Value, min: i64) -> Result<(), String> {
    match flex::parse_int(value) {
        Some(i) if i >= min && i <= i64::from(u32::MAX) => Ok(()),
        Some(i) => Err(format!("`{key}`: {i} is out of range: at least {min}")),
        None => Err(format!("`{key}`: {value} is not an integer")),
    }
}

fn check_bool(key: &str, value: &Value) -> Result<(), String> {
    flex::parse_bool(value)
        .map(|_| ())
        .ok_or_else(|| format!("`{key}`: {value} is not a boolean (true/false, on/off)"))
}

fn check_postgresql(value: &Value) -> Result<(), String> {
    let Some(pg) = value.as_object() else {
        return Err(format!("`postgresql`: {value} is not an object"));
    };
    for (key, value) in pg {
        if value.is_null() {
            continue;
        }
        let path = format!("postgresql.{key}");
        match key.as_str() {
            "use_pg_rewind" | "use_slots" => check_bool(&path, value)?,
            "pg_hba" => {
                if !value
                    .as_array()
                    .is_some_and(|lines| lines.iter().all(Value::is_string))
                {
                    return Err(format!("`{path}`: must be a list of pg_hba.conf lines"));
                }
            }
            "parameters" => {
                let Some(params) = value.as_object() else {
                    return Err(format!("`{path}`: {value} is not an object"));
                };
                for (name, v) in params {
                    if !matches!(
                        v,
                        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_)
                    ) {
                        return Err(format!(
                            "`{path}.{name}`: a parameter must be a string, a number or a \
                             boolean"
                        ));
                    }
                }
            }
            _ => {
                debug_assert!(!POSTGRESQL_IMPLEMENTED.contains(&key.as_str()));
                return Err(format!("`{path}` is not implemented by pgwarden"));
            }
        }
    }
    Ok(())
}
