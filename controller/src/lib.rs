//! pgwarden's Kubernetes controller: a `PostgresCluster` resource becomes a StatefulSet of
//! pgwarden agents with its Services, configuration, Secrets and RBAC.
//!
//! The controller never takes part in failover: the agents elect their leader through a Lease
//! and label their own Pods. The controller creates and updates objects, reports status, and
//! orders restarts so that the primary goes last.
//!
//! # Layout
//! - [`crd`]: the `PostgresCluster` spec and status (the CRD's schema is derived from them).
//! - [`render`]: pure builders, one per object kind.
//! - [`status`]: status from the leader Lease and the member records on the Pods.
//! - [`rollout`]: which Pod to restart next, or which switchover to request (pure).
//! - [`scale_down`]: whether a departing leader hands over before the member count drops (pure).
//! - [`reconcile`]: the kube-runtime controller: apply, status, rollout, cleanup.
//! - [`dcs_config`]: the spec's parameters in the agents' DCS `config` (reload, not restart).
//! - [`agent_api`]: calls to an agent's REST API (switchover, backup).
//! - [`manual_backup`]: the `pgwarden.io/backup` annotation against `status.manualBackup`.
//! - [`leader`]: the controller's own Lease-based leader election.
//! - [`pooler`]: `spec.pooler`'s PgBouncer objects, and its role and `auth_query` function.
//! - [`sql`]: the roles and databases of `spec.users`/`spec.databases`, on the primary.
//! - [`unchanged`]: whether an apply would change anything (skipped when not).
//! - [`upgrade`]: the major-version upgrade of a raised `spec.postgresVersion` (pure).

pub mod agent_api;
pub mod crd;
pub mod dcs_config;
pub mod leader;
pub mod manual_backup;
pub mod pooler;
pub mod reconcile;
pub mod render;
pub mod rollout;
pub mod scale_down;
pub mod sql;
pub mod status;
pub mod unchanged;
pub mod upgrade;
