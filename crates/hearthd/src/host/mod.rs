//! The host: every kernel object hearth touches, behind narrow traits.
//!
//! Lifecycle code talks only to these traits, so unit tests run it against
//! the hand-written fakes in [`fake`] (an in-memory model of the kernel that
//! records calls and can be told to fail at a given one) and integration
//! tests run it against the real kernel. Today the host is the VMM process
//! ([`process`]); taps, nftables and disks get their own traits here.

pub mod fake;
pub mod process;

pub use process::{ExitInfo, LinuxProcesses, ProcessError, ProcessHost, SpawnSpec};
