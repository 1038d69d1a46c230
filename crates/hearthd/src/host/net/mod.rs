//! Network half of the host: persistent tap devices and their addresses,
//! routes, neighbours and sysctls.
//!
//! Taps are created through `/dev/net/tun` (TUNSETIFF + TUNSETPERSIST) and
//! configured through rtnetlink — no `ip` subprocesses on the hot path.
//! Every tap hearth makes is named `hth<N>` (DESIGN.md, "Ownership marks").

pub mod fake;
pub mod linux;

use std::net::Ipv4Addr;

use async_trait::async_trait;

/// Why a network call failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A tun/tap ioctl or open failed.
    #[error("{op} on tap {name}")]
    Tap {
        /// What was attempted.
        op: &'static str,
        /// The tap.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("netlink {op} on {target}")]
    Netlink {
        /// What was attempted.
        op: &'static str,
        /// The link or address.
        target: String,
        /// What the kernel said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A sysctl could not be read or written.
    #[error("sysctl {key}")]
    Sysctl {
        /// The key (`net.ipv4.ip_forward`).
        key: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A name or value hearth refuses before any kernel call.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// One IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub dst: Ipv4Addr,
    /// Its prefix length (0 for the default route).
    pub prefix_len: u8,
    /// Output interface, if the route names one.
    pub oif: Option<String>,
}

/// The network operations lifecycle and capabilities need. Every call is
/// idempotent: creating what exists and removing what is gone succeed.
#[async_trait]
pub trait NetHost: Send + Sync + std::fmt::Debug {
    /// Creates the persistent tap `name` (IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR, as Firecracker opens it) if it does not exist.
    async fn create_tap(&self, name: &str) -> Result<(), NetError>;

    /// Clears every address, route and neighbour entry of tap `name`, then
    /// gives it `host_addr/prefix_len` and sets it up.
    async fn configure_tap(
        &self,
        name: &str,
        host_addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetError>;

    /// Clears every address, route and neighbour entry of tap `name` and
    /// sets it down (it goes back to the idle pool). Absent is success.
    async fn reset_tap(&self, name: &str) -> Result<(), NetError>;

    /// Deletes link `name`. Absent is success.
    async fn delete_link(&self, name: &str) -> Result<(), NetError>;

    /// Whether link `name` exists.
    async fn link_exists(&self, name: &str) -> Result<bool, NetError>;

    /// Names of every link whose name starts with `prefix`.
    async fn list_links(&self, prefix: &str) -> Result<Vec<String>, NetError>;

    /// Names of every tap (tun device in tap mode) whose name starts with
    /// `prefix` — what the orphan sweep compares with the pool: other
    /// `hth*` links (a test's veth uplink, say) are not hearth's taps.
    async fn list_taps(&self, prefix: &str) -> Result<Vec<String>, NetError>;

    /// The IPv4 routes of the main table.
    async fn routes(&self) -> Result<Vec<Route>, NetError>;

    /// Writes a sysctl under `/proc/sys` (`net.ipv4.ip_forward` → `1`).
    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), NetError>;

    /// Reads a sysctl under `/proc/sys`.
    fn get_sysctl(&self, key: &str) -> Result<String, NetError>;
}
