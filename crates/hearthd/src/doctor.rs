//! `hearth doctor`: what this host has, and lacks, for running microVMs.
//!
//! hearth leans on kernel features that differ from host to host (KVM — and
//! whether it is real hardware virtualisation or a PVM nested hypervisor —
//! tun, nftables, device-mapper, loop) and on a VMM binary that no package
//! registry ships. When one of them is missing, a VM start fails deep inside
//! one step with one errno; doctor names the missing piece up front, with
//! one line of advice. It is a report, not a gate: nothing here changes the
//! host, and nothing here needs the daemon to run, which is why it lives in
//! the daemon's library (it reads the daemon's [`Config`]) and the CLI calls
//! it in-process.
//!
//! Each check is split into a probe that reads the host and a pure
//! judgement that turns those facts into a [`Check`], so the judgements are
//! unit-tested with made-up facts and only the thin probes touch the host.
//! The external commands it runs (`<vmm> --version`, `firecracker
//! --version`, `nft --version`) are read-only queries
//! with a timeout; they do not go through the host layer's command runner
//! because doctor must work even where that layer refuses to start.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Config, resolve_on_path};

/// The only KVM API version there has ever been (`KVM_GET_API_VERSION`).
const KVM_API_VERSION: i32 = 12;
/// How long a `--version` query may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Below this much free space in the state directory's filesystem, warn:
/// each VM's root disk is copied there.
const LOW_SPACE_BYTES: u64 = 1 << 30;

const KVM_DEV: &str = "/dev/kvm";
const TUN_DEV: &str = "/dev/net/tun";
const DM_CONTROL: &str = "/dev/mapper/control";
const LOOP_CONTROL: &str = "/dev/loop-control";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

const PVM_ADVICE: &str = "KVM is a PVM nested hypervisor: only PVM-enabled guest kernels boot; \
                          stock guests will not (tests use hearth-testvmm)";
const VMM_ADVICE: &str =
    "install Firecracker (v1.16) and set vmm_binary, or use hearth-testvmm for tests";
const DM_ADVICE: &str = "no device-mapper in this kernel: root disks will be copied (reflink or sparse), not dm-snapshot";

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Present and usable.
    Ok,
    /// Usable with a limitation, or optional and absent.
    Warn,
    /// Absent or unusable.
    Missing,
}

impl Status {
    /// The lowercase label used in the human report and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Missing => "missing",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Short stable name (`kvm`, `vmm`, …).
    pub name: String,
    /// How it came out.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// One line on what to do; set whenever the status is not `ok`.
    pub advice: Option<String>,
}

impl Check {
    fn ok(name: &str, detail: impl Into<String>) -> Check {
        Check {
            name: name.to_owned(),
            status: Status::Ok,
            detail: detail.into(),
            advice: None,
        }
    }

    fn warn(name: &str, detail: impl Into<String>, advice: impl Into<String>) -> Check {
        Check {
            name: name.to_owned(),
            status: Status::Warn,
            detail: detail.into(),
            advice: Some(advice.into()),
        }
    }

    fn missing(name: &str, detail: impl Into<String>, advice: impl Into<String>) -> Check {
        Check {
            name: name.to_owned(),
            status: Status::Missing,
            detail: detail.into(),
            advice: Some(advice.into()),
        }
    }
}

/// Everything doctor found, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// One entry per check.
    pub checks: Vec<Check>,
}

impl Report {
    /// The check with this name.
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// How many checks came out with `status`.
    pub fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }
}

/// Inspects the host for `config`. Reads only; creates and changes nothing.
pub fn run(config: &Config) -> Report {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let proc_modules = std::fs::read_to_string("/proc/modules").ok();
    let kvm = KvmFacts {
        api_version: probe_kvm(),
        pvm: detect_pvm(
            Path::new("/sys/module/kvm_pvm").exists(),
            proc_modules.as_deref(),
            &cpuinfo,
        ),
        cpu_virt: cpu_virt_flag(&cpuinfo),
    };

    let vmm_path = config.resolve_vmm_binary();
    let vmm_version = vmm_path.as_deref().map(first_line_of_version);
    let fc_path = resolve_on_path(Path::new("firecracker"));
    // Ask the same binary only once.
    let fc_version = match (&fc_path, &vmm_path, &vmm_version) {
        (Some(fc), Some(vmm), Some(v)) if fc == vmm => Some(v.clone()),
        (Some(fc), _, _) => Some(first_line_of_version(fc)),
        (None, _, _) => None,
    };

    let root = rustix::process::geteuid().is_root();
    let nft = probe_nft(root);

    let dm = probe_dm();
    let routes =
        parse_proc_net_route(&std::fs::read_to_string("/proc/net/route").unwrap_or_default());
    let checks = vec![
        root_check(root, rustix::process::geteuid().as_raw()),
        kvm_check(&kvm),
        vmm_check(
            &config.vmm_binary,
            vmm_path.as_deref(),
            vmm_version.as_ref(),
        ),
        firecracker_check(fc_path.as_deref(), fc_version.as_ref()),
        device_check(
            "tun",
            TUN_DEV,
            &probe_open(TUN_DEV).map(|_| ()),
            "load the tun module (modprobe tun): each VM's network is a tap device",
        ),
        nft_check(&nft),
        dm_check(&dm, Path::new("/sys/module/dm_mod").exists()),
        device_check(
            "loop",
            LOOP_CONTROL,
            &probe_open(LOOP_CONTROL).map(|_| ()),
            "load the loop module (modprobe loop): root disks are attached as loop devices",
        ),
        ip_forward_check(std::fs::read_to_string(IP_FORWARD).map_err(|e| e.to_string())),
        uplink_check(config, &routes),
        disk_strategy_check(config.disk_strategy, matches!(dm, Probe::Ok(_))),
        state_dir_check(&probe_state_dir(&config.state_dir)),
        cgroup_check(
            Path::new("/sys/fs/cgroup/cgroup.controllers").exists(),
            Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists(),
        ),
    ];
    Report { checks }
}

/// Renders the report as aligned lines, an indented advice line under each
/// check that is not ok, and a one-line summary.
pub fn print_human(report: &Report) -> String {
    let status_w = [Status::Ok, Status::Warn, Status::Missing]
        .iter()
        .map(|s| s.as_str().len())
        .max()
        .unwrap_or(0)
        + 2;
    let name_w = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0)
        .max(12)
        + 2;
    let mut out = String::new();
    for c in &report.checks {
        let line = format!(
            "{:<status_w$}{:<name_w$}{}",
            c.status.as_str(),
            c.name,
            c.detail
        );
        out.push_str(line.trim_end());
        out.push('\n');
        if c.status != Status::Ok
            && let Some(advice) = &c.advice
        {
            out.push_str(&format!(
                "{:indent$}advice: {advice}\n",
                "",
                indent = status_w + name_w
            ));
        }
    }
    out.push_str(&format!(
        "{} ok, {} warn, {} missing\n",
        report.count(Status::Ok),
        report.count(Status::Warn),
        report.count(Status::Missing)
    ));
    out
}

// ---------------------------------------------------------------------------
// Probes: the only code here that reads the host.

/// What opening a device node gave.
#[derive(Debug)]
enum Probe<T> {
    /// The node does not exist.
    Absent,
    /// It exists but could not be used; the reason.
    Failed(String),
    /// It works.
    Ok(T),
}

impl<T> Probe<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Probe<U> {
        match self {
            Probe::Absent => Probe::Absent,
            Probe::Failed(e) => Probe::Failed(e),
            Probe::Ok(t) => Probe::Ok(f(t)),
        }
    }
}

/// Opens a device node read-write, as hearthd would.
fn probe_open(path: &str) -> Probe<File> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => Probe::Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Probe::Absent,
        Err(e) => Probe::Failed(format!("cannot open read-write: {e}")),
    }
}

/// Opens `/dev/kvm` and asks for the API version.
fn probe_kvm() -> Probe<i32> {
    const KVM_GET_API_VERSION: rustix::ioctl::Opcode = rustix::ioctl::opcode::none(0xAE, 0x00);
    let file = match probe_open(KVM_DEV) {
        Probe::Ok(f) => f,
        Probe::Absent => return Probe::Absent,
        Probe::Failed(e) => return Probe::Failed(e),
    };
    // SAFETY: `file` is an open descriptor for the life of the call, and
    // KVM_GET_API_VERSION takes no argument and touches no user memory.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version < 0 {
        return Probe::Failed(format!(
            "KVM_GET_API_VERSION failed: {}",
            io::Error::last_os_error()
        ));
    }
    Probe::Ok(version)
}

/// `struct dm_ioctl` from `<linux/dm-ioctl.h>`: the header of every
/// device-mapper control request.
#[repr(C)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; 128],
    uuid: [u8; 129],
    data: [u8; 7],
}

const _: () = assert!(size_of::<DmIoctl>() == 312);

/// Opens `/dev/mapper/control` and asks for the driver's ioctl version.
fn probe_dm() -> Probe<String> {
    const DM_VERSION: rustix::ioctl::Opcode = rustix::ioctl::opcode::read_write::<DmIoctl>(0xfd, 0);
    let file = match probe_open(DM_CONTROL) {
        Probe::Ok(f) => f,
        Probe::Absent => return Probe::Absent,
        Probe::Failed(e) => return Probe::Failed(e),
    };
    let mut req = DmIoctl {
        // The interface version we speak; the kernel answers with its own.
        version: [4, 0, 0],
        data_size: size_of::<DmIoctl>() as u32,
        data_start: 0,
        target_count: 0,
        open_count: 0,
        flags: 0,
        event_nr: 0,
        padding: 0,
        dev: 0,
        name: [0; 128],
        uuid: [0; 129],
        data: [0; 7],
    };
    // SAFETY: `file` is open for the call; `req` is a properly sized and
    // initialised `struct dm_ioctl` whose `data_size` is its own size, so
    // the kernel reads and writes only within it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), DM_VERSION as _, &mut req as *mut DmIoctl) };
    if rc < 0 {
        return Probe::Failed(format!("DM_VERSION failed: {}", io::Error::last_os_error()));
    }
    Probe::Ok(format!(
        "{}.{}.{}",
        req.version[0], req.version[1], req.version[2]
    ))
}

/// Runs `program args…` with a timeout and returns its output, first line
/// of stdout (or of stderr when stdout is empty).
fn query(program: &Path, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run: {e}"))?;
    // Read both pipes on threads so a chatty child cannot block on a full
    // pipe while we wait for it.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut buf);
            }
            buf
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let first = |s: &str| {
        s.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
    };
    if !status.success() {
        return Err(match first(&stderr) {
            Some(line) => format!("{status}: {line}"),
            None => status.to_string(),
        });
    }
    Ok(first(&stdout)
        .or_else(|| first(&stderr))
        .unwrap_or_default())
}

fn first_line_of_version(program: &Path) -> Result<String, String> {
    query(program, &["--version"])
}

/// What doctor learned about nftables.
#[derive(Debug)]
struct NftFacts {
    /// The kernel's nf_tables, asked over netlink as hearthd does; `None`
    /// when not root (it needs CAP_NET_ADMIN).
    kernel: Option<Result<(), String>>,
    /// `nft --version`, when the (optional) nft tool is on `PATH`.
    tool: Option<Result<String, String>>,
}

fn probe_nft(root: bool) -> NftFacts {
    NftFacts {
        kernel: root.then(crate::host::firewall::nft::probe),
        tool: resolve_on_path(Path::new("nft")).map(|nft| first_line_of_version(&nft)),
    }
}

/// What doctor learned about the state directory.
#[derive(Debug)]
struct StateDirFacts {
    path: PathBuf,
    kind: StateDirKind,
    /// Free bytes for unprivileged users on its filesystem (or on the
    /// filesystem of its nearest existing ancestor).
    free_bytes: Option<u64>,
}

#[derive(Debug)]
enum StateDirKind {
    /// Exists.
    Exists { is_dir: bool, writable: bool },
    /// Does not exist; the nearest ancestor that does.
    Absent {
        ancestor: PathBuf,
        ancestor_writable: bool,
    },
}

fn writable(path: &Path) -> bool {
    rustix::fs::access(
        path,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    )
    .is_ok()
}

fn probe_state_dir(path: &Path) -> StateDirFacts {
    let (kind, existing) = match std::fs::metadata(path) {
        Ok(meta) => (
            StateDirKind::Exists {
                is_dir: meta.is_dir(),
                writable: writable(path),
            },
            path.to_owned(),
        ),
        Err(_) => {
            let ancestor = path
                .ancestors()
                .skip(1)
                .find(|a| a.exists())
                .unwrap_or(Path::new("/"))
                .to_owned();
            (
                StateDirKind::Absent {
                    ancestor_writable: writable(&ancestor),
                    ancestor: ancestor.clone(),
                },
                ancestor,
            )
        }
    };
    let free_bytes = rustix::fs::statvfs(&existing)
        .ok()
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
    StateDirFacts {
        path: path.to_owned(),
        kind,
        free_bytes,
    }
}

// ---------------------------------------------------------------------------
// Judgements: facts in, one `Check` out. Pure.

/// What doctor learned about KVM.
#[derive(Debug)]
struct KvmFacts {
    /// `KVM_GET_API_VERSION` on `/dev/kvm`.
    api_version: Probe<i32>,
    /// Why we think KVM is PVM, if we do.
    pvm: Option<String>,
    /// `vmx` or `svm`, if the CPU flags show one.
    cpu_virt: Option<&'static str>,
}

/// The words of the first `flags` line of `/proc/cpuinfo`.
fn cpu_flags(cpuinfo: &str) -> impl Iterator<Item = &str> {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "flags").then_some(value)
        })
        .unwrap_or("")
        .split_whitespace()
}

/// `vmx` (Intel) or `svm` (AMD) when the CPU advertises hardware
/// virtualisation.
fn cpu_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    cpu_flags(cpuinfo).find_map(|f| match f {
        "vmx" => Some("vmx"),
        "svm" => Some("svm"),
        _ => None,
    })
}

/// Evidence that `/dev/kvm` is served by PVM (a nested hypervisor that runs
/// only PVM-enabled guest kernels), from the module directory, the module
/// list, or a `pvm` CPU flag.
fn detect_pvm(
    sys_module_kvm_pvm: bool,
    proc_modules: Option<&str>,
    cpuinfo: &str,
) -> Option<String> {
    if sys_module_kvm_pvm {
        return Some("/sys/module/kvm_pvm".into());
    }
    if proc_modules.is_some_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().next() == Some("kvm_pvm"))
    }) {
        return Some("kvm_pvm in /proc/modules".into());
    }
    if cpu_flags(cpuinfo).any(|f| f == "pvm") {
        return Some("pvm CPU flag".into());
    }
    None
}

fn kvm_check(f: &KvmFacts) -> Check {
    const NAME: &str = "kvm";
    let cpu = match f.cpu_virt {
        Some(flag) => format!("cpu: {flag}"),
        None => "cpu: no vmx/svm flag".to_owned(),
    };
    match &f.api_version {
        Probe::Absent => Check::missing(
            NAME,
            format!("{KVM_DEV} does not exist; {cpu}"),
            "enable VT-x/AMD-V and load kvm_intel or kvm_amd; inside a VM, enable nested virtualisation",
        ),
        Probe::Failed(e) => Check::missing(
            NAME,
            format!("{KVM_DEV}: {e}; {cpu}"),
            "run hearthd as root, or give its user read-write access to /dev/kvm (group kvm)",
        ),
        Probe::Ok(v) if *v != KVM_API_VERSION => Check::warn(
            NAME,
            format!("{KVM_DEV}: KVM API {v}, expected {KVM_API_VERSION}; {cpu}"),
            "this kernel's KVM speaks an API Firecracker does not know",
        ),
        Probe::Ok(v) => match &f.pvm {
            Some(evidence) => Check::warn(
                NAME,
                format!("{KVM_DEV}: KVM API {v}, PVM nested hypervisor ({evidence}); {cpu}"),
                PVM_ADVICE,
            ),
            None => Check::ok(NAME, format!("{KVM_DEV}: KVM API {v}; {cpu}")),
        },
    }
}

/// True when a `--version` answer (or the file name) says the binary is
/// the test stand-in.
fn is_testvmm(path: &Path, version_line: &str) -> bool {
    version_line.starts_with("hearth-testvmm")
        || path.file_name().is_some_and(|n| n == "hearth-testvmm")
}

fn vmm_check(
    configured: &Path,
    resolved: Option<&Path>,
    version: Option<&Result<String, String>>,
) -> Check {
    const NAME: &str = "vmm";
    let (path, version) = match (resolved, version) {
        (Some(p), Some(v)) => (p, v),
        _ => {
            return Check::missing(
                NAME,
                format!("vmm_binary {} not found", configured.display()),
                VMM_ADVICE,
            );
        }
    };
    match version {
        Err(e) => Check::missing(
            NAME,
            format!("{} --version: {e}", path.display()),
            VMM_ADVICE,
        ),
        Ok(line) if is_testvmm(path, line) => Check::warn(
            NAME,
            format!(
                "{}: {line} — the test stand-in: it serves Firecracker's API but runs no guest",
                path.display()
            ),
            "fine for tests; to boot guests, install Firecracker (v1.16) and set vmm_binary",
        ),
        Ok(line) => Check::ok(NAME, format!("{}: {line}", path.display())),
    }
}

fn firecracker_check(path: Option<&Path>, version: Option<&Result<String, String>>) -> Check {
    const NAME: &str = "firecracker";
    match (path, version) {
        (Some(p), Some(Ok(line))) => Check::ok(NAME, format!("{}: {line}", p.display())),
        (Some(p), Some(Err(e))) => Check::missing(
            NAME,
            format!("{} --version: {e}", p.display()),
            "reinstall Firecracker (v1.16) from its release tarball",
        ),
        _ => Check::missing(
            NAME,
            "firecracker is not on PATH",
            "install Firecracker (v1.16) from its GitHub releases to boot real guests",
        ),
    }
}

/// A device node hearthd opens read-write.
fn device_check(name: &str, path: &str, probe: &Probe<()>, absent_advice: &str) -> Check {
    match probe {
        Probe::Ok(()) => Check::ok(name, format!("{path}: opens read-write")),
        Probe::Absent => Check::missing(name, format!("{path} does not exist"), absent_advice),
        Probe::Failed(e) => Check::missing(
            name,
            format!("{path}: {e}"),
            format!("run hearthd as root (it needs read-write access to {path})"),
        ),
    }
}

fn nft_check(f: &NftFacts) -> Check {
    const NAME: &str = "nftables";
    // hearthd talks to nf_tables over netlink; the nft tool is only for
    // people reading the rules.
    let tool = match &f.tool {
        Some(Ok(v)) => format!("nft tool: {v}"),
        Some(Err(e)) => format!("nft tool broken: {e}"),
        None => "nft tool not installed (optional: `nft list table ip hearth` shows the rules)"
            .to_owned(),
    };
    match &f.kernel {
        None => Check::ok(
            NAME,
            format!("kernel side not checked (needs root); {tool}"),
        ),
        Some(Ok(())) => Check::ok(NAME, format!("nf_tables answers over netlink; {tool}")),
        Some(Err(e)) => Check::missing(
            NAME,
            format!("nf_tables over netlink: {e}; {tool}"),
            "the kernel's nf_tables is missing or unusable: load it (modprobe nf_tables); \
             hearth needs it for NAT and port forwarding",
        ),
    }
}

fn dm_check(probe: &Probe<String>, dm_mod_loaded: bool) -> Check {
    const NAME: &str = "device-mapper";
    match probe {
        Probe::Ok(v) => Check::ok(NAME, format!("{DM_CONTROL}: device-mapper ioctl {v}")),
        Probe::Absent if dm_mod_loaded => Check::warn(
            NAME,
            format!("dm_mod is loaded but {DM_CONTROL} does not exist"),
            "create the node (dmsetup mknodes); until then root disks are copied, not dm-snapshot",
        ),
        Probe::Absent => Check::warn(NAME, format!("{DM_CONTROL} does not exist"), DM_ADVICE),
        Probe::Failed(e) => Check::warn(
            NAME,
            format!("{DM_CONTROL}: {e}"),
            "run hearthd as root; without device-mapper root disks are copied, not dm-snapshot",
        ),
    }
}

fn ip_forward_check(value: Result<String, String>) -> Check {
    const NAME: &str = "ip_forward";
    match value.as_deref().map(str::trim) {
        Ok("1") => Check::ok(NAME, "net.ipv4.ip_forward = 1"),
        Ok(v) => Check::warn(
            NAME,
            format!("net.ipv4.ip_forward = {v}"),
            "hearthd enables it when a VM uses nat",
        ),
        Err(e) => Check::warn(
            NAME,
            format!("cannot read {IP_FORWARD}: {e}"),
            "hearthd enables it when a VM uses nat",
        ),
    }
}

/// IPv4 routes from `/proc/net/route`: (interface, destination, prefix).
fn parse_proc_net_route(text: &str) -> Vec<(String, crate::config::Ipv4Net)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // The kernel prints each big-endian address as the raw u32 in
            // host byte order; its native bytes are the address's bytes.
            let addr = |s: &str| {
                u32::from_str_radix(s, 16)
                    .ok()
                    .map(|v| std::net::Ipv4Addr::from(v.to_ne_bytes()))
            };
            let (dst, mask) = (addr(f.get(1)?)?, addr(f.get(7)?)?);
            Some((
                f[0].to_owned(),
                crate::config::Ipv4Net {
                    addr: dst,
                    prefix_len: u32::from(mask).leading_ones() as u8,
                },
            ))
        })
        .collect()
}

fn uplink_check(config: &Config, routes: &[(String, crate::config::Ipv4Net)]) -> Check {
    const NAME: &str = "uplink";
    let pool = config.pool();
    let clash: Vec<String> = routes
        .iter()
        .filter(|(dev, net)| net.prefix_len > 0 && !dev.starts_with("hth") && net.overlaps(pool))
        .map(|(dev, net)| format!("{net} dev {dev}"))
        .collect();
    if !clash.is_empty() {
        return Check::missing(
            NAME,
            format!(
                "address pool {pool} overlaps host routes: {}",
                clash.join(", ")
            ),
            "set address_pool to a private range the host does not route; hearthd refuses to start otherwise",
        );
    }
    let default = routes
        .iter()
        .find(|(_, n)| n.prefix_len == 0)
        .map(|(d, _)| d.clone());
    let uplink = if config.uplink.is_empty() {
        default
    } else {
        Some(config.uplink.clone())
    };
    match uplink {
        Some(u) if Path::new("/sys/class/net").join(&u).exists() => Check::ok(
            NAME,
            format!("nat masquerades out of {u}; address pool {pool} is free"),
        ),
        Some(u) => Check::missing(
            NAME,
            format!("uplink {u} does not exist"),
            "set `uplink` to the interface that reaches the internet",
        ),
        None => Check::warn(
            NAME,
            format!("no default route and no `uplink` configured; address pool {pool} is free"),
            "VMs with the nat capability cannot start until the host has a default route or `uplink` is set",
        ),
    }
}

fn disk_strategy_check(configured: crate::config::DiskStrategy, dm_ok: bool) -> Check {
    use crate::config::DiskStrategy;
    const NAME: &str = "disk";
    match (configured, dm_ok) {
        (DiskStrategy::Auto, true) => Check::ok(NAME, "auto: dm-snapshot (device-mapper works)"),
        (DiskStrategy::Auto, false) => Check::ok(
            NAME,
            "auto: copy (reflink where the filesystem can, else sparse), since device-mapper is absent",
        ),
        (DiskStrategy::Copy, _) => {
            Check::ok(NAME, "copy (reflink where the filesystem can, else sparse)")
        }
        (DiskStrategy::DmSnapshot, true) => Check::ok(NAME, "dm-snapshot"),
        (DiskStrategy::DmSnapshot, false) => Check::missing(
            NAME,
            "dm-snapshot is configured but device-mapper does not work here",
            "set disk_strategy = \"auto\" or \"copy\"; hearthd refuses to start otherwise",
        ),
    }
}

/// `1.5 GiB`, `300 MiB`.
fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = b as f64;
    if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else {
        format!("{:.0} MiB", b / MIB)
    }
}

fn state_dir_check(f: &StateDirFacts) -> Check {
    const NAME: &str = "state_dir";
    let p = f.path.display();
    let where_ = match &f.kind {
        StateDirKind::Exists { is_dir: false, .. } => {
            return Check::missing(
                NAME,
                format!("{p} exists and is not a directory"),
                "set state_dir to a directory",
            );
        }
        StateDirKind::Exists {
            writable: false, ..
        } => {
            return Check::missing(
                NAME,
                format!("{p} is not writable"),
                "run hearthd as root, or make state_dir writable by its user",
            );
        }
        StateDirKind::Absent {
            ancestor,
            ancestor_writable: false,
        } => {
            return Check::missing(
                NAME,
                format!(
                    "{p} does not exist and {} is not writable",
                    ancestor.display()
                ),
                "create state_dir, or run hearthd as root",
            );
        }
        StateDirKind::Exists { .. } => format!("{p}: writable"),
        StateDirKind::Absent { ancestor, .. } => {
            format!(
                "{p}: absent, hearthd will create it under {}",
                ancestor.display()
            )
        }
    };
    match f.free_bytes {
        Some(free) if free < LOW_SPACE_BYTES => Check::warn(
            NAME,
            format!("{where_}, {} free", human_bytes(free)),
            "free space on state_dir's filesystem: each VM's root disk is copied there",
        ),
        Some(free) => Check::ok(NAME, format!("{where_}, {} free", human_bytes(free))),
        None => Check::ok(NAME, format!("{where_}, free space unknown")),
    }
}

fn cgroup_check(unified: bool, hybrid: bool) -> Check {
    const NAME: &str = "cgroup";
    const ADVICE: &str = "optional: hearth sets no cgroup limits yet; they will need the \
                          unified cgroup v2 hierarchy (systemd.unified_cgroup_hierarchy=1)";
    if unified {
        Check::ok(NAME, "cgroup v2 (unified) at /sys/fs/cgroup")
    } else if hybrid {
        Check::warn(
            NAME,
            "hybrid: v1 controllers, v2 at /sys/fs/cgroup/unified",
            ADVICE,
        )
    } else {
        Check::warn(NAME, "no cgroup v2 hierarchy", ADVICE)
    }
}

fn root_check(root: bool, euid: u32) -> Check {
    if root {
        Check::ok("root", "euid 0")
    } else {
        Check::warn(
            "root",
            format!("euid {euid}, not root: device checks show what this user can open"),
            "hearthd needs root (CAP_NET_ADMIN for taps and nftables, CAP_SYS_ADMIN for loop \
             and device-mapper); run `sudo hearth doctor` to see what it would",
        )
    }
}

#[cfg(test)]
mod net_tests {
    use super::*;

    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";

    #[test]
    fn routes_are_parsed_from_proc() {
        let r = parse_proc_net_route(ROUTE);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1.prefix_len, 0);
        assert_eq!(r[1].1.to_string(), "192.168.2.0/24");
    }

    #[test]
    fn pool_overlap_and_disk_strategy_are_reported() {
        let cfg = Config::default();
        let mut routes = parse_proc_net_route(ROUTE);
        assert_ne!(uplink_check(&cfg, &routes).status, Status::Missing);
        routes.push((
            "eth1".into(),
            crate::config::Ipv4Net::parse("10.231.8.0/24").unwrap(),
        ));
        let c = uplink_check(&cfg, &routes);
        assert_eq!(c.status, Status::Missing);
        assert!(c.detail.contains("10.231.8.0/24 dev eth1"), "{}", c.detail);
        routes.pop();
        routes.push((
            "hth3".into(),
            crate::config::Ipv4Net::parse("10.231.0.12/30").unwrap(),
        ));
        assert_ne!(
            uplink_check(&cfg, &routes).status,
            Status::Missing,
            "our own taps do not clash"
        );
        use crate::config::DiskStrategy;
        assert!(
            disk_strategy_check(DiskStrategy::Auto, false)
                .detail
                .contains("copy")
        );
        assert_eq!(
            disk_strategy_check(DiskStrategy::DmSnapshot, false).status,
            Status::Missing
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO_PVM_HOST: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\n\
        flags\t\t: fpu vme sse2 hypervisor lahf_lm\nbugs\t\t: sysret_ss_attrs\n";

    #[test]
    fn pvm_detection() {
        assert_eq!(
            detect_pvm(true, None, CPUINFO_PVM_HOST).as_deref(),
            Some("/sys/module/kvm_pvm")
        );
        let modules = "kvm_amd 200704 0 - Live 0x0\nkvm_pvm 98304 0 - Live 0x0\nkvm 1376256 1 kvm_pvm, Live 0x0\n";
        assert_eq!(
            detect_pvm(false, Some(modules), CPUINFO_PVM_HOST).as_deref(),
            Some("kvm_pvm in /proc/modules")
        );
        // A module merely depending on kvm_pvm is not kvm_pvm.
        let modules = "kvm 1376256 1 kvm_pvm, Live 0x0\n";
        assert_eq!(detect_pvm(false, Some(modules), CPUINFO_PVM_HOST), None);
        let cpuinfo = "flags\t: fpu pvm sse2\n";
        assert_eq!(
            detect_pvm(false, None, cpuinfo).as_deref(),
            Some("pvm CPU flag")
        );
        // "pvm" inside another word or another key is not the flag.
        let cpuinfo = "model name\t: pvm box\nflags\t: fpu pvmx\n";
        assert_eq!(detect_pvm(false, None, cpuinfo), None);
    }

    #[test]
    fn cpu_virt_flags() {
        assert_eq!(cpu_virt_flag("flags\t: fpu vmx sse\n"), Some("vmx"));
        assert_eq!(cpu_virt_flag("flags\t: fpu svm sse\n"), Some("svm"));
        assert_eq!(cpu_virt_flag(CPUINFO_PVM_HOST), None);
        assert_eq!(cpu_virt_flag(""), None);
    }

    #[test]
    fn kvm_judgement() {
        let facts = |api_version, pvm: Option<&str>, cpu_virt| KvmFacts {
            api_version,
            pvm: pvm.map(str::to_owned),
            cpu_virt,
        };
        let c = kvm_check(&facts(Probe::Ok(12), None, Some("vmx")));
        assert_eq!(c.status, Status::Ok);
        assert_eq!(c.detail, "/dev/kvm: KVM API 12; cpu: vmx");
        assert_eq!(c.advice, None);

        let c = kvm_check(&facts(Probe::Ok(12), Some("/sys/module/kvm_pvm"), None));
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("PVM nested hypervisor"), "{}", c.detail);
        assert!(c.detail.contains("no vmx/svm"), "{}", c.detail);
        assert_eq!(c.advice.as_deref(), Some(PVM_ADVICE));

        let c = kvm_check(&facts(Probe::Absent, None, None));
        assert_eq!(c.status, Status::Missing);
        assert!(c.advice.is_some());

        let c = kvm_check(&facts(
            Probe::Failed("cannot open read-write: Permission denied".into()),
            None,
            Some("svm"),
        ));
        assert_eq!(c.status, Status::Missing);
        assert!(c.detail.contains("Permission denied"));

        let c = kvm_check(&facts(Probe::Ok(11), None, Some("vmx")));
        assert_eq!(c.status, Status::Warn);
    }

    #[test]
    fn vmm_judgement() {
        let fc = Path::new("/usr/bin/firecracker");
        let c = vmm_check(Path::new("firecracker"), None, None);
        assert_eq!(c.status, Status::Missing);
        assert_eq!(c.advice.as_deref(), Some(VMM_ADVICE));
        assert!(c.detail.contains("firecracker"));

        let c = vmm_check(fc, Some(fc), Some(&Ok("Firecracker v1.16.0".into())));
        assert_eq!(c.status, Status::Ok);
        assert_eq!(c.detail, "/usr/bin/firecracker: Firecracker v1.16.0");

        let t = Path::new("/work/target/debug/hearth-testvmm");
        let c = vmm_check(t, Some(t), Some(&Ok("hearth-testvmm 0.1.0".into())));
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("runs no guest"), "{}", c.detail);

        let c = vmm_check(fc, Some(fc), Some(&Err("no answer within 2 s".into())));
        assert_eq!(c.status, Status::Missing);
    }

    #[test]
    fn simple_judgements() {
        assert_eq!(ip_forward_check(Ok("1\n".into())).status, Status::Ok);
        let c = ip_forward_check(Ok("0\n".into()));
        assert_eq!(c.status, Status::Warn);
        assert_eq!(c.detail, "net.ipv4.ip_forward = 0");
        assert_eq!(
            c.advice.as_deref(),
            Some("hearthd enables it when a VM uses nat")
        );

        let c = dm_check(&Probe::Absent, false);
        assert_eq!(c.status, Status::Warn);
        assert_eq!(c.advice.as_deref(), Some(DM_ADVICE));
        assert_eq!(
            dm_check(&Probe::Ok("4.48.0".into()), true).status,
            Status::Ok
        );

        let c = device_check("tun", TUN_DEV, &Probe::Absent, "load tun");
        assert_eq!(
            (c.status, c.advice.as_deref()),
            (Status::Missing, Some("load tun"))
        );

        assert_eq!(cgroup_check(true, false).status, Status::Ok);
        assert_eq!(cgroup_check(false, true).status, Status::Warn);
        assert_eq!(root_check(true, 0).status, Status::Ok);
        assert_eq!(root_check(false, 1000).status, Status::Warn);

        // The nft tool is optional; the kernel side is what counts.
        let nft = NftFacts {
            kernel: Some(Ok(())),
            tool: None,
        };
        let c = nft_check(&nft);
        assert_eq!(c.status, Status::Ok);
        assert!(c.detail.contains("not installed"), "{c:?}");
        let nft = NftFacts {
            kernel: Some(Err("Protocol not supported (os error 93)".into())),
            tool: Some(Ok("nftables v1.0.9 (Old Doc Yiddish)".into())),
        };
        assert_eq!(nft_check(&nft).status, Status::Missing);
        let nft = NftFacts {
            kernel: None,
            tool: None,
        };
        assert_eq!(nft_check(&nft).status, Status::Ok);
    }

    #[test]
    fn state_dir_judgement() {
        let facts = |kind, free_bytes| StateDirFacts {
            path: "/var/lib/hearth".into(),
            kind,
            free_bytes,
        };
        let c = state_dir_check(&facts(
            StateDirKind::Exists {
                is_dir: true,
                writable: true,
            },
            Some(20 << 30),
        ));
        assert_eq!(c.status, Status::Ok);
        assert_eq!(c.detail, "/var/lib/hearth: writable, 20.0 GiB free");

        let c = state_dir_check(&facts(
            StateDirKind::Absent {
                ancestor: "/var/lib".into(),
                ancestor_writable: true,
            },
            Some(100 << 20),
        ));
        assert_eq!(c.status, Status::Warn);
        assert!(
            c.detail.contains("will create it under /var/lib"),
            "{}",
            c.detail
        );
        assert!(c.detail.contains("100 MiB free"), "{}", c.detail);

        let c = state_dir_check(&facts(
            StateDirKind::Absent {
                ancestor: "/".into(),
                ancestor_writable: false,
            },
            None,
        ));
        assert_eq!(c.status, Status::Missing);
        let c = state_dir_check(&facts(
            StateDirKind::Exists {
                is_dir: false,
                writable: true,
            },
            None,
        ));
        assert_eq!(c.status, Status::Missing);
    }

    #[test]
    fn human_report_is_aligned() {
        let report = Report {
            checks: vec![
                Check::ok("kvm", "/dev/kvm: KVM API 12"),
                Check::warn("device-mapper", "no control node", "copy instead"),
                Check::missing("nft", "nft is not on PATH", "install nftables"),
            ],
        };
        let text = print_human(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "ok       kvm            /dev/kvm: KVM API 12",
                "warn     device-mapper  no control node",
                "                        advice: copy instead",
                "missing  nft            nft is not on PATH",
                "                        advice: install nftables",
                "1 ok, 1 warn, 1 missing",
            ]
        );
    }

    #[test]
    fn json_uses_lowercase_status() {
        let report = Report {
            checks: vec![Check::warn("ip_forward", "0", "later")],
        };
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["checks"][0]["status"], "warn");
        assert_eq!(v["checks"][0]["advice"], "later");
    }

    #[test]
    fn query_reports_output_failure_and_timeout() {
        assert_eq!(
            query(Path::new("/bin/sh"), &["-c", "echo; echo ' v1 '; echo x"]),
            Ok("v1".into())
        );
        let err = query(Path::new("/bin/sh"), &["-c", "echo nope >&2; exit 3"]).unwrap_err();
        assert!(err.contains("nope"), "{err}");
        let err = query(Path::new("/bin/sh"), &["-c", "sleep 5"]).unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        assert!(query(Path::new("/nonexistent/hearth-x"), &[]).is_err());
    }

    #[test]
    fn run_on_this_host_names_every_check() {
        let report = run(&Config::default());
        let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "root",
                "kvm",
                "vmm",
                "firecracker",
                "tun",
                "nftables",
                "device-mapper",
                "loop",
                "ip_forward",
                "uplink",
                "disk",
                "state_dir",
                "cgroup"
            ]
        );
        for c in &report.checks {
            assert_eq!(c.advice.is_some(), c.status != Status::Ok, "{c:?}");
        }
    }
}
