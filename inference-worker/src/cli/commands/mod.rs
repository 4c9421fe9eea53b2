//! What each subcommand does.

pub mod gen_fixture;
pub mod serve;
