//! `pgwarden version [cluster [members]]`: the CLI's version, then each member's agent and
//! PostgreSQL versions from its REST API (`GET /patroni`), as `patronictl version`.

use serde_json::Value;

use super::{CliError, Ctl};

/// `server_version` as PostgreSQL prints it (`150008` is `15.8`, `90624` is `9.6.24`).
pub fn format_pg_version(version: u64) -> String {
    if version < 100_000 {
        format!(
            "{}.{}.{}",
            version / 10_000,
            version / 100 % 100,
            version % 100
        )
    } else {
        format!("{}.{}", version / 10_000, version % 100)
    }
}

/// One member's line from its `/patroni` answer; a member running Patroni says so.
pub fn member_line(name: &str, status: &Value) -> String {
    let pg = status
        .get("server_version")
        .and_then(Value::as_u64)
        .map(|v| format!(" PostgreSQL {}", format_pg_version(v)))
        .unwrap_or_default();
    let patroni = status
        .pointer("/patroni/version")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    match status.pointer("/pgwarden/version").and_then(Value::as_str) {
        Some(ours) => format!("{name}: pgwarden {ours} (Patroni {patroni} compatible){pg}"),
        None => format!("{name}: Patroni {patroni}{pg}"),
    }
}

pub fn cli_line() -> String {
    format!("pgwarden version {}", crate::VERSION)
}

pub(super) async fn version(ctl: &Ctl, members: &[String]) -> Result<(), CliError> {
    println!("{}", cli_line());
    println!();
    let view = ctl.cluster().await?;
    for m in view
        .members
        .iter()
        .filter(|m| !m.record.api_url.is_empty())
        .filter(|m| members.is_empty() || members.contains(&m.name))
    {
        let line = match ctl.call(&m.record.api_url, "GET", "/patroni", None).await {
            Ok((200, body)) => match serde_json::from_str::<Value>(&body) {
                Ok(status) => member_line(&m.name, &status),
                Err(e) => format!("{}: failed to get version: {e}", m.name),
            },
            Ok((code, body)) => format!("{}: failed to get version: {code} {body}", m.name),
            Err(e) => format!("{}: failed to get version: {e}", m.name),
        };
        println!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_as_patronictl_prints_them() {
        assert_eq!(format_pg_version(150008), "15.8");
        assert_eq!(format_pg_version(90624), "9.6.24");
        let ours = serde_json::json!({"server_version": 150008, "patroni": {"version": "4.1.4"}, "pgwarden": {"version": "0.1.0"}});
        assert_eq!(
            member_line("pg0", &ours),
            "pg0: pgwarden 0.1.0 (Patroni 4.1.4 compatible) PostgreSQL 15.8"
        );
        let patroni =
            serde_json::json!({"server_version": 160002, "patroni": {"version": "4.1.4"}});
        assert_eq!(
            member_line("pg1", &patroni),
            "pg1: Patroni 4.1.4 PostgreSQL 16.2"
        );
    }
}
