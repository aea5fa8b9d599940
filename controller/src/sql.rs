//! `spec.users` and `spec.databases` on the primary, over the `conn_url` its agent publishes,
//! as the superuser. Missing roles and databases are created; an existing role gets the
//! attributes the spec lists and loses the others among those the spec can set (`options`), an
//! existing database gets the spec's owner. A role keeps its password, as the Secrets are never
//! overwritten. The roles of `spec.users` carry a comment ([`MANAGED_COMMENT`]); one that
//! carries it and has left the spec is dropped, or, while it still owns objects, loses `LOGIN`
//! (its objects are a person's to move).

use std::time::Duration;

use crate::crd::{DatabaseSpec, RoleOption, UserSpec};
use crate::render::agent_config::SUPERUSER;

/// Failures of one pass; the reconcile is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("the primary's conn_url {0:?} is not a postgres:// URL")]
    ConnUrl(String),
    #[error("connecting to the primary at {url} failed")]
    Connect {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{what} failed")]
    Query {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// The comment on the roles the controller manages: how a role that left `spec.users` is told
/// from one a person created.
pub const MANAGED_COMMENT: &str = "managed by pgwarden-controller (spec.users)";

/// A role to create, with the password from its Secret.
#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    pub spec: &'a UserSpec,
    pub password: String,
}

/// Creates the missing roles, then the missing databases. Returns what it created.
pub async fn ensure(
    conn_url: &str,
    superuser_password: &str,
    users: &[NewUser<'_>],
    databases: &[DatabaseSpec],
) -> Result<Vec<String>, SqlError> {
    let (client, connection) = connect(conn_url, superuser_password, "postgres").await?;
    let result = ensure_with(&client, users, databases).await;
    drop(client);
    let _ = connection.await;
    result
}

/// A superuser session on database `dbname` of the server at `conn_url`, and the task driving
/// it (await it after dropping the client).
pub async fn connect(
    conn_url: &str,
    superuser_password: &str,
    dbname: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), SqlError> {
    let mut config: tokio_postgres::Config = conn_url
        .parse()
        .map_err(|_| SqlError::ConnUrl(conn_url.to_owned()))?;
    config
        .user(SUPERUSER)
        .password(superuser_password)
        .dbname(dbname)
        .application_name("pgwarden-controller")
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|source| SqlError::Connect {
            url: conn_url.to_owned(),
            source,
        })?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, connection))
}

async fn ensure_with(
    client: &tokio_postgres::Client,
    users: &[NewUser<'_>],
    databases: &[DatabaseSpec],
) -> Result<Vec<String>, SqlError> {
    let query = |what: String| move |source| SqlError::Query { what, source };
    let mut changed = Vec::new();
    for user in users {
        let name = &user.spec.name;
        let columns = RoleOption::ALL
            .iter()
            .map(|(_, c)| *c)
            .collect::<Vec<_>>()
            .join(", ");
        let row = client
            .query_opt(
                &format!("SELECT {columns} FROM pg_roles WHERE rolname = $1"),
                &[name],
            )
            .await
            .map_err(query(format!("looking up role {name}")))?;
        match row {
            None => {
                let mut sql = format!("CREATE ROLE {} WITH LOGIN", quote_ident(name));
                for option in &user.spec.options {
                    sql.push(' ');
                    sql.push_str(option.as_sql());
                }
                sql.push_str(&format!(" PASSWORD {}", quote_literal(&user.password)));
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(query(format!("creating role {name}")))?;
                changed.push(format!("role {name}"));
            }
            Some(row) => {
                let alter = attribute_changes(&user.spec.options, |i| row.get::<_, bool>(i));
                if !alter.is_empty() {
                    let sql = format!("ALTER ROLE {} WITH {}", quote_ident(name), alter.join(" "));
                    client
                        .batch_execute(&sql)
                        .await
                        .map_err(query(format!("changing the attributes of role {name}")))?;
                    changed.push(format!("role {name} ({})", alter.join(" ")));
                }
            }
        }
        client
            .batch_execute(&format!(
                "COMMENT ON ROLE {} IS {}",
                quote_ident(name),
                quote_literal(MANAGED_COMMENT)
            ))
            .await
            .map_err(query(format!("marking role {name} as managed")))?;
    }
    for db in databases {
        let name = &db.name;
        let owner = db.owner.as_deref().unwrap_or(SUPERUSER);
        let current: Option<String> = client
            .query_opt(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
                &[name],
            )
            .await
            .map_err(query(format!("looking up database {name}")))?
            .map(|row| row.get(0));
        match current {
            None => {
                let sql = format!(
                    "CREATE DATABASE {} OWNER {}",
                    quote_ident(name),
                    quote_ident(owner)
                );
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(query(format!("creating database {name}")))?;
                changed.push(format!("database {name}"));
            }
            Some(current) if current != owner => {
                let sql = format!(
                    "ALTER DATABASE {} OWNER TO {}",
                    quote_ident(name),
                    quote_ident(owner)
                );
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(query(format!("changing the owner of database {name}")))?;
                changed.push(format!("owner of database {name}: {owner}"));
            }
            Some(_) => {}
        }
    }
    // Roles that left the spec, last: a database may have been handed to another owner above.
    let managed = client
        .query(
            "SELECT rolname FROM pg_roles WHERE shobj_description(oid, 'pg_authid') = $1",
            &[&MANAGED_COMMENT],
        )
        .await
        .map_err(query("listing the managed roles".to_owned()))?;
    for row in managed {
        let name: String = row.get(0);
        if users.iter().any(|u| u.spec.name == name) {
            continue;
        }
        match client
            .batch_execute(&format!("DROP ROLE {}", quote_ident(&name)))
            .await
        {
            Ok(()) => changed.push(format!("dropped role {name}")),
            Err(e)
                if e.code()
                    == Some(&tokio_postgres::error::SqlState::DEPENDENT_OBJECTS_STILL_EXIST) =>
            {
                client
                    .batch_execute(&format!("ALTER ROLE {} WITH NOLOGIN", quote_ident(&name)))
                    .await
                    .map_err(query(format!("disabling role {name}")))?;
                changed.push(format!("role {name} NOLOGIN (it still owns objects)"));
            }
            Err(source) => {
                return Err(SqlError::Query {
                    what: format!("dropping role {name}"),
                    source,
                })
            }
        }
    }
    Ok(changed)
}

/// `CREATEDB`/`NOCREATEDB`... for each attribute of [`RoleOption::ALL`] whose current value
/// (`have(i)`, the i-th column) differs from whether `wanted` lists it.
fn attribute_changes(wanted: &[RoleOption], have: impl Fn(usize) -> bool) -> Vec<String> {
    RoleOption::ALL
        .iter()
        .enumerate()
        .filter_map(|(i, (option, _))| {
            let want = wanted.contains(option);
            (want != have(i)).then(|| {
                if want {
                    option.as_sql().to_owned()
                } else {
                    format!("NO{}", option.as_sql())
                }
            })
        })
        .collect()
}

/// `"name"`, with embedded quotes doubled (names are also restricted by the schema).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` as a standard-conforming string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_granted_and_revoked_to_match_the_spec() {
        // Current: CREATEDB only; wanted: CREATEROLE only.
        let have = |i: usize| RoleOption::ALL[i].0 == RoleOption::Createdb;
        assert_eq!(
            attribute_changes(&[RoleOption::Createrole], have),
            vec!["NOCREATEDB", "CREATEROLE"]
        );
        assert!(attribute_changes(&[RoleOption::Createdb], have).is_empty());
    }

    #[test]
    fn quoting_doubles_the_quote_characters() {
        assert_eq!(quote_ident("orders_app"), "\"orders_app\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
