//! The command line: clap arguments ([`args`]) apart from the commands that run
//! them ([`commands`]).

pub mod args;
pub mod commands;

pub use args::{Cli, Command};
