//! A hand-written fake of [`NetHost`]: an in-memory model of the kernel's
//! links, addresses, routes, neighbours and sysctls that records every call
//! and can be told to fail at a named operation.
//!
//! Unit tests of the lifecycle and of reconcile run against it, so every
//! failure branch and cleanup fallback can be reached without root. It
//! refuses the same input as [`LinuxNet`](super::linux::LinuxNet) (the
//! validation is shared) and models the same idempotence: creating what
//! exists, and resetting or deleting what is gone, succeed.
//!
//! A failure injected with [`FakeNet::fail_at`] happens after the call is
//! recorded and before the model changes, so the model shows what the
//! kernel would hold after a refused request.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::linux::{
    sysctl_path, validate_addr, validate_ifname, validate_owned_link, validate_sysctl_value,
    validate_tap_name,
};
use super::{NetError, NetHost, Route};

/// One modelled link.
#[derive(Debug, Clone, Default)]
struct FakeLink {
    is_tap: bool,
    up: bool,
    addrs: Vec<(Ipv4Addr, u8)>,
    neighbours: Vec<Ipv4Addr>,
}

#[derive(Debug, Default)]
struct Model {
    links: BTreeMap<String, FakeLink>,
    /// The main table; connected routes of configured links are added and
    /// removed with their addresses, as the kernel does.
    routes: Vec<Route>,
    sysctls: BTreeMap<String, String>,
    calls: Vec<String>,
    fail_at: Option<String>,
}

impl Model {
    /// Records the call; fails it if told to.
    fn call(&mut self, op: &'static str, detail: &str) -> Result<(), io::Error> {
        self.calls.push(if detail.is_empty() {
            op.to_owned()
        } else {
            format!("{op} {detail}")
        });
        if self.fail_at.as_deref() == Some(op) {
            return Err(io::Error::other(format!("injected failure at {op}")));
        }
        Ok(())
    }

    /// Clears a link's addresses, routes and neighbours.
    fn flush(&mut self, name: &str) {
        if let Some(link) = self.links.get_mut(name) {
            link.addrs.clear();
            link.neighbours.clear();
        }
        self.routes.retain(|r| r.oif.as_deref() != Some(name));
    }
}

fn netlink(op: &'static str, target: &str, source: io::Error) -> NetError {
    NetError::Netlink {
        op,
        target: target.to_owned(),
        source: Box::new(source),
    }
}

fn no_such_device() -> io::Error {
    io::Error::from_raw_os_error(libc::ENODEV)
}

/// The network part of `addr/prefix_len`.
fn network(addr: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    Ipv4Addr::from(u32::from(addr) & mask)
}

/// A fake network host. Clones share one model.
#[derive(Debug, Clone, Default)]
pub struct FakeNet {
    inner: Arc<Mutex<Model>>,
}

impl FakeNet {
    /// A host with no links, routes or sysctls.
    pub fn new() -> Self {
        Self::default()
    }

    fn m(&self) -> MutexGuard<'_, Model> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, as `op args` (`create_tap hth0`,
    /// `configure_tap hth0 10.0.0.1/30`, `set_sysctl net.ipv4.ip_forward=1`).
    pub fn calls(&self) -> Vec<String> {
        self.m().calls.clone()
    }

    /// Makes every call of operation `op` (`"configure_tap"`, …) fail from
    /// now on, or none with `None`.
    pub fn fail_at(&self, op: Option<&str>) {
        self.m().fail_at = op.map(str::to_owned);
    }

    /// Replaces the main routing table.
    pub fn set_routes(&self, routes: Vec<Route>) {
        self.m().routes = routes;
    }

    /// Adds a route, as someone else on the host might.
    pub fn add_route(&self, route: Route) {
        self.m().routes.push(route);
    }

    /// Adds a link that is not a tap (an uplink, a veth), or a tap made
    /// behind hearth's back.
    pub fn add_link(&self, name: &str, is_tap: bool) {
        self.m().links.entry(name.to_owned()).or_insert(FakeLink {
            is_tap,
            ..FakeLink::default()
        });
    }

    /// Adds an address to a link behind hearth's back (no-op if absent).
    pub fn add_addr(&self, name: &str, addr: Ipv4Addr, prefix_len: u8) {
        if let Some(l) = self.m().links.get_mut(name) {
            l.addrs.push((addr, prefix_len));
        }
    }

    /// Adds a neighbour entry on a link (no-op if absent).
    pub fn add_neighbour(&self, name: &str, ip: Ipv4Addr) {
        if let Some(l) = self.m().links.get_mut(name) {
            l.neighbours.push(ip);
        }
    }

    /// Names of the taps, sorted.
    pub fn taps(&self) -> Vec<String> {
        self.m()
            .links
            .iter()
            .filter(|(_, l)| l.is_tap)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Addresses of link `name` (empty if absent).
    pub fn addrs(&self, name: &str) -> Vec<(Ipv4Addr, u8)> {
        self.m()
            .links
            .get(name)
            .map(|l| l.addrs.clone())
            .unwrap_or_default()
    }

    /// Neighbour entries of link `name` (empty if absent).
    pub fn neighbours(&self, name: &str) -> Vec<Ipv4Addr> {
        self.m()
            .links
            .get(name)
            .map(|l| l.neighbours.clone())
            .unwrap_or_default()
    }

    /// Whether link `name` exists and is up.
    pub fn is_up(&self, name: &str) -> bool {
        self.m().links.get(name).is_some_and(|l| l.up)
    }

    /// A sysctl's value, if set.
    pub fn sysctl(&self, key: &str) -> Option<String> {
        self.m().sysctls.get(key).cloned()
    }
}

#[async_trait]
impl NetHost for FakeNet {
    async fn create_tap(&self, name: &str) -> Result<(), NetError> {
        validate_tap_name(name)?;
        let mut m = self.m();
        let tap = |source| NetError::Tap {
            op: "TUNSETIFF",
            name: name.to_owned(),
            source,
        };
        m.call("create_tap", name).map_err(tap)?;
        match m.links.get(name) {
            Some(l) if !l.is_tap => Err(tap(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the name is taken by a link that is not a tap",
            ))),
            Some(_) => Ok(()),
            None => {
                m.links.insert(
                    name.to_owned(),
                    FakeLink {
                        is_tap: true,
                        ..FakeLink::default()
                    },
                );
                Ok(())
            }
        }
    }

    async fn configure_tap(
        &self,
        name: &str,
        host_addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetError> {
        validate_tap_name(name)?;
        validate_addr(host_addr, prefix_len)?;
        let mut m = self.m();
        m.call("configure_tap", &format!("{name} {host_addr}/{prefix_len}"))
            .map_err(|e| netlink("configure", name, e))?;
        if !m.links.contains_key(name) {
            return Err(netlink("configure", name, no_such_device()));
        }
        m.flush(name);
        if let Some(l) = m.links.get_mut(name) {
            l.addrs.push((host_addr, prefix_len));
            l.up = true;
        }
        m.routes.push(Route {
            dst: network(host_addr, prefix_len),
            prefix_len,
            oif: Some(name.to_owned()),
        });
        Ok(())
    }

    async fn reset_tap(&self, name: &str) -> Result<(), NetError> {
        validate_tap_name(name)?;
        let mut m = self.m();
        m.call("reset_tap", name)
            .map_err(|e| netlink("reset", name, e))?;
        m.flush(name);
        if let Some(l) = m.links.get_mut(name) {
            l.up = false;
        }
        Ok(())
    }

    async fn delete_link(&self, name: &str) -> Result<(), NetError> {
        validate_owned_link(name)?;
        let mut m = self.m();
        m.call("delete_link", name)
            .map_err(|e| netlink("delete link", name, e))?;
        m.flush(name);
        m.links.remove(name);
        Ok(())
    }

    async fn link_exists(&self, name: &str) -> Result<bool, NetError> {
        validate_ifname(name)?;
        let mut m = self.m();
        m.call("link_exists", name)
            .map_err(|e| netlink("get link", name, e))?;
        Ok(m.links.contains_key(name))
    }

    async fn list_links(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        let mut m = self.m();
        m.call("list_links", prefix)
            .map_err(|e| netlink("list links", "all links", e))?;
        Ok(m.links
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn list_taps(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        let mut m = self.m();
        m.call("list_taps", prefix)
            .map_err(|e| netlink("list links", "all links", e))?;
        Ok(m.links
            .iter()
            .filter(|(n, l)| l.is_tap && n.starts_with(prefix))
            .map(|(n, _)| n.clone())
            .collect())
    }

    async fn routes(&self) -> Result<Vec<Route>, NetError> {
        let mut m = self.m();
        m.call("routes", "")
            .map_err(|e| netlink("list routes", "main table", e))?;
        Ok(m.routes.clone())
    }

    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), NetError> {
        sysctl_path(key)?;
        validate_sysctl_value(key, value)?;
        let mut m = self.m();
        m.call("set_sysctl", &format!("{key}={value}"))
            .map_err(|source| NetError::Sysctl {
                key: key.to_owned(),
                source,
            })?;
        m.sysctls.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    fn get_sysctl(&self, key: &str) -> Result<String, NetError> {
        sysctl_path(key)?;
        let mut m = self.m();
        let sys = |source| NetError::Sysctl {
            key: key.to_owned(),
            source,
        };
        m.call("get_sysctl", key).map_err(sys)?;
        m.sysctls
            .get(key)
            .cloned()
            .ok_or_else(|| sys(io::Error::from_raw_os_error(libc::ENOENT)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    const A: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 5);

    #[test]
    fn create_configure_reset_delete_are_idempotent() {
        rt().block_on(async {
            let net = FakeNet::new();
            net.create_tap("hth0").await.unwrap();
            net.create_tap("hth0").await.unwrap();
            assert_eq!(net.taps(), ["hth0"]);
            assert!(!net.is_up("hth0"));

            net.configure_tap("hth0", A, 30).await.unwrap();
            net.configure_tap("hth0", A, 30).await.unwrap();
            assert_eq!(net.addrs("hth0"), [(A, 30)]);
            assert!(net.is_up("hth0"));
            let connected = Route {
                dst: Ipv4Addr::new(172, 16, 0, 0),
                prefix_len: 30,
                oif: Some("hth0".into()),
            };
            assert_eq!(net.routes().await.unwrap(), [connected]);

            // A new address replaces the old one, and clears what others
            // left on the link.
            net.add_neighbour("hth0", Ipv4Addr::new(172, 16, 0, 2));
            net.add_route(Route {
                dst: Ipv4Addr::new(10, 99, 0, 0),
                prefix_len: 24,
                oif: Some("hth0".into()),
            });
            net.configure_tap("hth0", B, 30).await.unwrap();
            assert_eq!(net.addrs("hth0"), [(B, 30)]);
            assert!(net.neighbours("hth0").is_empty());
            assert_eq!(net.routes().await.unwrap().len(), 1);

            net.reset_tap("hth0").await.unwrap();
            net.reset_tap("hth0").await.unwrap();
            assert!(net.addrs("hth0").is_empty());
            assert!(!net.is_up("hth0"));
            assert!(net.routes().await.unwrap().is_empty());

            net.delete_link("hth0").await.unwrap();
            net.delete_link("hth0").await.unwrap();
            net.reset_tap("hth0").await.unwrap();
            assert!(net.taps().is_empty());
            assert!(!net.link_exists("hth0").await.unwrap());
        });
    }

    #[test]
    fn configure_of_an_absent_tap_fails() {
        rt().block_on(async {
            let net = FakeNet::new();
            let err = net.configure_tap("hth1", A, 30).await.unwrap_err();
            assert!(matches!(err, NetError::Netlink { .. }), "{err:?}");
        });
    }

    #[test]
    fn fail_at_fails_only_that_op_and_changes_nothing() {
        rt().block_on(async {
            let net = FakeNet::new();
            net.create_tap("hth0").await.unwrap();
            net.fail_at(Some("configure_tap"));
            let err = net.configure_tap("hth0", A, 30).await.unwrap_err();
            assert!(err.to_string().contains("hth0"), "{err}");
            assert!(net.addrs("hth0").is_empty());
            assert!(!net.is_up("hth0"));
            // Other operations still work.
            net.create_tap("hth1").await.unwrap();
            net.fail_at(None);
            net.configure_tap("hth0", A, 30).await.unwrap();
            assert_eq!(
                net.calls(),
                [
                    "create_tap hth0",
                    "configure_tap hth0 172.16.0.1/30",
                    "create_tap hth1",
                    "configure_tap hth0 172.16.0.1/30",
                ]
            );

            net.fail_at(Some("set_sysctl"));
            assert!(matches!(
                net.set_sysctl("net.ipv4.ip_forward", "1"),
                Err(NetError::Sysctl { .. })
            ));
            assert_eq!(net.sysctl("net.ipv4.ip_forward"), None);
        });
    }

    #[test]
    fn refuses_what_the_real_host_refuses_before_recording() {
        rt().block_on(async {
            let net = FakeNet::new();
            for bad in ["eth0", "hth-0", "hth0123456789abc", ""] {
                let err = net.create_tap(bad).await.unwrap_err();
                assert!(matches!(err, NetError::Invalid { .. }), "{bad}: {err:?}");
            }
            net.create_tap("hth0").await.unwrap();
            for (addr, len) in [(A, 0), (A, 33), (Ipv4Addr::UNSPECIFIED, 24)] {
                let err = net.configure_tap("hth0", addr, len).await.unwrap_err();
                assert!(matches!(err, NetError::Invalid { .. }), "{err:?}");
            }
            assert!(matches!(
                net.delete_link("eth0").await,
                Err(NetError::Invalid { .. })
            ));
            assert!(matches!(
                net.set_sysctl("net/ipv4/ip_forward", "1"),
                Err(NetError::Invalid { .. })
            ));
            assert_eq!(net.calls(), ["create_tap hth0"]);
        });
    }

    #[test]
    fn a_name_taken_by_a_non_tap_is_refused() {
        rt().block_on(async {
            let net = FakeNet::new();
            net.add_link("hthup0", false);
            let err = net.create_tap("hthup0").await.unwrap_err();
            let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
            assert!(chain.contains("not a tap"), "{chain}");
            assert!(net.taps().is_empty());
            assert_eq!(net.list_links("hth").await.unwrap(), ["hthup0"]);
        });
    }

    #[test]
    fn sysctl_round_trip() {
        let net = FakeNet::new();
        assert!(net.get_sysctl("net.ipv4.ip_forward").is_err());
        net.set_sysctl("net.ipv4.ip_forward", "1").unwrap();
        assert_eq!(net.get_sysctl("net.ipv4.ip_forward").unwrap(), "1");
    }

    #[test]
    fn clones_share_the_model() {
        rt().block_on(async {
            let net = FakeNet::new();
            let other = net.clone();
            other.create_tap("hth7").await.unwrap();
            assert_eq!(net.taps(), ["hth7"]);
        });
    }
}
