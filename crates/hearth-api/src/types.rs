//! Request and response bodies of the daemon's API.

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
}

impl Runtime {
    /// True when the record names nothing left to tear down.
    pub fn is_empty(&self) -> bool {
        self.api_socket.is_none()
            && self.pid.is_none()
            && self.metrics_path.is_none()
            && self.vm_dir.is_none()
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
    /// State before, if this is a transition.
    #[serde(default)]
    pub from: Option<VmState>,
    /// State after.
    pub to: VmState,
    /// Generation after.
    pub generation: u64,
    /// Why (operation, exit status, error).
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
    fn spec_defaults_kernel_args() {
        let s: VmSpec =
            serde_json::from_str(r#"{"vcpus":1,"memory_mib":128,"kernel":"/k","rootfs":"/r"}"#)
                .unwrap();
        assert_eq!(s.kernel_args, DEFAULT_KERNEL_ARGS);
        assert!(s.capabilities.is_empty());
    }
}
