//! `pgwarden flush [cluster] [members…] restart|switchover`: discards scheduled restarts
//! (`DELETE /restart` on each member that has one) or the scheduled switchover (`DELETE
//! /switchover`, the leader first, or a compare-and-set on the `failover` key when no member
//! answers), as `patronictl flush` does.

use super::restart::{select, RoleFilter};
use super::{confirm, CliError, Ctl};
use crate::dcs::FailoverRequest;

/// What `flush` discards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Restart,
    Switchover,
}

/// Splits `[cluster] [members…] target`: the last word is the target; a leading word equal to
/// the scope is patronictl's cluster name and is dropped.
pub fn parse_args(scope: &str, words: &[String]) -> Result<(Vec<String>, Target), CliError> {
    let Some((last, rest)) = words.split_last() else {
        return Err(CliError::Usage(
            "say what to flush: restart or switchover".into(),
        ));
    };
    let target = match last.as_str() {
        "restart" => Target::Restart,
        "switchover" => Target::Switchover,
        other => {
            return Err(CliError::Usage(format!(
                "cannot flush {other:?}: restart or switchover"
            )))
        }
    };
    let members = match rest.split_first() {
        Some((first, others)) if first == scope => others.to_vec(),
        _ => rest.to_vec(),
    };
    if target == Target::Switchover && !members.is_empty() {
        return Err(CliError::Usage(
            "a scheduled switchover belongs to the cluster: name no members".into(),
        ));
    }
    Ok((members, target))
}

pub(super) async fn flush(
    ctl: &Ctl,
    words: &[String],
    role: RoleFilter,
    force: bool,
) -> Result<(), CliError> {
    let (names, target) = parse_args(&ctl.config.scope, words)?;
    let view = ctl.cluster().await?;
    match target {
        Target::Restart => {
            let members = select(&view, &names, role)?;
            let list: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
            confirm(
                &format!(
                    "Are you sure you want to flush scheduled restarts of {}?",
                    list.join(", ")
                ),
                force,
            )?;
            let mut failed = false;
            for m in members {
                if !m.record.extra.contains_key("scheduled_restart") {
                    println!("No scheduled restart for member {}", m.name);
                    continue;
                }
                match ctl
                    .call(&m.record.api_url, "DELETE", "/restart", None)
                    .await?
                {
                    (200, _) => println!("Success: flush scheduled restart for member {}", m.name),
                    (status, text) => {
                        failed = true;
                        eprintln!(
                            "Failed: flush scheduled restart for member {}, status code={status}, ({text})",
                            m.name
                        );
                    }
                }
            }
            if failed {
                return Err(CliError::Failed("flush failed on some members".into()));
            }
            Ok(())
        }
        Target::Switchover => {
            let Some(failover) = view
                .failover
                .as_ref()
                .filter(|f| f.value.scheduled_at.is_some())
            else {
                println!("No pending scheduled switchover");
                return Ok(());
            };
            let mut order: Vec<_> = view.members.iter().collect();
            order.sort_by_key(|m| !view.is_leader(&m.name));
            for m in order {
                match ctl
                    .call(&m.record.api_url, "DELETE", "/switchover", None)
                    .await
                {
                    Ok((200, text)) => {
                        println!("Success: {text}");
                        return Ok(());
                    }
                    Ok((404, text)) => return Err(CliError::Failed(format!("Failed: {text}"))),
                    Ok((status, text)) => {
                        eprintln!("Failed: member={}, status_code={status}, ({text})", m.name)
                    }
                    Err(e) => eprintln!("Member {} is not accessible: {e}", m.name),
                }
            }
            eprintln!("Could not find any accessible member; clearing the failover key in etcd");
            match ctl
                .dcs
                .write_failover(&FailoverRequest::default(), Some(failover.revision))
                .await
            {
                Ok(true) => {
                    println!("Success: scheduled switchover deleted");
                    Ok(())
                }
                Ok(false) => Err(CliError::Failed(
                    "the failover key changed meanwhile; run the command again".into(),
                )),
                Err(e) => Err(CliError::Dcs(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_last_word_is_the_target_and_a_leading_scope_is_dropped() {
        let p = |w: &[&str]| parse_args("batman", &words(w));
        assert_eq!(p(&["restart"]).expect("ok"), (vec![], Target::Restart));
        assert_eq!(
            p(&["batman", "pg1", "restart"]).expect("ok"),
            (words(&["pg1"]), Target::Restart)
        );
        assert_eq!(
            p(&["batman", "switchover"]).expect("ok"),
            (vec![], Target::Switchover)
        );
        assert!(p(&[]).is_err());
        assert!(p(&["batman", "reload"]).is_err());
        assert!(p(&["pg1", "switchover"]).is_err());
    }
}
