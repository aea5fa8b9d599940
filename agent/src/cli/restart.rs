//! `pgwarden restart`: immediate, conditional and scheduled restarts, as `patronictl restart`
//! does them (`POST /restart` on each member, `DELETE /restart` first with `--force` on a member
//! that already has one scheduled).

use chrono::{DateTime, FixedOffset, Local, NaiveDateTime, TimeZone};
use serde_json::{json, Map, Value};

use super::{confirm, CliError, Ctl};
use crate::dcs::{ClusterView, Member};
use crate::ha::restart::version_number;

/// `--role` of `restart` and `flush`: which members a command applies to, from the DCS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleFilter {
    /// The leader, whatever it runs as.
    Leader,
    #[value(alias = "master")]
    Primary,
    StandbyLeader,
    #[value(alias = "standby")]
    Replica,
    Any,
}

impl RoleFilter {
    fn matches(self, view: &ClusterView, member: &Member) -> bool {
        let leads = view.is_leader(&member.name);
        match self {
            RoleFilter::Any => true,
            RoleFilter::Leader => leads,
            RoleFilter::Primary => leads && member.record.role != "standby_leader",
            RoleFilter::StandbyLeader => leads && member.record.role == "standby_leader",
            RoleFilter::Replica => !leads,
        }
    }
}

/// The members named (all when none is) that have the role.
pub(super) fn select<'a>(
    view: &'a ClusterView,
    names: &[String],
    role: RoleFilter,
) -> Result<Vec<&'a Member>, CliError> {
    for n in names {
        if view.member(n).is_none() {
            return Err(CliError::Usage(format!(
                "{n} is not a member of the cluster"
            )));
        }
    }
    let chosen: Vec<_> = view
        .members
        .iter()
        .filter(|m| names.is_empty() || names.contains(&m.name))
        .filter(|m| role.matches(view, m))
        .collect();
    if chosen.is_empty() {
        return Err(CliError::Usage("no member matches".into()));
    }
    Ok(chosen)
}

/// `--scheduled`: `now` (or absent) means at once; a time without a zone is local time, as in
/// patronictl.
pub fn parse_scheduled(raw: Option<&str>) -> Result<Option<DateTime<FixedOffset>>, CliError> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty() && *s != "now") else {
        return Ok(None);
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(Some(t));
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(t) = DateTime::parse_from_str(raw, f) {
            return Ok(Some(t));
        }
    }
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(raw, f) {
            if let Some(t) = Local.from_local_datetime(&naive).earliest() {
                return Ok(Some(t.fixed_offset()));
            }
        }
    }
    Err(CliError::Usage(format!(
        "--scheduled {raw}: not a time; use ISO 8601, e.g. 2026-11-24T10:00:00+00:00, or now"
    )))
}

/// What `restart` was asked.
#[derive(Debug, Clone)]
pub struct RestartArgs {
    pub members: Vec<String>,
    pub role: RoleFilter,
    pub any: bool,
    pub scheduled: Option<String>,
    pub pg_version: Option<String>,
    pub pending: bool,
    pub timeout: Option<String>,
    pub force: bool,
}

/// The `POST /restart` body, or why the arguments are wrong.
pub fn request_body(
    args: &RestartArgs,
    scheduled: Option<DateTime<FixedOffset>>,
    paused: bool,
) -> Result<Map<String, Value>, CliError> {
    let mut body = Map::new();
    if args.pending {
        body.insert("restart_pending".into(), json!(true));
    }
    if let Some(v) = args.pg_version.as_deref().filter(|v| !v.is_empty()) {
        version_number(v).map_err(|e| CliError::Usage(format!("--pg-version: {e}")))?;
        body.insert("postgres_version".into(), json!(v));
    }
    if let Some(at) = scheduled {
        if paused {
            return Err(CliError::Failed(
                "Can't schedule restart in the paused state".into(),
            ));
        }
        body.insert("schedule".into(), json!(at.to_rfc3339()));
    }
    if let Some(t) = &args.timeout {
        body.insert("timeout".into(), json!(t));
    }
    Ok(body)
}

pub(super) async fn restart(ctl: &Ctl, args: RestartArgs) -> Result<(), CliError> {
    let view = ctl.cluster().await?;
    let mut members = select(&view, &args.members, args.role)?;
    let scheduled = parse_scheduled(args.scheduled.as_deref())?;
    let body = Value::Object(request_body(&args, scheduled, view.is_paused())?);
    // A scheduled restart re-checks the pending flag at its time; an immediate one only goes
    // to members that need it.
    if args.pending && scheduled.is_none() {
        members.retain(|m| m.record.pending_restart == Some(true));
    }
    if args.any {
        members.truncate(1);
    }
    if members.is_empty() {
        println!("No member needs a restart");
        return Ok(());
    }
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    confirm(
        &format!(
            "Are you sure you want to restart {}{}?",
            names.join(", "),
            scheduled
                .map(|t| format!(" at {}", t.to_rfc3339()))
                .unwrap_or_default()
        ),
        args.force,
    )?;
    let mut failed = false;
    for m in members {
        let api = &m.record.api_url;
        if scheduled.is_some() && args.force && m.record.extra.contains_key("scheduled_restart") {
            match ctl.call(api, "DELETE", "/restart", None).await? {
                (200 | 404, _) => {}
                (status, text) => {
                    eprintln!("Failed: flush scheduled restart for member {}, status code={status}, ({text})", m.name);
                }
            }
        }
        let mut reply = ctl.call(api, "POST", "/restart", Some(&body)).await?;
        if reply.0 == 409 && scheduled.is_some() && args.force {
            // The member record did not show the schedule yet (the agent publishes it on its
            // next cycle): --force replaces it all the same.
            if let (200 | 404, _) = ctl.call(api, "DELETE", "/restart", None).await? {
                reply = ctl.call(api, "POST", "/restart", Some(&body)).await?;
            }
        }
        match reply {
            (200, _) => println!("Success: restart on member {}", m.name),
            (202, _) => println!("Success: restart scheduled on member {}", m.name),
            (409, _) => {
                failed = true;
                eprintln!(
                    "Failed: another restart is already scheduled on member {}",
                    m.name
                );
            }
            (status, text) => {
                failed = true;
                eprintln!(
                    "Failed: restart for member {}, status code={status}, ({text})",
                    m.name
                );
            }
        }
    }
    if failed {
        Err(CliError::Failed("restart failed on some members".into()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RestartArgs {
        RestartArgs {
            members: vec![],
            role: RoleFilter::Any,
            any: false,
            scheduled: None,
            pg_version: None,
            pending: false,
            timeout: None,
            force: true,
        }
    }

    #[test]
    fn scheduled_times_keep_their_zone_and_now_means_at_once() {
        assert_eq!(parse_scheduled(Some("now")).expect("now"), None);
        assert_eq!(parse_scheduled(None).expect("none"), None);
        let t = parse_scheduled(Some("2026-11-24T10:00:00+02:00"))
            .expect("valid")
            .expect("some");
        assert_eq!(t.to_rfc3339(), "2026-11-24T10:00:00+02:00");
        assert!(parse_scheduled(Some("2026-11-24T10:00"))
            .expect("local")
            .is_some());
        assert!(parse_scheduled(Some("tomorrow")).is_err());
    }

    #[test]
    fn the_body_carries_what_was_asked_and_checks_the_version() {
        let mut a = args();
        a.pending = true;
        a.pg_version = Some("15.9".into());
        a.timeout = Some("30s".into());
        let at = parse_scheduled(Some("2026-11-24T10:00:00+00:00")).expect("valid");
        let body = request_body(&a, at, false).expect("valid");
        assert_eq!(
            Value::Object(body),
            json!({"restart_pending": true, "postgres_version": "15.9",
                   "schedule": "2026-11-24T10:00:00+00:00", "timeout": "30s"})
        );
        assert!(request_body(&a, at, true).is_err(), "paused");
        a.pg_version = Some("15".into());
        assert!(request_body(&a, None, false).is_err());
        assert!(request_body(&args(), None, false)
            .expect("empty")
            .is_empty());
    }
}
