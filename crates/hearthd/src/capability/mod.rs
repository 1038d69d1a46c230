//! Per-VM capabilities: optional features a VM asks for in
//! `spec.capabilities` (`nat`, `port-forward=8080:80`).
//!
//! Each capability validates itself at create (against the other VMs too:
//! two VMs cannot forward the same host port) and, at start, adds its part
//! to the VM's firewall plan ([`VmRules`]). The plan is recorded in the VM's
//! runtime before it is applied, and the whole plan is added and removed as
//! one nftables transaction — so a capability's teardown is the removal of
//! that recorded plan: idempotent and driven only by the runtime record.

use hearth_api::{PortForward, Proto, VmRules};

/// What capabilities need to know about the host at start.
#[derive(Debug, Clone)]
pub struct HostNet {
    /// The interface NAT masquerades out of, if the host has one.
    pub uplink: Option<String>,
}

/// One capability.
pub trait Capability: Send + Sync + std::fmt::Debug {
    /// The string it was parsed from, canonical.
    fn spec(&self) -> String;

    /// Checks this capability against another VM's (already valid) ones.
    fn conflicts_with(&self, other: &dyn Capability) -> Option<String>;

    /// Host ports it claims, for conflict checks.
    fn host_ports(&self) -> Vec<(Proto, u16)> {
        Vec::new()
    }

    /// Adds its rules to the VM's firewall plan.
    fn setup(&self, host: &HostNet, plan: &mut VmRules) -> Result<(), String>;
}

/// Outbound internet: masquerade out of the uplink, forward accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nat;

impl Capability for Nat {
    fn spec(&self) -> String {
        "nat".into()
    }

    fn conflicts_with(&self, _other: &dyn Capability) -> Option<String> {
        None
    }

    fn setup(&self, host: &HostNet, plan: &mut VmRules) -> Result<(), String> {
        let uplink = host
            .uplink
            .clone()
            .ok_or("nat needs an uplink: the host has no default route and `uplink` is not set")?;
        plan.nat_uplink = Some(uplink);
        Ok(())
    }
}

/// DNAT of one host port to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardCap(pub PortForward);

impl Capability for PortForwardCap {
    fn spec(&self) -> String {
        let f = self.0;
        format!(
            "port-forward={}/{}:{}",
            f.host_port,
            f.proto.as_str(),
            f.guest_port
        )
    }

    fn host_ports(&self) -> Vec<(Proto, u16)> {
        vec![(self.0.proto, self.0.host_port)]
    }

    fn conflicts_with(&self, other: &dyn Capability) -> Option<String> {
        let mine = (self.0.proto, self.0.host_port);
        other.host_ports().contains(&mine).then(|| {
            format!(
                "host port {}/{} is already forwarded",
                self.0.host_port,
                self.0.proto.as_str()
            )
        })
    }

    fn setup(&self, _host: &HostNet, plan: &mut VmRules) -> Result<(), String> {
        plan.port_forwards.push(self.0);
        Ok(())
    }
}

fn port(s: &str, what: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{what} {s:?} is not a port (1-65535)")),
    }
}

/// The registry: parses one `spec.capabilities` entry.
pub fn parse(s: &str) -> Result<Box<dyn Capability>, String> {
    match s.split_once('=') {
        None if s == "nat" => Ok(Box::new(Nat)),
        Some(("port-forward", arg)) => {
            let (host, guest) = arg.split_once(':').ok_or_else(|| {
                format!("port-forward needs HOST_PORT[/tcp|udp]:GUEST_PORT, got {arg:?}")
            })?;
            let (host, proto) = match host.split_once('/') {
                None => (host, Proto::Tcp),
                Some((h, "tcp")) => (h, Proto::Tcp),
                Some((h, "udp")) => (h, Proto::Udp),
                Some((_, p)) => return Err(format!("unknown protocol {p:?} (tcp or udp)")),
            };
            Ok(Box::new(PortForwardCap(PortForward {
                host_port: port(host, "host port")?,
                proto,
                guest_port: port(guest, "guest port")?,
            })))
        }
        _ => Err(format!(
            "unknown capability {s:?} (known: nat, port-forward=HOST[/tcp|udp]:GUEST)"
        )),
    }
}

/// Parses every entry of one VM and checks them against each other.
pub fn parse_all(specs: &[String]) -> Result<Vec<Box<dyn Capability>>, String> {
    let caps = specs
        .iter()
        .map(|s| parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, a) in caps.iter().enumerate() {
        for b in &caps[..i] {
            if a.spec() == b.spec() && a.host_ports().is_empty() {
                return Err(format!("{} is given twice", a.spec()));
            }
            if let Some(why) = a.conflicts_with(b.as_ref()) {
                return Err(why);
            }
        }
    }
    Ok(caps)
}

/// Checks a new VM's capabilities against every other VM's.
pub fn check_conflicts(
    mine: &[Box<dyn Capability>],
    others: &[Vec<Box<dyn Capability>>],
) -> Result<(), String> {
    for a in mine {
        for b in others.iter().flatten() {
            if let Some(why) = a.conflicts_with(b.as_ref()) {
                return Err(why);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> VmRules {
        VmRules {
            short_id: "abc".into(),
            vm_id: "id".into(),
            tap: "hth0".into(),
            guest_ip: "10.231.0.2".parse().unwrap(),
            nat_uplink: None,
            port_forwards: vec![],
        }
    }

    #[test]
    fn parses_and_canonicalises() {
        assert_eq!(parse("nat").unwrap().spec(), "nat");
        assert_eq!(
            parse("port-forward=8080:80").unwrap().spec(),
            "port-forward=8080/tcp:80"
        );
        assert_eq!(
            parse("port-forward=53/udp:53").unwrap().spec(),
            "port-forward=53/udp:53"
        );
        for bad in [
            "nats",
            "port-forward=8080",
            "port-forward=0:80",
            "port-forward=8080/sctp:80",
            "port-forward=x:1",
            "port-forward=1:70000",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn conflicts_within_and_across_vms() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(parse_all(&s(&["nat", "nat"])).is_err());
        assert!(parse_all(&s(&["port-forward=80:80", "port-forward=80:81"])).is_err());
        assert!(parse_all(&s(&["port-forward=80:80", "port-forward=80/udp:80"])).is_ok());
        let mine = parse_all(&s(&["port-forward=8080:80"])).unwrap();
        let other = parse_all(&s(&["nat", "port-forward=8080:22"])).unwrap();
        let err = check_conflicts(&mine, &[other]).unwrap_err();
        assert!(err.contains("8080/tcp"), "{err}");
        let other = parse_all(&s(&["port-forward=8081:80"])).unwrap();
        assert!(check_conflicts(&mine, &[other]).is_ok());
    }

    #[test]
    fn setup_fills_the_plan() {
        let host = HostNet {
            uplink: Some("eth0".into()),
        };
        let mut p = plan();
        for c in parse_all(&["nat".into(), "port-forward=8080:80".into()]).unwrap() {
            c.setup(&host, &mut p).unwrap();
        }
        assert_eq!(p.nat_uplink.as_deref(), Some("eth0"));
        assert_eq!(p.port_forwards.len(), 1);
        let mut p = plan();
        assert!(Nat.setup(&HostNet { uplink: None }, &mut p).is_err());
    }
}
