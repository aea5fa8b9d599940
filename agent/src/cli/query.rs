//! `pgwarden dsn` and `pgwarden query`: pick a member by role or name, as patronictl does, and
//! print its libpq DSN or run SQL on it.

use std::time::Duration;

use serde_json::{Map, Value};

use super::{list, CliError, Ctl};
use crate::dcs::{ClusterView, Member};

/// patronictl's `--role` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CtlRole {
    Leader,
    Primary,
    StandbyLeader,
    Replica,
    Standby,
    Any,
}

impl CtlRole {
    fn name(self) -> &'static str {
        match self {
            CtlRole::Leader => "leader",
            CtlRole::Primary => "primary",
            CtlRole::StandbyLeader => "standby-leader",
            CtlRole::Replica => "replica",
            CtlRole::Standby => "standby",
            CtlRole::Any => "any",
        }
    }
}

/// Output of `query`, as patronictl's `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueryFormat {
    Tsv,
    Pretty,
    Json,
    Yaml,
}

/// The member patronictl's `get_any_member` picks: by name (any role), else the first member
/// with `role` (the leader when none is given).
pub fn select_member<'a>(
    view: &'a ClusterView,
    role: Option<CtlRole>,
    member: Option<&str>,
) -> Result<Option<&'a Member>, CliError> {
    if member.is_some() && role.is_some() {
        return Err(CliError::Usage(
            "--role and --member are mutually exclusive options".into(),
        ));
    }
    let role = if member.is_some() {
        CtlRole::Any
    } else {
        role.unwrap_or(CtlRole::Leader)
    };
    let leader = view.leader_name().and_then(|l| view.member(l));
    let candidates: Vec<&Member> = match role {
        CtlRole::Leader => leader.into_iter().collect(),
        CtlRole::Primary => leader
            .filter(|m| m.record.role != "standby_leader")
            .into_iter()
            .collect(),
        CtlRole::StandbyLeader => leader
            .filter(|m| !matches!(m.record.role.as_str(), "primary" | "master"))
            .into_iter()
            .collect(),
        CtlRole::Replica | CtlRole::Standby => view
            .members
            .iter()
            .filter(|m| !view.is_leader(&m.name))
            .collect(),
        CtlRole::Any => view.members.iter().collect(),
    };
    Ok(candidates
        .into_iter()
        .find(|m| member.is_none_or(|n| m.name == n)))
}

/// `host=... port=...`, as patronictl prints it.
pub fn dsn(member: &Member) -> Result<String, CliError> {
    let (host, port) = member.record.host_port().ok_or_else(|| {
        CliError::Failed(format!(
            "{}: cannot read host and port from conn_url {:?}",
            member.name, member.record.conn_url
        ))
    })?;
    Ok(format!("host={host} port={port}"))
}

pub(super) async fn print_dsn(
    ctl: &Ctl,
    role: Option<CtlRole>,
    member: Option<&str>,
) -> Result<(), CliError> {
    let view = ctl.cluster().await?;
    let m = select_member(&view, role, member)?
        .ok_or_else(|| CliError::Failed("Can not find a suitable member".into()))?;
    println!("{}", dsn(m)?);
    Ok(())
}

/// What `query` runs and where.
pub struct QueryArgs {
    pub sql: String,
    pub role: Option<CtlRole>,
    pub member: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub dbname: Option<String>,
    pub format: QueryFormat,
    pub delimiter: String,
}

/// Column names and rows (`None` is SQL NULL) of the last statement that returned rows.
type ResultSet = (Vec<String>, Vec<Vec<Option<String>>>);

pub(super) async fn query(ctl: &Ctl, args: QueryArgs) -> Result<(), CliError> {
    let view = ctl.cluster().await?;
    let unavailable = || match (&args.member, args.role) {
        (Some(m), _) => format!("No connection to member {m} is available"),
        (None, Some(r)) => format!("No connection to role {} is available", r.name()),
        (None, None) => "No connection is available".to_owned(),
    };
    let Some(member) = select_member(&view, args.role, args.member.as_deref())? else {
        return Err(CliError::Failed(unavailable()));
    };
    let (host, port) = member
        .record
        .host_port()
        .ok_or_else(|| CliError::Failed(unavailable()))?;
    let mut config = tokio_postgres::Config::new();
    // libpq's defaults where patronictl (psycopg) relies on them: PGUSER, then the login name;
    // PGPASSWORD.
    let user = args
        .username
        .clone()
        .or_else(|| std::env::var("PGUSER").ok())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "postgres".to_owned());
    config
        .host(&host)
        .port(port)
        .user(&user)
        .application_name("pgwarden ctl")
        .connect_timeout(Duration::from_secs(5));
    if let Some(db) = &args.dbname {
        config.dbname(db);
    }
    if let Some(p) = args
        .password
        .clone()
        .or_else(|| std::env::var("PGPASSWORD").ok())
    {
        config.password(p);
    }
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
        CliError::Failed(format!(
            "{}: cannot connect to {host}:{port}: {}",
            member.name,
            crate::error::error_chain(&e)
        ))
    })?;
    let connection = tokio::spawn(connection);
    let sql_error = |e: tokio_postgres::Error| match e.as_db_error() {
        Some(db) => CliError::Failed(format!(
            "ERROR, SQLSTATE: {}: {}",
            db.code().code(),
            db.message()
        )),
        None => CliError::Failed(format!(
            "{}: {}",
            member.name,
            crate::error::error_chain(&e)
        )),
    };
    // For a role other than any or leader, check what postgres says, not only the DCS.
    if matches!(
        args.role,
        Some(CtlRole::Replica | CtlRole::Standby | CtlRole::StandbyLeader | CtlRole::Primary)
    ) {
        let row = client
            .query_one("SELECT pg_catalog.pg_is_in_recovery()", &[])
            .await
            .map_err(sql_error)?;
        let in_recovery: bool = row.get(0);
        if in_recovery == (args.role == Some(CtlRole::Primary)) {
            return Err(CliError::Failed(unavailable()));
        }
    }
    let messages = client.simple_query(&args.sql).await.map_err(sql_error)?;
    drop(client);
    connection.abort();
    let (columns, rows) = last_result(&messages);
    print!("{}", render(&columns, &rows, args.format, &args.delimiter));
    Ok(())
}

/// The last result set of a (possibly multi-statement) simple query, as psycopg's cursor
/// holds it.
fn last_result(messages: &[tokio_postgres::SimpleQueryMessage]) -> ResultSet {
    use tokio_postgres::SimpleQueryMessage as M;
    let mut result: ResultSet = (Vec::new(), Vec::new());
    let mut fresh = true;
    for message in messages {
        match message {
            M::RowDescription(columns) => {
                result = (
                    columns.iter().map(|c| c.name().to_owned()).collect(),
                    Vec::new(),
                );
                fresh = false;
            }
            M::Row(row) => {
                if fresh {
                    result = (
                        row.columns().iter().map(|c| c.name().to_owned()).collect(),
                        Vec::new(),
                    );
                    fresh = false;
                }
                result.1.push(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                );
            }
            M::CommandComplete(_) => fresh = true,
            _ => {}
        }
    }
    result
}

/// Prints like patronictl's `print_output` (values are the server's text; NULL is `None` in
/// the text formats, `null` in JSON and YAML).
pub fn render(
    columns: &[String],
    rows: &[Vec<Option<String>>],
    format: QueryFormat,
    delimiter: &str,
) -> String {
    let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "None".to_owned());
    match format {
        QueryFormat::Tsv => {
            let mut out = String::new();
            if !columns.is_empty() {
                out.push_str(&columns.join(delimiter));
                out.push('\n');
            }
            for r in rows {
                out.push_str(&r.iter().map(text).collect::<Vec<_>>().join(delimiter));
                out.push('\n');
            }
            out
        }
        QueryFormat::Pretty => {
            let cells: Vec<Vec<String>> =
                rows.iter().map(|r| r.iter().map(text).collect()).collect();
            list::render_grid("", columns, &cells, &vec![false; columns.len()])
        }
        QueryFormat::Json | QueryFormat::Yaml => {
            let objects: Vec<Value> = rows
                .iter()
                .map(|r| {
                    let mut o = Map::new();
                    for (c, v) in columns.iter().zip(r) {
                        o.insert(c.clone(), v.clone().map_or(Value::Null, Value::String));
                    }
                    Value::Object(o)
                })
                .collect();
            if format == QueryFormat::Json {
                format!("{}\n", Value::Array(objects))
            } else {
                serde_yaml::to_string(&objects).unwrap_or_default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::{LeaderKey, MemberRecord};

    fn view() -> ClusterView {
        let member = |name: &str, port: u16, role: &str| Member {
            name: name.into(),
            record: MemberRecord {
                conn_url: format!("postgres://127.0.0.1:{port}/postgres"),
                role: role.into(),
                ..Default::default()
            },
            revision: 1,
            lease: 1,
        };
        ClusterView {
            leader: Some(LeaderKey {
                name: "pg1".into(),
                revision: 1,
                lease: 1,
            }),
            members: vec![
                member("pg0", 5432, "replica"),
                member("pg1", 5433, "primary"),
                member("pg2", 5434, "replica"),
            ],
            ..Default::default()
        }
    }

    fn pick(role: Option<CtlRole>, member: Option<&str>) -> Option<String> {
        let v = view();
        select_member(&v, role, member)
            .expect("valid")
            .map(|m| dsn(m).expect("dsn"))
    }

    #[test]
    fn members_are_picked_as_patronictl_does() {
        assert_eq!(
            pick(None, None).as_deref(),
            Some("host=127.0.0.1 port=5433")
        );
        assert_eq!(
            pick(Some(CtlRole::Primary), None).as_deref(),
            Some("host=127.0.0.1 port=5433")
        );
        assert_eq!(pick(Some(CtlRole::StandbyLeader), None), None);
        assert_eq!(
            pick(Some(CtlRole::Replica), None).as_deref(),
            Some("host=127.0.0.1 port=5432")
        );
        assert_eq!(
            pick(None, Some("pg2")).as_deref(),
            Some("host=127.0.0.1 port=5434")
        );
        assert_eq!(pick(None, Some("nobody")), None);
        let v = view();
        assert!(matches!(
            select_member(&v, Some(CtlRole::Any), Some("pg0")),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn query_output_formats() {
        let columns = vec!["a".to_owned(), "b".to_owned()];
        let rows = vec![vec![Some("1".to_owned()), None]];
        assert_eq!(
            render(&columns, &rows, QueryFormat::Tsv, "\t"),
            "a\tb\n1\tNone\n"
        );
        assert_eq!(
            render(&columns, &rows, QueryFormat::Json, "\t"),
            "[{\"a\":\"1\",\"b\":null}]\n"
        );
        assert_eq!(
            render(&columns, &rows, QueryFormat::Pretty, "\t"),
            "+---+------+\n| a |  b   |\n+---+------+\n| 1 | None |\n+---+------+\n"
        );
    }
}
