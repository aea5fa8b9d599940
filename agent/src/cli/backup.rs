//! `pgwarden backup` (start a pgBackRest backup on the leader, wait for its end) and
//! `pgwarden backups` (the repository's backups, `pgbackrest info` run by the leader).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{CliError, Ctl, Format};

fn leader_api(view: &crate::dcs::ClusterView) -> Result<(String, String), CliError> {
    let leader = view
        .leader_name()
        .ok_or_else(|| CliError::Failed("the cluster has no leader to run a backup".into()))?;
    let member = view
        .member(leader)
        .filter(|m| !m.record.api_url.is_empty())
        .ok_or_else(|| CliError::Failed(format!("no REST address for the leader {leader}")))?;
    Ok((leader.to_owned(), member.record.api_url.clone()))
}

/// Starts a backup on the leader (into `repo`, default repo1); with `wait`, polls its
/// `/patroni` until it finished.
pub(super) async fn backup(
    ctl: &Ctl,
    kind: &str,
    repo: Option<u32>,
    wait: bool,
) -> Result<(), CliError> {
    let view = ctl.cluster().await?;
    let (mut leader, mut api) = leader_api(&view)?;
    let mut request = json!({"type": kind});
    if let Some(n) = repo {
        request["repo"] = json!(n);
    }
    let (mut status, mut body) = ctl.call(&api, "POST", "/backup", Some(&request)).await?;
    // 421: the member we asked is no longer the leader (the DCS view was older than a
    // switchover); follow its answer once.
    if status == 421 {
        let redirect: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if let (Some(name), Some(url)) = (redirect["leader"].as_str(), redirect["api_url"].as_str())
        {
            leader = name.to_owned();
            api = url.to_owned();
            (status, body) = ctl.call(&api, "POST", "/backup", Some(&request)).await?;
        }
    }
    if status != 202 {
        return Err(CliError::Failed(format!("{leader}: {body} ({status})")));
    }
    let started: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let started_at = started["started_at"]
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
    // Agents before per-repository backups do not answer `repo`: theirs went to repo1.
    let into = started["repo"].as_u64().unwrap_or(1);
    match started["standby"].as_str() {
        Some(standby) => println!(
            "{leader}: {kind} backup into repo{into} started, copying from the standby {standby}"
        ),
        None => println!("{leader}: {kind} backup into repo{into} started"),
    }
    if !wait {
        return Ok(());
    }
    let begun = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (code, text) = match ctl.call(&api, "GET", "/patroni", None).await {
            Ok(r) => r,
            Err(_) if begun.elapsed() < Duration::from_secs(30) => continue,
            Err(e) => return Err(e),
        };
        if code != 200 {
            continue;
        }
        let doc: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let report = &doc["pgbackrest"];
        if !report["running"].is_null() {
            continue;
        }
        let last = &report["last"];
        let last_start = last["started_at"]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
        // The report may still show an earlier backup for a moment.
        if let (Some(ours), Some(theirs)) = (started_at, last_start) {
            if theirs + chrono::Duration::seconds(2) < ours {
                continue;
            }
        }
        return if last["ok"].as_bool() == Some(true) {
            println!(
                "{leader}: {kind} backup finished in {:.1} s",
                last["duration_seconds"].as_f64().unwrap_or(0.0)
            );
            Ok(())
        } else {
            Err(CliError::Failed(format!(
                "{leader}: backup failed: {}",
                last["error"].as_str().unwrap_or("unknown error")
            )))
        };
    }
}

fn size(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "kB", "MB", "GB", "TB"] {
        if v < 1024.0 || unit == "TB" {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    unreachable!("the loop returns at TB")
}

/// Renders `pgbackrest info --output=json` as a table.
pub fn render_info(info: &Value) -> String {
    let mut out = String::new();
    for stanza in info.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "stanza: {} ({})\n",
            stanza["name"].as_str().unwrap_or("?"),
            stanza["status"]["message"].as_str().unwrap_or("?")
        ));
        out.push_str(&format!(
            "{:<36} | {:<4} | {:>4} | {:<25} | {:<25} | {:>10} | {:>10}\n",
            "label", "type", "repo", "start", "stop", "size", "repo size"
        ));
        for b in stanza["backup"].as_array().into_iter().flatten() {
            let ts = |k: &str| {
                b["timestamp"][k]
                    .as_i64()
                    .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default()
            };
            out.push_str(&format!(
                "{:<36} | {:<4} | {:>4} | {:<25} | {:<25} | {:>10} | {:>10}\n",
                b["label"].as_str().unwrap_or(""),
                b["type"].as_str().unwrap_or(""),
                b["database"]["repo-key"].as_u64().unwrap_or(1),
                ts("start"),
                ts("stop"),
                size(b["info"]["size"].as_u64().unwrap_or(0)),
                size(b["info"]["repository"]["size"].as_u64().unwrap_or(0)),
            ));
        }
        for a in stanza["archive"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "WAL archive {}: {} … {}\n",
                a["id"].as_str().unwrap_or(""),
                a["min"].as_str().unwrap_or("-"),
                a["max"].as_str().unwrap_or("-")
            ));
        }
    }
    out
}

/// Lists the backups, asking the leader (or any member when there is none).
pub(super) async fn backups(ctl: &Ctl, format: Format) -> Result<(), CliError> {
    let view = ctl.cluster().await?;
    let mut apis: Vec<(String, String)> = leader_api(&view).into_iter().collect();
    apis.extend(
        view.members
            .iter()
            .filter(|m| !m.record.api_url.is_empty())
            .map(|m| (m.name.clone(), m.record.api_url.clone())),
    );
    let mut last_error = CliError::Failed("no member has a REST address".into());
    for (name, api) in apis {
        match ctl.call(&api, "GET", "/backups", None).await {
            Ok((200, body)) => {
                let info: Value = serde_json::from_str(&body).map_err(|e| {
                    CliError::Failed(format!("{name}: bad JSON from /backups: {e}"))
                })?;
                match format {
                    Format::Json => println!(
                        "{}",
                        serde_json::to_string_pretty(&info).unwrap_or_default()
                    ),
                    Format::Pretty => print!("{}", render_info(&info)),
                }
                return Ok(());
            }
            Ok((status, body)) => {
                last_error = CliError::Failed(format!("{name}: {body} ({status})"))
            }
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_table_lists_backups_and_archive_range() {
        let info = json!([{"name": "batman", "status": {"message": "ok"},
            "backup": [{"label": "20260101-000000F", "type": "full", "database": {"repo-key": 1},
                        "timestamp": {"start": 0, "stop": 60},
                        "info": {"size": 2048, "repository": {"size": 512}}}],
            "archive": [{"id": "15-1", "min": "000000010000000000000001", "max": "000000010000000000000004"}]}]);
        let text = render_info(&info);
        assert!(text.contains("stanza: batman (ok)"));
        assert!(text.contains("20260101-000000F"));
        assert!(text.contains("2.0 kB"));
        assert!(text.contains("000000010000000000000001 … 000000010000000000000004"));
    }
}
