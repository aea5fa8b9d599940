//! The local postgres: its supervisor, the files we manage in its data directory, the control
//! file, the status query and cluster creation.

pub mod agent_lock;
pub mod callbacks;
pub mod conf;
pub mod controldata;
pub mod crash_release;
pub mod custom_bootstrap;
pub mod data_dir;
pub mod fence_guard;
pub mod initdb;
pub mod method_section;
pub mod probe;
pub mod replica;
pub mod replica_method;
pub mod slots;
pub mod supervisor;
pub mod upgrade;
pub mod versioned_params;
