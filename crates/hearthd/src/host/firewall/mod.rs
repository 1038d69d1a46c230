//! Firewall half of the host: one VM's NAT and port-forward rules, added and
//! removed as one nftables transaction, sent over netlink.
//!
//! Everything lives in hearth's own table, `ip hearth` (never another
//! table, never another table's policy). Its chains and rules are fixed;
//! a VM is a handful of elements in its sets (tap, guest address,
//! forwarded ports), each marked `hearth:vm:<id>`, so adding or removing
//! one VM costs the same however many VMs there are (see [`nft`]).

pub mod fake;
mod nfnl;
pub mod nft;

use async_trait::async_trait;
pub use hearth_api::{PortForward, Proto, VmRules};

/// The table hearth owns (DESIGN.md, "Ownership marks").
pub const TABLE: &str = "hearth";

/// Why a firewall call failed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The kernel refused a transaction (nothing of it was applied), or a
    /// dump; names the first message it refused.
    #[error("nftables {op} refused at `{what}`{}: {source}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        /// What was attempted.
        op: &'static str,
        /// The refused message: `add element dnat_ports[tcp . 8080]`.
        what: String,
        /// The kernel's own reason (extended ack), or hearth's reading.
        detail: Option<String>,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// The answer was lost: what sent the transaction panicked.
    #[error("nftables {op} failed: its answer was lost")]
    Gone {
        /// What was attempted.
        op: &'static str,
    },
    /// A plan hearth refuses before any kernel call.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What (`interface name`, `short id`, …).
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// The firewall operations lifecycle needs.
#[async_trait]
pub trait Firewall: Send + Sync + std::fmt::Debug {
    /// Adds all of `rules` (and hearth's table, chains, sets and rules if
    /// missing) in one transaction: afterwards either all of the VM's
    /// elements exist or none do. Returns a short description of what was
    /// installed (one line per element) for `hearth inspect`.
    async fn apply(&self, rules: &VmRules) -> Result<Vec<String>, FirewallError>;

    /// Removes everything `rules` installed, in one transaction. What is
    /// already gone is success.
    async fn remove(&self, rules: &VmRules) -> Result<(), FirewallError>;

    /// Ids of every VM with anything in hearth's table (by the
    /// `hearth:vm:<id>` marks).
    async fn list_vms(&self) -> Result<Vec<String>, FirewallError>;

    /// Removes everything marked with VM `vm_id`, in one transaction,
    /// without a record of its rules: for orphans the store knows nothing
    /// about. Absent is success.
    async fn remove_orphan(&self, vm_id: &str) -> Result<(), FirewallError>;
}
