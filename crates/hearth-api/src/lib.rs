//! Wire types shared by `hearthd` and the `hearth` CLI.
//!
//! The daemon and the CLI are separate binaries that talk JSON over a Unix
//! socket; keeping every request and response type in one small crate means
//! the two can never disagree about a field name. The crate also carries the
//! one HTTP-over-Unix-socket client both sides use (the CLI to reach
//! `hearthd`, `hearthd` to reach Firecracker), so there is one place that
//! knows how to speak HTTP/1.1 over `AF_UNIX`.

pub mod client;
pub mod routes;
pub mod state;
pub mod types;

pub use state::VmState;
pub use types::*;
