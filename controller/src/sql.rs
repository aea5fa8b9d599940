//! `spec.users` and `spec.databases`: roles and databases created on the primary, over the
//! `conn_url` its agent publishes, as the superuser. Only what is missing is created; an
//! existing role keeps its password and attributes (a person may have changed them on
//! purpose), as the Secrets are never overwritten.

use std::time::Duration;

use crate::crd::{DatabaseSpec, UserSpec};
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
    let mut config: tokio_postgres::Config = conn_url
        .parse()
        .map_err(|_| SqlError::ConnUrl(conn_url.to_owned()))?;
    config
        .user(SUPERUSER)
        .password(superuser_password)
        .dbname("postgres")
        .application_name("pgwarden-controller")
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|source| SqlError::Connect {
            url: conn_url.to_owned(),
            source,
        })?;
    let connection = tokio::spawn(connection);
    let result = ensure_with(&client, users, databases).await;
    drop(client);
    let _ = connection.await;
    result
}

async fn ensure_with(
    client: &tokio_postgres::Client,
    users: &[NewUser<'_>],
    databases: &[DatabaseSpec],
) -> Result<Vec<String>, SqlError> {
    let mut created = Vec::new();
    for user in users {
        let name = &user.spec.name;
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[name])
            .await
            .map_err(|source| SqlError::Query {
                what: format!("looking up role {name}"),
                source,
            })?
            .is_some();
        if exists {
            continue;
        }
        let mut sql = format!("CREATE ROLE {} WITH LOGIN", quote_ident(name));
        for option in &user.spec.options {
            sql.push(' ');
            sql.push_str(option.as_sql());
        }
        sql.push_str(&format!(" PASSWORD {}", quote_literal(&user.password)));
        client
            .batch_execute(&sql)
            .await
            .map_err(|source| SqlError::Query {
                what: format!("creating role {name}"),
                source,
            })?;
        created.push(format!("role {name}"));
    }
    for db in databases {
        let name = &db.name;
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[name])
            .await
            .map_err(|source| SqlError::Query {
                what: format!("looking up database {name}"),
                source,
            })?
            .is_some();
        if exists {
            continue;
        }
        let owner = db.owner.as_deref().unwrap_or(SUPERUSER);
        let sql = format!(
            "CREATE DATABASE {} OWNER {}",
            quote_ident(name),
            quote_ident(owner)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|source| SqlError::Query {
                what: format!("creating database {name}"),
                source,
            })?;
        created.push(format!("database {name}"));
    }
    Ok(created)
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
    fn quoting_doubles_the_quote_characters() {
        assert_eq!(quote_ident("orders_app"), "\"orders_app\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
