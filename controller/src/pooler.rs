//! `spec.pooler` applied: the PgBouncer objects of [`crate::render::pooler`] (created, updated,
//! and deleted when the spec drops a pooler), and, on the primary, what PgBouncer's
//! `auth_query` needs: the `pgbouncer` login role with the Secret's password and, in every
//! database that accepts connections (`template1` included, so later databases inherit it),
//! the schema `pgbouncer` with the `SECURITY DEFINER` function `get_auth(username)`. This is
//! how PGO and CloudNativePG give PgBouncer the clients' password secrets without giving the
//! `pgbouncer` role the right to read `pg_authid`: only the function may, and only
//! `pgbouncer` may call it.
//!
//! `get_auth` answers nothing for superusers, replication roles, `pgbouncer` itself and roles
//! whose password expired (PGO's rule): those cannot log in through the pooler, so a pooler
//! compromise does not hand out a superuser's password secret.

use kube::api::DeleteParams;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource};
use tracing::info;

use crate::crd::PostgresCluster;
use crate::reconcile::{apply, create_if_missing, kube_err, Context, Error};
use crate::render::pooler as render;
use crate::render::Names;
use crate::sql::{quote_literal, SqlError};

/// The role PgBouncer logs in as to run `auth_query` (reserved: not allowed in `spec.users`).
pub const POOLER_ROLE: &str = "pgbouncer";

/// The comment on the `pgbouncer` role: not [`crate::sql::MANAGED_COMMENT`], so the cleanup
/// of `spec.users` never drops it.
pub const POOLER_COMMENT: &str = "managed by pgwarden-controller (spec.pooler)";

/// Creates or updates the objects of the poolers the spec asks for and deletes those of the
/// ones it does not (the Secret too once no pooler is left). The deletions are made once per
/// spec generation: a pooler is only ever created at a generation that asks for it.
pub(crate) async fn sync_objects(pg: &PostgresCluster, ctx: &Context) -> Result<(), Error> {
    let client = &ctx.client;
    let names = Names::of(pg);
    let ns = names.namespace.as_str();
    let wanted = render::wanted(pg);
    if let Some(spec) = &pg.spec.pooler {
        create_if_missing(
            client,
            ns,
            &render::secret(pg, crate::render::secrets::generate_password()),
        )
        .await?;
        for &read_only in &wanted {
            apply(client, ns, &render::configmap(pg, spec, read_only)).await?;
            apply(client, ns, &render::service(pg, read_only)).await?;
            apply(client, ns, &render::deployment(pg, spec, read_only)).await?;
        }
    }
    if wanted.len() == 2 {
        return Ok(());
    }
    let key = ObjectRef::from_obj(pg);
    let generation = pg.meta().generation.unwrap_or_default();
    let done = ctx
        .pooler_cleaned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        == Some(&generation);
    if done {
        return Ok(());
    }
    for read_only in [false, true] {
        if wanted.contains(&read_only) {
            continue;
        }
        let name = names.pooler(read_only);
        delete::<k8s_openapi::api::apps::v1::Deployment>(ctx, ns, &name).await?;
        delete::<k8s_openapi::api::core::v1::Service>(ctx, ns, &name).await?;
        delete::<k8s_openapi::api::core::v1::ConfigMap>(ctx, ns, &name).await?;
    }
    if wanted.is_empty() {
        delete::<k8s_openapi::api::core::v1::Secret>(ctx, ns, &names.pooler_secret()).await?;
    }
    ctx.pooler_cleaned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, generation);
    Ok(())
}

/// Deletes an object if it exists (its dependents go with the garbage collector).
async fn delete<K>(ctx: &Context, ns: &str, name: &str) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {
            info!(kind = %K::kind(&()), name = %name, "deleted (spec.pooler no longer asks for it)");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(kube_err(format!("deleting {} {name}", K::kind(&())))(e)),
    }
}

/// The statements that give one database the `pgbouncer.get_auth` function (idempotent).
pub fn auth_function_sql() -> String {
    format!(
        "\
CREATE SCHEMA IF NOT EXISTS pgbouncer;
REVOKE ALL ON SCHEMA pgbouncer FROM PUBLIC;
GRANT USAGE ON SCHEMA pgbouncer TO {role};
CREATE OR REPLACE FUNCTION pgbouncer.get_auth(username text)
RETURNS TABLE(usename name, passwd text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $get_auth$
  SELECT s.usename, s.passwd FROM pg_catalog.pg_shadow s
  WHERE s.usename = username
    AND NOT s.usesuper AND NOT s.userepl AND s.usename <> {role_literal}
    AND (s.valuntil IS NULL OR s.valuntil > pg_catalog.now())
$get_auth$;
REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO {role};
",
        role = crate::sql::quote_ident(POOLER_ROLE),
        role_literal = quote_literal(POOLER_ROLE),
    )
}

/// On the primary at `conn_url`: the `pgbouncer` role with `password` (set again each time:
/// the Secret is the truth), then [`auth_function_sql`] in every database that accepts
/// connections. Returns the databases it was installed in.
pub async fn ensure(
    conn_url: &str,
    superuser_password: &str,
    password: &str,
) -> Result<Vec<String>, SqlError> {
    let query = |what: String| move |source| SqlError::Query { what, source };
    let (client, connection) =
        crate::sql::connect(conn_url, superuser_password, "postgres").await?;
    let result = async {
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&POOLER_ROLE])
            .await
            .map_err(query(format!("looking up role {POOLER_ROLE}")))?
            .is_some();
        let role = crate::sql::quote_ident(POOLER_ROLE);
        let verb = if exists { "ALTER" } else { "CREATE" };
        client
            .batch_execute(&format!(
                "{verb} ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
                 NOBYPASSRLS PASSWORD {}; COMMENT ON ROLE {role} IS {}",
                quote_literal(password),
                quote_literal(POOLER_COMMENT)
            ))
            .await
            .map_err(query(format!("creating role {POOLER_ROLE}")))?;
        let rows = client
            .query(
                "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname",
                &[],
            )
            .await
            .map_err(query("listing the databases".to_owned()))?;
        Ok::<_, SqlError>(
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>(),
        )
    }
    .await;
    drop(client);
    let _ = connection.await;
    let databases = result?;
    let sql = format!("BEGIN;\n{}COMMIT;", auth_function_sql());
    for db in &databases {
        let (client, connection) = crate::sql::connect(conn_url, superuser_password, db).await?;
        let result = client.batch_execute(&sql).await.map_err(query(format!(
            "creating pgbouncer.get_auth in database {db}"
        )));
        drop(client);
        let _ = connection.await;
        result?;
    }
    Ok(databases)
}

/// `spec.pooler`'s role and function on the running primary `conn_url`, once per spec
/// generation and primary (as `spec.users`). Not on a standby cluster: its leader is
/// read-only; the role and the function come from the source cluster's data.
pub(crate) async fn ensure_on_primary(
    pg: &PostgresCluster,
    ctx: &Context,
    primary: &str,
    conn_url: &str,
    superuser_password: &str,
) -> Result<(), Error> {
    if pg.spec.pooler.is_none() || pg.spec.standby.is_some() {
        return Ok(());
    }
    let key = ObjectRef::from_obj(pg);
    let done = (pg.meta().generation, primary.to_owned());
    if ctx
        .pooler_ensured
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        == Some(&done)
    {
        return Ok(());
    }
    let names = Names::of(pg);
    let Some(password) =
        crate::reconcile::secret_field(&ctx.client, &names, &names.pooler_secret(), "password")
            .await?
    else {
        return Ok(());
    };
    let databases = ensure(conn_url, superuser_password, &password)
        .await
        .map_err(Error::Pooler)?;
    info!(cluster = %names.cluster, primary = %primary, databases = %databases.join(", "), "ensured the pooler's role and pgbouncer.get_auth");
    ctx.pooler_ensured
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, done);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auth_function_is_security_definer_and_only_pgbouncer_may_call_it() {
        let sql = auth_function_sql();
        assert!(sql.contains("SECURITY DEFINER"));
        assert!(sql.contains("SET search_path = pg_catalog, pg_temp"));
        assert!(sql.contains("REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC;"));
        assert!(
            sql.contains("GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO \"pgbouncer\";")
        );
        assert!(sql.contains("NOT s.usesuper AND NOT s.userepl"));
    }
}
