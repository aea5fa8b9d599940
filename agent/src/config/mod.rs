//! (being written)
pub mod schema;
pub use schema::*;
mod derived;
