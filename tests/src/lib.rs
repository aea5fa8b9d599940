//! End-to-end tests of pgwarden against real processes, and the harness they use.
//!
//! # Layout
//! - [`harness`]: `TestEnv` (temp dir + etcd + members), `Member` (config, agent process, REST
//!   and SQL helpers), `ProcessGuard` (kill by PID on drop, also on panic), free ports, a
//!   cuttable TCP proxy for fault injection, `wait_until` polling; `kube` (a real kube-apiserver
//!   v1.20 + kube-controller-manager, shared per test binary), `kubelet` (agents in Pods) and
//!   `operator` (the controller as a process, the CRD, a kubelet for StatefulSet Pods).
//! - `tests/*.rs`: one file per scenario family.
//!
//! Tests run as root in CI; agents (and so postgres) then run as the `postgres` user. Waits scale
//! with `PGWARDEN_TEST_TIMEOUT_MULT`. There are no timing assertions: timeouts only bound waits.

pub mod harness;
