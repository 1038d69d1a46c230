//! The host: every kernel object hearth touches, behind narrow traits.
//!
//! Lifecycle code talks only to these traits, so unit tests run it against
//! hand-written fakes (in-memory models of the kernel that record calls and
//! can be told to fail at a given one) and integration tests run it against
//! the real kernel: [`process`] (VMM processes), [`net`] (taps, addresses,
//! sysctls), [`firewall`] (nftables), [`disk`] (copies, loop, dm).

pub mod disk;
pub mod fake;
pub mod firewall;
pub mod net;
pub mod process;
#[cfg(test)]
pub mod testns;

pub use process::{ExitInfo, LinuxProcesses, ProcessError, ProcessHost, SpawnSpec};
