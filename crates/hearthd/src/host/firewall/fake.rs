//! A hand-written fake of [`Firewall`]: an in-memory model of hearth's
//! nftables table that records every call and can be told to fail at a
//! named operation.
//!
//! It models what lifecycle and reconcile rely on in the real one
//! ([`Nft`](super::nft::Nft)): the same validation (shared), apply is all
//! or nothing and replaces an earlier apply of the same VM, a map key
//! (tap, NATed guest address, forwarded host port) held by another VM is
//! refused as the kernel refuses it, a VM with no rules installs nothing,
//! and removal of what is gone succeeds.
//!
//! A failure injected with [`FakeFirewall::fail_at`] happens after the call
//! is recorded and before the model changes, as a refused transaction.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::nft::{validate, validate_vm_id};
use super::{Firewall, FirewallError, VmRules};

#[derive(Debug, Default)]
struct Model {
    /// short id → the rules installed for it.
    installed: BTreeMap<String, VmRules>,
    calls: Vec<String>,
    fail_at: Option<String>,
}

impl Model {
    /// Records the call; fails it if told to.
    fn call(&mut self, op: &'static str, detail: &str) -> Result<(), FirewallError> {
        self.calls.push(if detail.is_empty() {
            op.to_owned()
        } else {
            format!("{op} {detail}")
        });
        if self.fail_at.as_deref() == Some(op) {
            return Err(refused(
                op,
                "injected".into(),
                format!("injected failure at {op}"),
            ));
        }
        Ok(())
    }

    /// The first map key of `rules` another installed VM holds.
    fn clash(&self, rules: &VmRules) -> Option<String> {
        let keys = keys(rules);
        self.installed
            .values()
            .filter(|other| other.short_id != rules.short_id)
            .flat_map(keys_of)
            .find(|k| keys.contains(k))
    }
}

/// The keys of a VM's rules that the kernel refuses to share: its
/// forwarded host ports (the one set with data, `dnat_ports`; the real
/// table's other elements carry no data, so an equal key is no clash).
fn keys(rules: &VmRules) -> Vec<String> {
    keys_of(rules).collect()
}

fn keys_of(rules: &VmRules) -> impl Iterator<Item = String> + '_ {
    rules
        .port_forwards
        .iter()
        .map(|pf| format!("dnat_ports[{} . {}]", pf.proto.as_str(), pf.host_port))
}

/// An error shaped like the one a refused nftables transaction gives.
fn refused(op: &'static str, what: String, detail: String) -> FirewallError {
    FirewallError::Refused {
        op,
        what,
        detail: Some(detail),
        source: std::io::Error::from_raw_os_error(libc::EEXIST),
    }
}

/// A fake firewall. Clones share one model.
#[derive(Debug, Clone, Default)]
pub struct FakeFirewall {
    inner: Arc<Mutex<Model>>,
}

impl FakeFirewall {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn m(&self) -> MutexGuard<'_, Model> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, as `op short_id` (`apply 0a1b2c3d4e5f`,
    /// `remove 0a1b2c3d4e5f`, `remove_orphan <vm id>`, `list_vms`).
    pub fn calls(&self) -> Vec<String> {
        self.m().calls.clone()
    }

    /// Makes every call of operation `op` (`"apply"`, `"remove"`,
    /// `"remove_orphan"`, `"list_vms"`) fail from now on, or none
    /// with `None`.
    pub fn fail_at(&self, op: Option<&str>) {
        self.m().fail_at = op.map(str::to_owned);
    }

    /// Short ids of the VMs with rules installed, sorted.
    pub fn installed(&self) -> Vec<String> {
        self.m().installed.keys().cloned().collect()
    }

    /// The rules installed for VM `short_id`.
    pub fn rules(&self, short_id: &str) -> Option<VmRules> {
        self.m().installed.get(short_id).cloned()
    }

    /// Installs `rules` behind hearth's back (a leftover from a crash, or a
    /// sweep's test subject); no call is recorded.
    pub fn insert(&self, rules: VmRules) {
        self.m().installed.insert(rules.short_id.clone(), rules);
    }
}

#[async_trait]
impl Firewall for FakeFirewall {
    async fn apply(&self, rules: &VmRules) -> Result<Vec<String>, FirewallError> {
        let mut m = self.m();
        m.call("apply", &rules.short_id)?;
        validate(rules)?;
        if rules.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(key) = m.clash(rules) {
            return Err(refused(
                "apply",
                format!("add element {key}"),
                "the host port is forwarded to another VM".into(),
            ));
        }
        let s = &rules.short_id;
        // What the real one describes, in brief: one line per element.
        let mut installed = Vec::new();
        if let Some(up) = &rules.nat_uplink {
            installed.push(format!("element nat_out[{} . \"{up}\"]", rules.guest_ip));
            installed.push(format!("element fwd_out[\"{}\" . \"{up}\"]", rules.tap));
            installed.push(format!("element fwd_in[\"{up}\" . \"{}\"]", rules.tap));
        }
        installed.extend(keys_of(rules).map(|k| format!("element {k}")));
        m.installed.insert(s.clone(), rules.clone());
        Ok(installed)
    }

    async fn remove(&self, rules: &VmRules) -> Result<(), FirewallError> {
        let mut m = self.m();
        m.call("remove", &rules.short_id)?;
        validate(rules)?;
        m.installed.remove(&rules.short_id);
        Ok(())
    }

    async fn list_vms(&self) -> Result<Vec<String>, FirewallError> {
        let mut m = self.m();
        m.call("list_vms", "")?;
        let ids: std::collections::BTreeSet<String> =
            m.installed.values().map(|r| r.vm_id.clone()).collect();
        Ok(ids.into_iter().collect())
    }

    async fn remove_orphan(&self, vm_id: &str) -> Result<(), FirewallError> {
        let mut m = self.m();
        m.call("remove_orphan", vm_id)?;
        validate_vm_id(vm_id)?;
        m.installed.retain(|_, r| r.vm_id != vm_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::Ipv4Addr;

    use super::*;
    use crate::host::firewall::{PortForward, Proto};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    fn vm(s: &str, tap: &str, last: u8, ports: &[u16]) -> VmRules {
        VmRules {
            short_id: s.into(),
            vm_id: format!("id-{s}"),
            tap: tap.into(),
            guest_ip: Ipv4Addr::new(172, 16, 0, last),
            nat_uplink: Some("eth0".into()),
            port_forwards: ports
                .iter()
                .map(|&p| PortForward {
                    host_port: p,
                    proto: Proto::Tcp,
                    guest_port: 80,
                })
                .collect(),
        }
    }

    #[test]
    fn apply_remove_list_and_idempotence() {
        rt().block_on(async {
            let fw = FakeFirewall::new();
            let a = vm("aaa", "hth0", 2, &[8080]);
            let b = vm("bbb", "hth1", 6, &[]);
            let installed = fw.apply(&a).await.unwrap();
            assert_eq!(
                installed,
                [
                    r#"element nat_out[172.16.0.2 . "eth0"]"#,
                    r#"element fwd_out["hth0" . "eth0"]"#,
                    r#"element fwd_in["eth0" . "hth0"]"#,
                    "element dnat_ports[tcp . 8080]",
                ]
            );
            fw.apply(&a).await.unwrap();
            fw.apply(&b).await.unwrap();
            assert_eq!(fw.installed(), ["aaa", "bbb"]);
            assert_eq!(fw.list_vms().await.unwrap(), ["id-aaa", "id-bbb"]);
            assert_eq!(fw.rules("aaa"), Some(a.clone()));

            fw.remove(&a).await.unwrap();
            fw.remove(&a).await.unwrap();
            fw.remove(&vm("never", "hth9", 9, &[])).await.unwrap();
            assert_eq!(fw.installed(), ["bbb"]);

            let mut empty = vm("ccc", "hth2", 10, &[]);
            empty.nat_uplink = None;
            assert!(fw.apply(&empty).await.unwrap().is_empty());
            assert_eq!(fw.installed(), ["bbb"]);
            assert_eq!(
                fw.calls(),
                [
                    "apply aaa",
                    "apply aaa",
                    "apply bbb",
                    "list_vms",
                    "remove aaa",
                    "remove aaa",
                    "remove never",
                    "apply ccc",
                ]
            );
        });
    }

    #[test]
    fn a_key_held_by_another_vm_refuses_the_whole_apply() {
        rt().block_on(async {
            let fw = FakeFirewall::new();
            fw.apply(&vm("aaa", "hth0", 2, &[8080])).await.unwrap();
            let err = fw
                .apply(&vm("bbb", "hth1", 6, &[9090, 8080]))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("File exists"), "{err}");
            assert_eq!(fw.installed(), ["aaa"]);
        });
    }

    #[test]
    fn fail_at_fails_only_that_op_and_changes_nothing() {
        rt().block_on(async {
            let fw = FakeFirewall::new();
            let a = vm("aaa", "hth0", 2, &[]);
            fw.fail_at(Some("apply"));
            let err = fw.apply(&a).await.unwrap_err();
            assert!(err.to_string().contains("injected"), "{err}");
            assert!(fw.installed().is_empty());
            fw.remove(&a).await.unwrap();

            fw.fail_at(None);
            fw.apply(&a).await.unwrap();
            fw.fail_at(Some("remove"));
            fw.remove(&a).await.unwrap_err();
            assert_eq!(fw.installed(), ["aaa"]);
            fw.fail_at(Some("list_vms"));
            fw.list_vms().await.unwrap_err();
            fw.fail_at(Some("remove_orphan"));
            fw.remove_orphan("id-aaa").await.unwrap_err();
            assert_eq!(fw.installed(), ["aaa"]);
            fw.fail_at(None);
            fw.remove(&a).await.unwrap();
            assert!(fw.installed().is_empty());
        });
    }

    #[test]
    fn an_orphan_is_removed_by_its_vm_id_alone() {
        rt().block_on(async {
            let fw = FakeFirewall::new();
            fw.insert(vm("aaa", "hth0", 2, &[8080]));
            fw.insert(vm("bbb", "hth1", 6, &[]));
            fw.remove_orphan("id-aaa").await.unwrap();
            fw.remove_orphan("id-aaa").await.unwrap();
            assert_eq!(fw.installed(), ["bbb"]);
            let err = fw.remove_orphan("a\"b").await.unwrap_err();
            assert!(matches!(err, FirewallError::Invalid { .. }), "{err:?}");
            assert_eq!(
                fw.calls(),
                [
                    "remove_orphan id-aaa",
                    "remove_orphan id-aaa",
                    "remove_orphan a\"b"
                ]
            );
        });
    }

    #[test]
    fn refuses_what_the_real_one_refuses() {
        rt().block_on(async {
            let fw = FakeFirewall::new();
            for bad in [
                vm("a b", "hth0", 2, &[]),
                vm("aaa", "hth*", 2, &[]),
                vm("aaa", "averyverylongname", 2, &[]),
                vm("aaa", "hth0", 2, &[8080, 8080]),
                vm("aaa", "hth0", 2, &[0]),
            ] {
                let err = fw.apply(&bad).await.unwrap_err();
                assert!(matches!(err, FirewallError::Invalid { .. }), "{err:?}");
            }
            assert!(fw.installed().is_empty());
        });
    }
}
