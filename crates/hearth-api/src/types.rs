//! Request and response bodies of the daemon's API.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::VmState;

/// Kernel command line used when a create request gives none: a serial
/// console on ttyS0, reboot instead of panic-loop, no PCI probing.
pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// What a VM is: fixed at create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Number of vCPUs: 1, or an even number up to 32 (Firecracker's rule).
    pub vcpus: u8,
    /// Guest memory in MiB, at least 128.
    pub memory_mib: u32,
    /// Uncompressed guest kernel (vmlinux / ELF).
    pub kernel: PathBuf,
    /// Root filesystem image.
    pub rootfs: PathBuf,
    /// Optional initrd.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_kernel_args")]
    pub kernel_args: String,
    /// Per-VM features (`nat`, `port-forward=…`); none exist yet.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

fn default_kernel_args() -> String {
    DEFAULT_KERNEL_ARGS.to_owned()
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// Unique name, `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    /// What to run.
    pub spec: VmSpec,
    /// A lease: the VM may run until this many seconds after the create,
    /// then it is stopped (see `POST /v1/vms/{vm}/ttl`). None: no limit.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// `POST /v1/vms/{vm}/ttl`: sets a VM's lease to end `ttl_secs` from now,
/// or clears it (`null` or absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtlRequest {
    /// Seconds from now; `None` clears the deadline.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// `POST /v1/vms/{vm}/stop`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds to wait after Ctrl-Alt-Del before SIGKILL; the daemon's
    /// configured default when absent.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// Transport protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` / `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// `host_port/proto → guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortForward {
    /// Port on the host.
    pub host_port: u16,
    /// Protocol.
    pub proto: Proto,
    /// Port in the guest.
    pub guest_port: u16,
}

/// Everything one VM needs from the firewall. Stored in the VM's runtime
/// record *before* it is applied; removal is driven by this record alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRules {
    /// The VM's short id (validated; the firewall marks by `vm_id`).
    pub short_id: String,
    /// The VM's full id, for `hearth:vm:<id>` comments.
    pub vm_id: String,
    /// The VM's tap.
    pub tap: String,
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    /// Masquerade out of this uplink (the `nat` capability).
    #[serde(default)]
    pub nat_uplink: Option<String>,
    /// DNAT from the host to the guest (the `port-forward` capability).
    #[serde(default)]
    pub port_forwards: Vec<PortForward>,
}

impl VmRules {
    /// True when the VM needs no rule at all.
    pub fn is_empty(&self) -> bool {
        self.nat_uplink.is_none() && self.port_forwards.is_empty()
    }
}

/// What the daemon holds for a running (or half-torn-down) VM: the journal
/// of a start. Every field is written *before* the object it names is
/// created and cleared only after the object is gone, so teardown can be
/// driven from this record alone. Every field is optional and defaulted so
/// that rows written by an older daemon still parse.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    /// The VM's directory under the state dir.
    #[serde(default)]
    pub vm_dir: Option<PathBuf>,
    /// Firecracker's API socket; also the key that finds the VMM process
    /// again (it is on the VMM's command line).
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// The VMM's pid, recorded right after spawn.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Field 22 of `/proc/<pid>/stat` at spawn: tells our VMM from a
    /// process that reused its pid.
    #[serde(default)]
    pub pid_start_time: Option<u64>,
    /// Serial console output of the VMM.
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// Firecracker's own log (`PUT /logger`).
    #[serde(default)]
    pub vmm_log: Option<PathBuf>,
    /// Firecracker's metrics file (`PUT /metrics`).
    #[serde(default)]
    pub metrics_path: Option<PathBuf>,
    /// Unix time (ms) the VM answered InstanceStart.
    #[serde(default)]
    pub started_at_ms: Option<i64>,
    /// The VM's tap (`hth<N>`), reserved in the pool in the same
    /// transaction that writes it here.
    #[serde(default)]
    pub tap: Option<String>,
    /// The tap's address (the guest's gateway).
    #[serde(default)]
    pub host_ip: Option<Ipv4Addr>,
    /// The guest's address.
    #[serde(default)]
    pub guest_ip: Option<Ipv4Addr>,
    /// Prefix length of the tap's subnet.
    #[serde(default)]
    pub prefix_len: Option<u8>,
    /// The guest's MAC, derived from the VM id.
    #[serde(default)]
    pub mac: Option<String>,
    /// The firewall rules, recorded before they are applied.
    #[serde(default)]
    pub firewall: Option<VmRules>,
    /// What the firewall reported installing (one line per nft element).
    #[serde(default)]
    pub firewall_handles: Vec<String>,
    /// The writable root disk.
    #[serde(default)]
    pub disk: Option<DiskRecord>,
}

/// A VM's writable root disk, each part recorded before it is made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// `copy` or `dm-snapshot`.
    pub strategy: String,
    /// The image the VM was created from (never modified).
    pub image: PathBuf,
    /// What Firecracker gets as the root drive, once it exists.
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// `copy`: the VM's own copy, in the VM dir (kept until delete).
    #[serde(default)]
    pub copy_file: Option<PathBuf>,
    /// `dm-snapshot`: the per-VM link to the image the origin loop is
    /// attached through (so the loop's backing file names this VM).
    #[serde(default)]
    pub origin_link: Option<PathBuf>,
    /// `dm-snapshot`: the sparse copy-on-write file (kept until delete).
    #[serde(default)]
    pub cow_file: Option<PathBuf>,
    /// `dm-snapshot`: the read-only loop over `origin_link`.
    #[serde(default)]
    pub origin_loop: Option<PathBuf>,
    /// `dm-snapshot`: the loop over `cow_file`.
    #[serde(default)]
    pub cow_loop: Option<PathBuf>,
    /// `dm-snapshot`: the device-mapper name, `hearth-<shortid>`.
    #[serde(default)]
    pub dm_name: Option<String>,
    /// `dm-snapshot`: the backing file of a loop being attached right now
    /// (its device number is not known until the kernel picks it).
    #[serde(default)]
    pub attaching: Option<PathBuf>,
}

impl Runtime {
    /// True when the record names nothing left to tear down.
    pub fn is_empty(&self) -> bool {
        self == &Runtime::default()
    }
}

/// A VM as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// UUIDv7: sorts by creation time.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// What it runs.
    pub spec: VmSpec,
    /// Where it is.
    pub state: VmState,
    /// Bumped on every state change.
    pub generation: u64,
    /// What it holds (see [`Runtime`]).
    pub runtime: Runtime,
    /// Unix time (ms) of create.
    pub created_at_ms: i64,
    /// Unix time (ms) of the last change.
    pub updated_at_ms: i64,
    /// Why the last operation failed, if it did.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Unix time (ms) the VM's TTL ends: if it is running then, it is
    /// stopped, and the deadline is cleared either way.
    #[serde(default)]
    pub ttl_deadline_ms: Option<i64>,
}

/// A VM's resource usage, as the stats poller last sampled it
/// (`GET /v1/vms/{vm}/stats`, `GET /v1/stats`). The usage fields are
/// `None` when the VM is not running or has not been sampled yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    /// The VM.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its state now.
    pub state: VmState,
    /// The VMM's pid, while running.
    #[serde(default)]
    pub pid: Option<u32>,
    /// CPU time (user + system) the VMM has used, in ms.
    #[serde(default)]
    pub cpu_ms: Option<u64>,
    /// The VMM's resident memory (guest memory it touched included).
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// Time since the VM answered InstanceStart, in ms.
    #[serde(default)]
    pub uptime_ms: Option<u64>,
    /// Unix time (ms) of the sample.
    #[serde(default)]
    pub sampled_at_ms: Option<i64>,
    /// Unix time (ms) the VM's TTL ends, if it has one.
    #[serde(default)]
    pub ttl_deadline_ms: Option<i64>,
    /// The last complete flush of Firecracker's metrics file, as written
    /// (Firecracker's counters are deltas since the previous flush).
    #[serde(default)]
    pub vmm_metrics: Option<serde_json::Value>,
}

/// What an [`Event`] records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A state change (`from` → `to`).
    #[default]
    Transition,
    /// A teardown removed objects or failed; `reason` says which. `to` is
    /// the VM's state at the time.
    Teardown,
    /// The orphan sweep removed something of this VM.
    Sweep,
    /// A kind this build does not know (sent by a newer daemon).
    #[serde(other)]
    Other,
}

impl EventKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Transition => "transition",
            EventKind::Teardown => "teardown",
            EventKind::Sweep => "sweep",
            EventKind::Other => "other",
        }
    }

    /// The kind with wire name `s`; [`EventKind::Other`] when unknown.
    pub fn parse(s: &str) -> EventKind {
        match s {
            "transition" => EventKind::Transition,
            "teardown" => EventKind::Teardown,
            "sweep" => EventKind::Sweep,
            _ => EventKind::Other,
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An entry of the append-only event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Monotonic cursor.
    pub seq: i64,
    /// The VM it is about.
    pub vm_id: Uuid,
    /// Unix time (ms).
    pub at_ms: i64,
    /// What happened; a state change unless said otherwise.
    #[serde(default)]
    pub kind: EventKind,
    /// State before, if this is a transition.
    #[serde(default)]
    pub from: Option<VmState>,
    /// State after (for other kinds: the state at the time).
    pub to: VmState,
    /// Generation after.
    pub generation: u64,
    /// Why (operation, exit status, error; for a teardown, what it removed).
    pub reason: String,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable: `bad_request`, `not_found`, `conflict`, `internal`.
    pub code: String,
    /// The outermost error's message.
    pub message: String,
    /// Every cause, outermost first (excluding `message`).
    #[serde(default)]
    pub chain: Vec<String>,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always `"ok"` when the daemon answers.
    pub status: String,
    /// VMs by state.
    pub vms: std::collections::BTreeMap<String, u64>,
}

/// `GET /v1/version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// hearthd's version.
    pub version: String,
    /// The VMM binary the daemon is configured with.
    pub vmm_binary: String,
}

/// A kernel object or file that carries hearth's mark but that no VM
/// record claims (`GET /v1/leaks`, `POST /v1/gc`, `hearth doctor --leaks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    /// `process`, `firewall`, `dm`, `loop`, `tap`, `vm-dir`.
    pub kind: String,
    /// What it is (`pid 123 (--api-sock …)`, `vm-ab12cd…`, `hth7`, …).
    pub object: String,
    /// Why it is considered orphaned.
    pub reason: String,
    /// After a removal: `None` if it is gone, else why not.
    #[serde(default)]
    pub error: Option<String>,
}

/// The VM's short id: the last 12 hex digits of its UUID (UUIDv7's random
/// bits), deterministic and short enough for every kernel name limit. It
/// names the VM's dm device (`hearth-<shortid>`).
pub fn short_id(id: &Uuid) -> String {
    let hex = id.simple().to_string();
    hex[hex.len() - 12..].to_owned()
}

/// Checks a VM name against `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok_first = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || b.len() > 63 {
        return Err(format!(
            "VM name must be 1 to 63 characters, got {}",
            b.len()
        ));
    }
    if !ok_first(b[0]) || !b.iter().all(|&c| ok_first(c) || c == b'-') {
        return Err(format!(
            "invalid VM name {name:?}: use lowercase letters, digits and '-', starting with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_are_the_random_tail() {
        let id = Uuid::parse_str("01a21d5a-9c84-7692-803b-094afdc392c5").unwrap();
        assert_eq!(short_id(&id), "094afdc392c5");
    }

    #[test]
    fn names() {
        for ok in ["a", "web-1", "0", &"a".repeat(63)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", "é", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn old_runtime_rows_parse() {
        let rt: Runtime = serde_json::from_str(r#"{"pid": 7}"#).unwrap();
        assert_eq!(rt.pid, Some(7));
        assert_eq!(rt.api_socket, None);
        let rt: Runtime = serde_json::from_str("{}").unwrap();
        assert!(rt.is_empty());
    }

    #[test]
    fn event_kinds_default_and_tolerate_unknown_ones() {
        let old = r#"{"seq":1,"vm_id":"01a21d5a-9c84-7692-803b-094afdc392c5","at_ms":0,"to":"created","generation":1,"reason":"create"}"#;
        let e: Event = serde_json::from_str(old).unwrap();
        assert_eq!(e.kind, EventKind::Transition);
        let newer = old.replace(r#""seq":1"#, r#""seq":1,"kind":"defrag""#);
        let e: Event = serde_json::from_str(&newer).unwrap();
        assert_eq!(e.kind, EventKind::Other);
        for k in [EventKind::Transition, EventKind::Teardown, EventKind::Sweep] {
            assert_eq!(EventKind::parse(k.as_str()), k);
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
    }

    #[test]
    fn spec_defaults_kernel_args() {
        let s: VmSpec =
            serde_json::from_str(r#"{"vcpus":1,"memory_mib":128,"kernel":"/k","rootfs":"/r"}"#)
                .unwrap();
        assert_eq!(s.kernel_args, DEFAULT_KERNEL_ARGS);
        assert!(s.capabilities.is_empty());
    }
}
