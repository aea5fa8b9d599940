//! `pgwarden remove <cluster>`: wipes the cluster's keys from the DCS after patronictl's
//! confirmations (the cluster name, `Yes I am aware`, and the leader's name while one holds
//! the lock). There is no `--force`, as in patronictl: scripts answer on stdin.

use super::{list, prompt, CliError, Ctl, Format};

pub(super) async fn remove(ctl: &Ctl, cluster: &str, format: Format) -> Result<(), CliError> {
    let Some(etcd) = &ctl.etcd else {
        return Err(CliError::Failed(format!(
            "remove is not supported for a cluster in Kubernetes: delete its objects instead \
             (the PostgresCluster, or the StatefulSet, the `{cluster}-*` ConfigMaps and the \
             `{cluster}-leader` Lease)"
        )));
    };
    let view = ctl.cluster().await?;
    match format {
        Format::Pretty => print!("{}", list::render_table(cluster, &view, false, false)),
        Format::Json => println!(
            "{}",
            serde_json::to_string(&list::rows(&view)).unwrap_or_default()
        ),
    }
    if prompt("Please confirm the cluster name to remove")? != cluster {
        return Err(CliError::Failed(
            "Cluster names specified do not match".into(),
        ));
    }
    const AWARE: &str = "Yes I am aware";
    let answer = prompt(&format!(
        "You are about to remove all information in DCS for {cluster}, please type: \"{AWARE}\""
    ))?;
    if answer != AWARE {
        return Err(CliError::Failed(format!(
            "You did not exactly type \"{AWARE}\""
        )));
    }
    if let Some(leader) = view.leader_name().filter(|l| !l.is_empty()) {
        let answer = prompt(
            "This cluster currently is healthy. Please specify the leader name to continue",
        )?;
        if answer != leader {
            return Err(CliError::Failed(
                "You did not specify the current leader of the cluster".into(),
            ));
        }
    }
    let deleted = etcd.delete_cluster().await.map_err(CliError::Dcs)?;
    eprintln!("Removed {deleted} keys of cluster {cluster}");
    Ok(())
}
