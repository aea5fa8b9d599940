//! Conditional and scheduled restarts (`POST`/`DELETE /restart`, `patroni-compat.md` §2.8):
//! checking the request as Patroni does, the conditions a restart waits for, when a scheduled
//! one is due, and the `scheduled_restart` object of the member record. Pure; the HA loop
//! carries the restart out.

use std::time::Duration;

use chrono::{DateTime, FixedOffset, Utc};
use serde_json::{json, Map, Value};

use crate::api::ApiReply;

/// A checked `POST /restart` body.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartRequest {
    /// When to restart; `None` restarts now.
    pub schedule: Option<DateTime<FixedOffset>>,
    /// Restart only in this role (`primary`, `replica` or `standby_leader`).
    pub role: Option<String>,
    /// Restart only while the running version is older than this one (`X.Y` or `X.Y.Z`).
    pub postgres_version: Option<String>,
    /// Restart only when a changed parameter waits for a restart.
    pub restart_pending: bool,
    /// Seconds postgres may take to start again.
    pub timeout: Option<u64>,
}

impl RestartRequest {
    /// Checks a request body in Patroni's order and with its status codes and messages:
    /// `patronictl` prints them.
    pub fn parse(
        body: &Map<String, Value>,
        now: DateTime<Utc>,
        paused: bool,
    ) -> Result<RestartRequest, ApiReply> {
        if paused && body.contains_key("schedule") {
            return Err(ApiReply::new(
                500,
                "Can't schedule restart in the paused state",
            ));
        }
        let mut request = RestartRequest {
            schedule: None,
            role: None,
            postgres_version: None,
            restart_pending: false,
            timeout: None,
        };
        for (key, value) in body {
            match key.as_str() {
                "schedule" => request.schedule = Some(parse_schedule(value, now)?),
                "role" => request.role = parse_role(value)?,
                "postgres_version" => {
                    let v = value.as_str().ok_or_else(|| {
                        ApiReply::new(
                            400,
                            format!("Invalid PostgreSQL version: {value}; a string such as \"15.2\" is expected"),
                        )
                    })?;
                    version_number(v).map_err(|e| ApiReply::new(400, e))?;
                    request.postgres_version = Some(v.to_owned());
                }
                "timeout" => match parse_seconds(value) {
                    Some(s) if s > 0 => request.timeout = Some(s.unsigned_abs()),
                    _ => {
                        return Err(ApiReply::new(
                            400,
                            "Timeout should be a positive number of seconds",
                        ))
                    }
                },
                // Patroni treats any value as "only if pending"; `false` meaning the opposite
                // is too surprising to copy, and anything else is a mistake worth reporting.
                "restart_pending" => match value {
                    Value::Bool(b) => request.restart_pending = *b,
                    Value::Null => {}
                    other => {
                        return Err(ApiReply::new(
                            400,
                            format!("restart_pending should be a boolean, not {other}"),
                        ))
                    }
                },
                other => {
                    return Err(ApiReply::new(
                        400,
                        format!("Unknown filter for the scheduled restart: {other}"),
                    ))
                }
            }
        }
        Ok(request)
    }

    /// Why this restart must not happen now, or `None` when every condition holds (Patroni's
    /// `restart_matches`). `server_version` is `server_version_num`, `None` when unknown.
    pub fn unmet(
        &self,
        role: &str,
        server_version: Option<i32>,
        pending_restart: bool,
    ) -> Option<&'static str> {
        if let Some(r) = &self.role {
            if r != role {
                return Some("host role mismatch");
            }
        }
        if let Some(v) = &self.postgres_version {
            let wanted = version_number(v).unwrap_or(0);
            if server_version.is_none_or(|running| i64::from(running) >= wanted) {
                return Some("postgres version mismatch");
            }
        }
        if self.restart_pending && !pending_restart {
            return Some("pending restart flag is not set");
        }
        None
    }

    /// The `scheduled_restart` object of the member record (`patroni-compat.md` §1.5).
    pub fn record_json(&self, postmaster_start_time: Option<&str>) -> Value {
        let mut o = Map::new();
        if let Some(s) = &self.schedule {
            o.insert("schedule".into(), json!(s.to_rfc3339()));
        }
        o.insert("postmaster_start_time".into(), json!(postmaster_start_time));
        if let Some(r) = &self.role {
            o.insert("role".into(), json!(r));
        }
        if let Some(v) = &self.postgres_version {
            o.insert("postgres_version".into(), json!(v));
        }
        if self.restart_pending {
            o.insert("restart_pending".into(), json!(true));
        }
        if let Some(t) = self.timeout {
            o.insert("timeout".into(), json!(t));
        }
        Value::Object(o)
    }
}

/// What to do about a scheduled restart this cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Still this far in the future.
    Later(Duration),
    Now,
    /// Missed by more than 1.5 × `loop_wait` (the agent was down or stuck): dropped, as
    /// Patroni does, rather than restarting at an unexpected time.
    Stale,
}

/// Whether a restart scheduled at `at` is due at `now`.
pub fn due(at: DateTime<FixedOffset>, now: DateTime<Utc>, loop_wait: Duration) -> Due {
    let delta = at.with_timezone(&Utc) - now;
    match delta.to_std() {
        Ok(ahead) if !ahead.is_zero() => Due::Later(ahead),
        _ => {
            let late = (-delta).to_std().unwrap_or_default();
            if late > loop_wait.mul_f64(1.5) {
                Due::Stale
            } else {
                Due::Now
            }
        }
    }
}

fn parse_role(value: &Value) -> Result<Option<String>, ApiReply> {
    match value.as_str() {
        Some("primary" | "master") => Ok(Some("primary".into())),
        Some(r @ ("replica" | "standby_leader")) => Ok(Some(r.to_owned())),
        // pgwarden's CLI default; no condition.
        Some("any") => Ok(None),
        _ => Err(ApiReply::new(
            400,
            "PostgreSQL role should be either primary, standby_leader, or replica",
        )),
    }
}

/// `schedule`: ISO 8601 with a time zone, in the future.
fn parse_schedule(value: &Value, now: DateTime<Utc>) -> Result<DateTime<FixedOffset>, ApiReply> {
    let unparsable = || {
        ApiReply::new(
            422,
            "Unable to parse scheduled timestamp. It should be in an unambiguous format, e.g. ISO 8601",
        )
    };
    let text = value.as_str().ok_or_else(unparsable)?.trim();
    let aware = DateTime::parse_from_rfc3339(text).or_else(|_| {
        [
            "%Y-%m-%dT%H:%M:%S%.f%z",
            "%Y-%m-%d %H:%M:%S%.f%z",
            "%Y-%m-%dT%H:%M%z",
        ]
        .iter()
        .find_map(|f| DateTime::parse_from_str(text, f).ok())
        .ok_or(())
    });
    let at = match aware {
        Ok(t) => t,
        Err(()) => {
            let naive = [
                "%Y-%m-%dT%H:%M:%S%.f",
                "%Y-%m-%d %H:%M:%S%.f",
                "%Y-%m-%dT%H:%M",
                "%Y-%m-%d %H:%M",
            ]
            .iter()
            .any(|f| chrono::NaiveDateTime::parse_from_str(text, f).is_ok());
            return Err(if naive {
                ApiReply::new(
                    400,
                    "Timezone information is mandatory for the scheduled restart",
                )
            } else {
                unparsable()
            });
        }
    };
    if at.with_timezone(&Utc) < now {
        return Err(ApiReply::new(422, "Cannot schedule restart in the past"));
    }
    Ok(at)
}

/// `X.Y.Z` → `X0Y0Z`-style number comparable with `server_version_num` (Patroni's
/// `postgres_version_to_int`): `15.2` → 150002, `9.6.3` → 90603.
pub fn version_number(version: &str) -> Result<i64, String> {
    let parts: Vec<i64> = version
        .split('.')
        .map(|p| p.parse::<i64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("Invalid PostgreSQL version: {version}"))?;
    if parts.iter().any(|p| *p < 0) {
        return Err(format!("Invalid PostgreSQL version: {version}"));
    }
    match parts[..] {
        [major, minor] if major >= 10 => Ok(major * 10000 + minor),
        [major, minor, patch] => Ok(major * 10000 + minor * 100 + patch),
        _ => Err(format!(
            "Invalid PostgreSQL version format: X.Y or X.Y.Z is accepted: {version}"
        )),
    }
}

/// Patroni's `parse_int(value, 's')`: a number of seconds, or a string with a unit (`ms`, `s`,
/// `min`, `h`, `d`).
fn parse_seconds(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f.round() as i64)),
        Value::String(s) => {
            let s = s.trim().to_ascii_lowercase();
            let split = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
                .unwrap_or(s.len());
            let (number, unit) = s.split_at(split);
            let number: f64 = number.parse().ok()?;
            let factor = match unit.trim() {
                "" | "s" => 1.0,
                "ms" => 0.001,
                "min" => 60.0,
                "h" => 3600.0,
                "d" => 86400.0,
                _ => return None,
            };
            Some((number * factor).round() as i64)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-04T12:00:00+00:00")
            .expect("time")
            .with_timezone(&Utc)
    }

    fn parse(v: Value) -> Result<RestartRequest, ApiReply> {
        RestartRequest::parse(&body(v), now(), false)
    }

    fn status(v: Value) -> (u16, String) {
        let r = parse(v).expect_err("refused");
        (r.status, r.body)
    }

    #[test]
    fn patronictl_bodies_are_accepted() {
        let r = parse(
            json!({"schedule": "2026-12-04T13:00:00+01:00", "restart_pending": true,
                             "postgres_version": "15.99", "timeout": "30"}),
        )
        .expect("valid");
        assert_eq!(
            r.schedule.map(|s| s.to_rfc3339()).as_deref(),
            Some("2026-12-04T13:00:00+01:00")
        );
        assert!(r.restart_pending);
        assert_eq!(r.timeout, Some(30));
        assert_eq!(
            parse(json!({})).expect("empty"),
            RestartRequest {
                schedule: None,
                role: None,
                postgres_version: None,
                restart_pending: false,
                timeout: None,
            }
        );
        assert_eq!(
            parse(json!({"role": "master"}))
                .expect("old name")
                .role
                .as_deref(),
            Some("primary")
        );
        assert_eq!(
            parse(json!({"timeout": "2min"})).expect("unit").timeout,
            Some(120)
        );
        assert_eq!(parse(json!({"timeout": 5})).expect("int").timeout, Some(5));
        // A microsecond ISO time, as Python's isoformat() writes it.
        assert!(parse(json!({"schedule": "2026-12-04 12:30:00.123456+00:00"})).is_ok());
    }

    #[test]
    fn bad_requests_get_patronis_codes_and_messages() {
        assert_eq!(
            status(json!({"when": "now"})),
            (400, "Unknown filter for the scheduled restart: when".into())
        );
        assert_eq!(status(json!({"role": "leader"})).0, 400);
        assert_eq!(status(json!({"postgres_version": "15"})).0, 400);
        assert_eq!(status(json!({"postgres_version": "x.y"})).0, 400);
        assert_eq!(status(json!({"postgres_version": 15.2})).0, 400);
        assert_eq!(status(json!({"timeout": 0})).0, 400);
        assert_eq!(status(json!({"timeout": "soon"})).0, 400);
        assert_eq!(status(json!({"restart_pending": "yes"})).0, 400);
        assert_eq!(
            status(json!({"schedule": "2026-12-04T13:00:00"})),
            (
                400,
                "Timezone information is mandatory for the scheduled restart".into()
            )
        );
        assert_eq!(
            status(json!({"schedule": "2026-12-04T11:00:00+00:00"})),
            (422, "Cannot schedule restart in the past".into())
        );
        assert_eq!(status(json!({"schedule": "tomorrow"})).0, 422);
        let paused = RestartRequest::parse(
            &body(json!({"schedule": "2026-12-04T13:00:00+00:00"})),
            now(),
            true,
        )
        .expect_err("paused");
        assert_eq!(paused.status, 500);
    }

    #[test]
    fn conditions_follow_role_version_and_pending_flag() {
        let any = parse(json!({})).expect("valid");
        assert_eq!(any.unmet("replica", Some(150004), false), None);
        let primary = parse(json!({"role": "primary"})).expect("valid");
        assert_eq!(
            primary.unmet("replica", Some(150004), false),
            Some("host role mismatch")
        );
        assert_eq!(primary.unmet("primary", Some(150004), false), None);
        let older = parse(json!({"postgres_version": "15.5"})).expect("valid");
        assert_eq!(older.unmet("primary", Some(150004), false), None);
        assert_eq!(
            older.unmet("primary", Some(150005), false),
            Some("postgres version mismatch")
        );
        let pending = parse(json!({"restart_pending": true})).expect("valid");
        assert_eq!(
            pending.unmet("primary", Some(150004), false),
            Some("pending restart flag is not set")
        );
        assert_eq!(pending.unmet("primary", Some(150004), true), None);
    }

    #[test]
    fn versions_compare_like_server_version_num() {
        assert_eq!(version_number("15.2"), Ok(150002));
        assert_eq!(version_number("9.6.3"), Ok(90603));
        assert!(version_number("9.6").is_err());
        assert!(version_number("15").is_err());
        assert!(version_number("15.2.1.1").is_err());
    }

    #[test]
    fn a_scheduled_restart_is_due_at_its_time_and_stale_after_one_and_a_half_loops() {
        let at = DateTime::parse_from_rfc3339("2026-12-04T12:00:10+00:00").expect("time");
        let wait = Duration::from_secs(10);
        assert_eq!(due(at, now(), wait), Due::Later(Duration::from_secs(10)));
        let t = |s: i64| now() + chrono::Duration::seconds(s);
        assert_eq!(due(at, t(10), wait), Due::Now);
        assert_eq!(due(at, t(24), wait), Due::Now);
        assert_eq!(due(at, t(26), wait), Due::Stale);
    }

    #[test]
    fn the_member_record_shows_the_schedule_and_the_conditions() {
        let r = parse(json!({"schedule": "2026-12-04T13:00:00+00:00", "restart_pending": true}))
            .expect("valid");
        assert_eq!(
            r.record_json(Some("2026-12-04 11:00:00.000000+00:00")),
            json!({"schedule": "2026-12-04T13:00:00+00:00",
                   "postmaster_start_time": "2026-12-04 11:00:00.000000+00:00",
                   "restart_pending": true})
        );
    }
}
