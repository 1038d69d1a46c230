//! The "bare" variant: the minimum a VM start needs, done in-process with
//! hearthd's own host implementations and nothing else — no daemon, no
//! HTTP hop to it, no store, no journal, no per-VM lock.
//!
//! It makes the same kernel calls hearth makes, through the same code:
//! the tap by TUNSETIFF + TUNSETPERSIST and its address and link state by
//! rtnetlink ([`LinuxNet`]), the NAT and port-forward rules as one nft
//! transaction ([`Nft`]), the rootfs as a sparse copy ([`LinuxDisk`]), the
//! VMM spawned in its own session ([`LinuxProcesses`]) and configured over
//! its API with the same PUTs and InstanceStart ([`Firecracker`]), in
//! hearth's order (the VMM first, so its start-up overlaps the rest). So
//! hearth − bare is exactly what the daemon adds on top: its API hop, the
//! journal writes, the state transitions, the copy's fsync and rename, the
//! tap pool, the extra existence check before the network-interface PUT.
//!
//! Each step is timed on its own, which gives the breakdown of the start
//! that BENCHMARKS.md reads.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hearth_api::{PortForward, Proto, VmRules, short_id};
use hearthd::host::disk::DiskHost;
use hearthd::host::disk::linux::LinuxDisk;
use hearthd::host::firewall::Firewall;
use hearthd::host::firewall::nft::Nft;
use hearthd::host::net::NetHost;
use hearthd::host::net::linux::LinuxNet;
use hearthd::host::{LinuxProcesses, ProcessHost, SpawnSpec};
use hearthd::vmm::firecracker::Firecracker;
use hearthd::vmm::{Api, ApiCall, Backend};
use uuid::Uuid;

use crate::env::{Env, UPLINK};

/// The bare variant's taps are `hthb<N>` (hearth's own are `hth<N>`).
const TAP_PREFIX: &str = "hthb";
/// Its /30s come from 10.232.0.0/16 (hearth's pool is 10.231.0.0/16).
const POOL: u32 = u32::from_be_bytes([10, 232, 0, 0]);
/// Its forwarded host ports: 40000..50000.
const FIRST_PORT: u32 = 40_000;
/// How long a freshly spawned VMM may take to bind its socket (hearthd's
/// default `vmm_ready_timeout_ms`).
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// The tap's prefix length (hearth's).
const PREFIX_LEN: u8 = 30;

/// The names of the timed steps of a bare start, in order.
pub const STEPS: [(&str, &str); 9] = [
    ("spawn", "spawn the VMM"),
    ("tap", "create tap (TUNSETIFF+TUNSETPERSIST)"),
    ("address", "flush, address, up (rtnetlink)"),
    ("sysctl", "route_localnet sysctl"),
    ("nft", "nftables transaction (NAT + port forward)"),
    ("copy", "sparse copy of the rootfs"),
    (
        "ready",
        "VMM API socket ready (what is left of its start-up)",
    ),
    ("puts", "6 PUTs (logger … network-interfaces)"),
    ("instance_start", "PUT /actions InstanceStart"),
];

/// The in-process starter.
#[derive(Debug)]
pub struct Bare {
    net: LinuxNet,
    fw: Nft,
    disk: LinuxDisk,
    procs: LinuxProcesses,
    vmm: Firecracker,
    testvmm: PathBuf,
    dir: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    seq: AtomicU32,
}

/// What a bare start made, so that its stop can undo it.
#[derive(Default)]
pub struct BareVm {
    dir: PathBuf,
    tap: Option<String>,
    rules: Option<VmRules>,
    process: Option<(u32, u64)>,
    api: Option<Box<dyn Api>>,
}

impl std::fmt::Debug for BareVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BareVm")
            .field("dir", &self.dir)
            .field("tap", &self.tap)
            .field("process", &self.process)
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Bare {
    /// A starter working under `<tmp>/bare`. Must be called on the tokio
    /// runtime (the rtnetlink connection runs on it).
    pub fn new(env: &Env) -> anyhow::Result<Bare> {
        let dir = env.tmp.join("bare");
        std::fs::create_dir_all(&dir).context("create the bare dir")?;
        let net = LinuxNet::new().context("open rtnetlink")?;
        // hearth turns forwarding on the first time a VM needs it; so does
        // this, once.
        net.set_sysctl("net.ipv4.ip_forward", "1")?;
        Ok(Bare {
            net,
            fw: Nft::new(),
            disk: LinuxDisk::new(),
            procs: LinuxProcesses,
            vmm: Firecracker::new(env.bins.testvmm.clone()),
            testvmm: env.bins.testvmm.clone(),
            dir,
            kernel: env.kernel.clone(),
            rootfs: env.rootfs.clone(),
            seq: AtomicU32::new(0),
        })
    }

    /// hearthd's own nft implementation, for timing transactions directly.
    pub fn firewall(&self) -> &Nft {
        &self.fw
    }

    /// Starts one VM; returns it and the time of each step (in
    /// [`STEPS`] order, milliseconds). On failure, undoes what it did.
    pub async fn start(&self) -> anyhow::Result<(BareVm, Vec<f64>)> {
        let mut vm = BareVm::default();
        let mut steps = Vec::with_capacity(STEPS.len());
        match self.start_steps(&mut vm, &mut steps).await {
            Ok(()) => Ok((vm, steps)),
            Err(e) => {
                let _ = self.teardown(&mut vm).await;
                let _ = std::fs::remove_dir_all(&vm.dir);
                Err(e)
            }
        }
    }

    async fn start_steps(&self, vm: &mut BareVm, steps: &mut Vec<f64>) -> anyhow::Result<()> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let id = Uuid::now_v7();
        let tap = format!("{TAP_PREFIX}{n}");
        let slot = POOL + (n % 16_384) * 4;
        let (host_ip, guest_ip) = (Ipv4Addr::from(slot + 1), Ipv4Addr::from(slot + 2));
        vm.dir = self.dir.join(id.to_string());
        std::fs::create_dir_all(&vm.dir).context("create the VM dir")?;
        let sock = vm.dir.join("api.sock");
        let (log, metrics, console) = (
            vm.dir.join("vmm.log"),
            vm.dir.join("metrics.json"),
            vm.dir.join("console.log"),
        );

        let mut t = Instant::now();
        let mut lap = |steps: &mut Vec<f64>| {
            let now = Instant::now();
            steps.push(ms(now - t));
            t = now;
        };
        // The VMM first, as hearth does: its start-up overlaps the host
        // side. Firecracker opens its log and metrics files without O_CREAT.
        std::fs::File::create(&log).context("create the VMM log")?;
        std::fs::File::create(&metrics).context("create the metrics file")?;
        let (program, args) = self.vmm.command(&sock, &id.to_string());
        let (pid, st) = self.procs.spawn(&SpawnSpec {
            program,
            args,
            console_log: console,
        })?;
        vm.process = Some((pid, st));
        lap(steps);
        vm.tap = Some(tap.clone());
        self.net.create_tap(&tap).await?;
        lap(steps);
        self.net.configure_tap(&tap, host_ip, PREFIX_LEN).await?;
        lap(steps);
        self.net
            .set_sysctl(&format!("net.ipv4.conf.{tap}.route_localnet"), "1")?;
        lap(steps);
        let rules = VmRules {
            short_id: short_id(&id),
            vm_id: id.to_string(),
            tap: tap.clone(),
            guest_ip,
            nat_uplink: Some(UPLINK.into()),
            port_forwards: vec![PortForward {
                host_port: (FIRST_PORT + n % 10_000) as u16,
                proto: Proto::Tcp,
                guest_port: 80,
            }],
        };
        vm.rules = Some(rules.clone());
        self.fw.apply(&rules).await?;
        lap(steps);
        let disk = vm.dir.join("rootfs.img");
        self.disk.copy_image(&self.rootfs, &disk)?;
        lap(steps);
        let procs = LinuxProcesses;
        let alive = move || procs.is_alive(pid, st, None);
        let api = vm
            .api
            .insert(self.vmm.connect(&sock, READY_TIMEOUT, &alive).await?);
        lap(steps);
        let boot_args = format!(
            "{} ip={guest_ip}::{host_ip}:255.255.255.252::eth0:off:1.1.1.1",
            hearth_api::DEFAULT_KERNEL_ARGS
        );
        for call in [
            ApiCall::Logger { log_path: log },
            ApiCall::Metrics {
                metrics_path: metrics,
            },
            ApiCall::MachineConfig {
                vcpus: 1,
                memory_mib: 128,
            },
            ApiCall::BootSource {
                kernel: self.kernel.clone(),
                boot_args,
                initrd: None,
            },
            ApiCall::Drive {
                id: "rootfs".into(),
                path: disk,
                is_root: true,
                read_only: false,
            },
            ApiCall::NetworkInterface {
                id: "eth0".into(),
                tap,
                mac: hearthd::lifecycle::mac_for(id),
            },
        ] {
            api.call(&call).await?;
        }
        lap(steps);
        api.call(&ApiCall::InstanceStart).await?;
        lap(steps);
        Ok(())
    }

    /// Stops a VM the way hearth does — Ctrl-Alt-Del, wait for the VMM to
    /// exit — and removes its rules, its tap and the VMM's socket and
    /// metrics file. The VM dir (its disk) stays, as hearth's stop keeps it;
    /// [`Bare::delete`] removes it.
    pub async fn stop(&self, mut vm: BareVm) -> anyhow::Result<PathBuf> {
        if let (Some(api), Some((pid, st))) = (vm.api.as_mut(), vm.process) {
            let exited = self.procs.wait_exit(pid, st);
            if api.call(&ApiCall::SendCtrlAltDel).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(10), exited).await;
            }
        }
        self.teardown(&mut vm).await?;
        Ok(vm.dir)
    }

    /// Removes a stopped VM's directory.
    pub fn delete(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))
    }

    /// Kills the VMM (if still there), removes the rules, the tap and the
    /// socket and metrics file.
    async fn teardown(&self, vm: &mut BareVm) -> anyhow::Result<()> {
        vm.api = None;
        if let Some((pid, st)) = vm.process.take() {
            self.procs.kill(pid, st).await?;
        }
        if let Some(rules) = vm.rules.take() {
            self.fw.remove(&rules).await?;
        }
        if let Some(tap) = vm.tap.take() {
            self.net.delete_link(&tap).await?;
        }
        for f in ["api.sock", "metrics.json"] {
            match std::fs::remove_file(vm.dir.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).context("remove a VMM file");
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The VMM's own start-up cost: spawn the stand-in → its API socket
    /// accepts a connection (the same spawn and the same 1 ms connect
    /// polling as hearth and bare). Then kills it.
    pub async fn vmm_startup(&self) -> anyhow::Result<f64> {
        let dir = self.dir.join(format!("vmm-{}", Uuid::now_v7()));
        std::fs::create_dir_all(&dir).context("create the VMM dir")?;
        let sock = dir.join("api.sock");
        let (program, args) = self.vmm.command(&sock, "vmm-startup");
        debug_assert_eq!(program, self.testvmm);
        let t = Instant::now();
        let (pid, st) = self.procs.spawn(&SpawnSpec {
            program,
            args,
            console_log: dir.join("console.log"),
        })?;
        let procs = LinuxProcesses;
        let alive = move || procs.is_alive(pid, st, None);
        let connected = self.vmm.connect(&sock, READY_TIMEOUT, &alive).await;
        let took = ms(t.elapsed());
        let killed = self.procs.kill(pid, st).await;
        drop(connected?);
        killed?;
        std::fs::remove_dir_all(&dir).context("remove the VMM dir")?;
        Ok(took)
    }
}
