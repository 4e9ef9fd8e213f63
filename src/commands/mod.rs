//! The subcommands of the `tollgate` binary; `main.rs` only parses the command line.

pub mod check_config;
pub mod keys;
pub mod serve;
