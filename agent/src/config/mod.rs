//! Configuration: Patroni's YAML schema ([`schema`]), loading with environment and flag
//! overrides ([`load`]), validation with full key paths ([`validate`]).

mod derived;
pub use derived::BinDirs;
pub mod dynamic;
pub mod flex;
pub mod load;
pub mod schema;
pub mod slots;
pub mod timing;
pub mod validate;

pub use load::{load, load_ctl, load_str, ConfigError, Loaded, Overrides};
pub use schema::*;
pub use timing::{FencePolicy, Timing};
pub use validate::FieldError;

#[cfg(test)]
mod tests;
