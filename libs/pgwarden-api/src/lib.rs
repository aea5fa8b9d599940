//! What the pgwarden agent and the controller both read and write, and nothing else: the member
//! record agents publish (Patroni's member JSON, in the DCS `members/<name>` key or a Pod's
//! `status` annotation), and the rule by which an observer judges another holder's
//! Kubernetes Lease expired — by its own clock, never by comparing wall clocks.
//!
//! A crate of its own so that neither side depends on the other (neon's `libs/*_api` crates
//! are the model): no IO, no async, serde only.

pub mod lease;
mod member;

pub use member::MemberRecord;

use serde_json::Value;

/// Patroni's `parse_bool`: `true`/`on`/`yes`/`1` and `false`/`off`/`no`/`0`, any case.
pub fn parse_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_i64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" | "1" => Some(true),
            "false" | "off" | "no" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Patroni's `parse_int` for integers: a number (also `30.0`) or a string holding one (`"30"`).
pub fn parse_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}
