//! Firewall half of the host: one VM's NAT and port-forward rules, added and
//! removed as one nftables transaction.
//!
//! Everything lives in hearth's own table, `ip hearth` (never another
//! table, never another table's policy). Base chains hook prerouting,
//! output and postrouting (nat) and forward (filter); each dispatches
//! through a verdict map keyed by the VM's tap, guest address or
//! protocol/port to the VM's own chains, all named `vm-<shortid>…`. Adding
//! or removing one VM is a handful of map elements and chains, so its cost
//! does not grow with the number of VMs present.

pub mod fake;
pub mod nft;

use async_trait::async_trait;
pub use hearth_api::{PortForward, Proto, VmRules};

/// The table hearth owns (DESIGN.md, "Ownership marks").
pub const TABLE: &str = "hearth";

/// Why a firewall call failed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// `nft` ran and failed; carries what it said.
    #[error("nft {op} failed: `{command}` exited with status {status}: {stderr}")]
    Nft {
        /// What was attempted.
        op: &'static str,
        /// The command line that was run.
        command: String,
        /// Exit status, or -1 if it was killed by a signal.
        status: i32,
        /// Its standard output.
        stdout: String,
        /// Its standard error.
        stderr: String,
    },
    /// nft could not be spawned.
    #[error("cannot run {program}")]
    Spawn {
        /// The binary.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A plan hearth refuses before any kernel call.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What (`interface name`, `short id`, …).
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// nft's JSON output could not be parsed.
    #[error("unexpected nft output for {op}: {detail}")]
    Output {
        /// What was attempted.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// The firewall operations lifecycle needs.
#[async_trait]
pub trait Firewall: Send + Sync + std::fmt::Debug {
    /// Adds all of `rules` (and hearth's table, base chains and maps if
    /// missing) in one transaction: afterwards either all of the VM's
    /// rules exist or none do. Returns a short description of what was
    /// installed (chain names and rule handles) for `hearth inspect`.
    async fn apply(&self, rules: &VmRules) -> Result<Vec<String>, FirewallError>;

    /// Removes everything `rules` installed, in one transaction. What is
    /// already gone is success.
    async fn remove(&self, rules: &VmRules) -> Result<(), FirewallError>;

    /// Short ids of every per-VM chain present in hearth's table.
    async fn list_vm_chains(&self) -> Result<Vec<String>, FirewallError>;

    /// Removes every chain of VM `short_id` and every map element that
    /// jumps to one, in one transaction, without a record of its rules:
    /// for orphans the store knows nothing about. Absent is success.
    async fn remove_orphan(&self, short_id: &str) -> Result<(), FirewallError>;
}
