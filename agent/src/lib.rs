//! pgwarden: high availability for PostgreSQL.
//!
//! # Layout
//! - [`config`]: the Patroni-compatible YAML schema, environment and flag overrides, validation.
//! - [`dcs`]: the DCS trait, the cluster view in Patroni's key layout, and the etcd v3 backend.
//! - [`postgres`]: the supervisor of the local postmaster: initdb, configuration files, start,
//!   stop, crash restart, status queries, `pg_controldata`.
//! - [`ha`]: the HA loop. `observe` gathers facts, `decide` (pure) turns them into actions,
//!   `execute` performs them; `timing` holds the lease and fencing arithmetic.
//! - [`api`]: the REST API (Patroni's endpoints) and `/metrics`.
//! - [`backup`]: pgBackRest: WAL archiving, scheduled and on-demand backups, restores for
//!   replicas and bootstrap.
//! - [`state`]: the status the HA loop publishes for the API.
//! - [`run`]: wiring of the long-running tasks, signals and shutdown; PID-1 reaping.
//! - [`init`]: `pgwarden-init`, the container's PID 1 that runs the agent, forwards signals,
//!   reaps orphans and lets the fence guard outlive a crashed agent.
//! - [`cli`]: the operator's commands (`pgwarden list`, `switchover`, …), like `patronictl`.
//! - [`peer`]: HTTP calls to other members' REST APIs.
//! - [`error`]: reporting an error with its sources ([`error::error_chain`]).

pub mod api;
pub mod backup;
pub mod cli;
pub mod config;
pub mod dcs;
pub mod error;
pub mod ha;
pub mod init;
pub mod logging;
pub mod peer;
pub mod postgres;
pub mod run;
pub mod state;

/// pgwarden's own version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
