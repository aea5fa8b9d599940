//! Patroni's lenient value spellings: booleans as `on`/`yes`/`"true"`/`1`, integers as strings
//! (`ttl: "30"`). Patroni parses configuration values with `parse_bool`/`parse_int`, so files and
//! DCS values written for it use these forms.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

pub use pgwarden_api::{parse_bool, parse_int};

fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let v = Value::deserialize(d)?;
    parse_int(&v).ok_or_else(|| D::Error::custom(format!("invalid type: {v} is not an integer")))
}

pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let i = int(d)?;
    u32::try_from(i)
        .map_err(|_| D::Error::custom(format!("invalid value: {i} is negative or too large")))
}

pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let i = int(d)?;
    u64::try_from(i).map_err(|_| D::Error::custom(format!("invalid value: {i} is negative")))
}

/// `synchronous_node_count`: an integer of at least 1 (Patroni's validator).
pub fn node_count<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let i = int(d)?;
    match u32::try_from(i) {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(D::Error::custom(format!(
            "invalid value: {i} is not a number of standbys (at least 1)"
        ))),
    }
}

/// `maximum_lag_on_syncnode`: bytes, or -1 (off); Patroni's validator allows nothing below -1.
pub fn lag_on_syncnode<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let i = int(d)?;
    if i < -1 {
        return Err(D::Error::custom(format!(
            "invalid value: {i} is below -1 (-1 or 0 turns the check off)"
        )));
    }
    Ok(i)
}

/// A TCP port (`5432` or `"5432"`), absent when null.
pub fn opt_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => match parse_int(&v).map(u16::try_from) {
            Some(Ok(port)) if port > 0 => Ok(Some(port)),
            _ => Err(D::Error::custom(format!(
                "invalid value: {v} is not a port number (1-65535)"
            ))),
        },
    }
}

/// `synchronous_mode`: a boolean as Patroni spells them, or `quorum`.
pub fn synchronous_mode<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<super::schema::SynchronousMode, D::Error> {
    use super::schema::SynchronousMode;
    let v = Value::deserialize(d)?;
    if v.as_str()
        .is_some_and(|s| s.trim().eq_ignore_ascii_case("quorum"))
    {
        return Ok(SynchronousMode::Quorum);
    }
    match parse_bool(&v) {
        Some(true) => Ok(SynchronousMode::On),
        Some(false) => Ok(SynchronousMode::Off),
        None => Err(D::Error::custom(format!(
            "invalid value: {v} is neither a boolean (true/false, on/off, yes/no, 1/0) nor `quorum`"
        ))),
    }
}

pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let v = Value::deserialize(d)?;
    parse_bool(&v).ok_or_else(|| {
        D::Error::custom(format!(
            "invalid type: {v} is not a boolean (true/false, on/off, yes/no, 1/0)"
        ))
    })
}

pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => parse_bool(&v).map(Some).ok_or_else(|| {
            D::Error::custom(format!(
                "invalid type: {v} is not a boolean (true/false, on/off, yes/no, 1/0)"
            ))
        }),
    }
}
