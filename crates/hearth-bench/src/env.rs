//! The bench's own host: a network namespace named `hearth-bench-<pid>`
//! with a veth uplink (`hthu0`, default route) to a second namespace that
//! plays the internet, a temp dir named `hearth-bench-…` holding the state
//! dir, the socket, the test kernel and the rootfs image, and the `hearthd`
//! it runs there.
//!
//! Why the bench *enters* the namespace instead of prefixing commands with
//! `ip netns exec`: the bare variant makes taps through rtnetlink and
//! nftables rules through `nft` in-process, and the timed `hearthd` restarts
//! should not include an extra `ip` exec. So the main thread moves into the
//! namespace before any other thread exists; every thread and child process
//! made afterwards (tokio's workers, `hearthd`, `nft`, the shell scripts)
//! inherits it.
//!
//! Everything made here is removed by [`cleanup`] — on success, on error,
//! on a panic (a guard in `main`) and on SIGINT/SIGTERM/SIGHUP (a signal
//! thread): the daemon, every process whose command line names the temp
//! dir (VMMs, scripts), the namespaces (and with them every tap and nft
//! rule in them) and the temp dir. The bench is also a child subreaper:
//! VMMs orphaned by a killed `hearthd` or by a finished shell script are
//! re-parented to it rather than to this machine's PID 1, which does not
//! reap, and [`reap_orphans`] collects them.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, WaitOptions};

/// The host's uplink in the bench namespace (hearth's `hth` mark).
pub const UPLINK: &str = "hthu0";
/// Its peer in the outer namespace.
const OUTER_PEER: &str = "hthx0";
/// The host's address on the uplink (TEST-NET-1).
const HOST_UPLINK_IP: &str = "192.0.2.1";
/// The far end, in the outer namespace: the default gateway.
const OUTER_IP: &str = "192.0.2.2";
/// Size of the rootfs image every variant copies: sparse, with
/// [`ROOTFS_DATA`] bytes of data in two extents.
const ROOTFS_SIZE: u64 = 64 << 20;
/// Data in the rootfs image.
const ROOTFS_DATA: usize = 1 << 20;

/// Set once a signal asked the bench to stop: loops check it to stop early.
pub static ABORTING: AtomicBool = AtomicBool::new(false);

/// What [`cleanup`] must remove. Registered before the first object is made.
#[derive(Debug)]
struct Owned {
    tmp: PathBuf,
    netns: Vec<String>,
    daemon: Option<u32>,
}

static OWNED: Mutex<Option<Owned>> = Mutex::new(None);

/// Held for the whole of a [`cleanup`], so that a second caller (the main
/// thread after a signal made its request fail, or the signal thread while
/// the main thread cleans up) waits for the first to finish instead of
/// finding nothing to do and letting the process exit half-way.
static CLEANING: Mutex<()> = Mutex::new(());

fn owned() -> std::sync::MutexGuard<'static, Option<Owned>> {
    OWNED.lock().unwrap_or_else(|p| p.into_inner())
}

/// The binaries the bench runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The daemon.
    pub hearthd: PathBuf,
    /// The Firecracker stand-in.
    pub testvmm: PathBuf,
}

/// The isolated host.
#[derive(Debug)]
pub struct Env {
    /// `/tmp/hearth-bench-XXXX`.
    pub tmp: PathBuf,
    /// The host namespace (where the bench, hearthd and the VMMs run).
    pub netns: String,
    /// hearthd's API socket.
    pub socket: PathBuf,
    /// hearthd's config file.
    pub config: PathBuf,
    /// The test guest kernel.
    pub kernel: PathBuf,
    /// The sparse rootfs image.
    pub rootfs: PathBuf,
    /// Where hearthd's stderr goes (appended across restarts).
    pub daemon_log: PathBuf,
    /// The binaries.
    pub bins: Binaries,
}

/// A running `hearthd`.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

impl Env {
    /// Makes the temp dir, the namespaces and the files, and moves the
    /// calling thread into the host namespace. Must run before any other
    /// thread is started, so that all of them inherit the namespace.
    pub fn create(bins: Binaries, extra_config: &[String]) -> anyhow::Result<Env> {
        for line in extra_config {
            if !line.contains('=') {
                bail!("--hearthd-config wants `key = value`, got {line:?}");
            }
        }
        let tmp = tempfile::Builder::new()
            .prefix("hearth-bench-")
            .tempdir()
            .context("create the temp dir")?
            .keep();
        let netns = format!("hearth-bench-{}", std::process::id());
        let outer = format!("{netns}-out");
        *owned() = Some(Owned {
            tmp: tmp.clone(),
            netns: vec![netns.clone(), outer.clone()],
            daemon: None,
        });
        for ns in [&netns, &outer] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "-n", &netns, "link", "add", UPLINK, "type", "veth", "peer", "name", OUTER_PEER,
            "netns", &outer,
        ])?;
        let host_cidr = format!("{HOST_UPLINK_IP}/24");
        let outer_cidr = format!("{OUTER_IP}/24");
        ip(&["-n", &netns, "addr", "add", &host_cidr, "dev", UPLINK])?;
        ip(&["-n", &netns, "link", "set", UPLINK, "up"])?;
        ip(&["-n", &netns, "route", "add", "default", "via", OUTER_IP])?;
        ip(&["-n", &outer, "addr", "add", &outer_cidr, "dev", OUTER_PEER])?;
        ip(&["-n", &outer, "link", "set", OUTER_PEER, "up"])?;

        let ns_file = std::fs::File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("open namespace {netns}"))?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&ns_file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .with_context(|| format!("enter namespace {netns}"))?;

        let kernel = tmp.join("vmlinux.bin");
        run(Command::new(&bins.testvmm)
            .arg("--write-test-guest")
            .arg(&kernel))?;
        let rootfs = tmp.join("rootfs.ext4");
        write_sparse_image(&rootfs)?;
        let state_dir = tmp.join("state");
        let socket = tmp.join("hearth.sock");
        let config = tmp.join("hearth.toml");
        // Every key the bench depends on, explicitly: rootfs by copy (the
        // issue's case), the default pool and tap pool.
        let mut toml = format!(
            "state_dir = {:?}\nsocket = {:?}\nvmm_binary = {:?}\ndisk_strategy = \"copy\"\n\
             address_pool = \"10.231.0.0/16\"\nstop_timeout_secs = 10\n",
            state_dir.display().to_string(),
            socket.display().to_string(),
            bins.testvmm.display().to_string(),
        );
        for line in extra_config {
            toml.push_str(line);
            toml.push('\n');
        }
        std::fs::write(&config, toml).context("write the config")?;
        Ok(Env {
            daemon_log: tmp.join("hearthd.log"),
            tmp,
            netns,
            socket,
            config,
            kernel,
            rootfs,
            bins,
        })
    }

    /// Starts `hearthd` (in its own process group, so a Ctrl-C at the
    /// terminal reaches the bench, which cleans up, and not the daemon
    /// mid-measurement). Does not wait for it.
    pub fn spawn_daemon(&self) -> anyhow::Result<Daemon> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.daemon_log)
            .context("open the daemon log")?;
        let child = Command::new(&self.bins.hearthd)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup the daemon log")?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawn {}", self.bins.hearthd.display()))?;
        if let Some(o) = owned().as_mut() {
            o.daemon = Some(child.id());
        }
        Ok(Daemon { child })
    }

    /// Polls `GET /v1/health` every millisecond until it answers; returns
    /// the health. Fails if the daemon exits or `timeout` passes.
    pub async fn wait_ready(
        &self,
        daemon: &mut Daemon,
        timeout: Duration,
    ) -> anyhow::Result<hearth_api::Health> {
        let start = Instant::now();
        loop {
            if let Some(status) = daemon.child.try_wait().context("poll hearthd")? {
                bail!(
                    "hearthd exited at start ({status}); its log:\n{}",
                    self.log_tail(40)
                );
            }
            if let Ok(h) = crate::api::health(&self.socket).await {
                return Ok(h);
            }
            if start.elapsed() > timeout || ABORTING.load(Ordering::Relaxed) {
                bail!(
                    "hearthd did not answer within {timeout:?}; its log:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// SIGKILLs the daemon (never its VMs) and reaps it.
    pub fn kill_daemon(&self, mut daemon: Daemon) -> anyhow::Result<()> {
        daemon.child.kill().context("SIGKILL hearthd")?;
        daemon.child.wait().context("reap hearthd")?;
        if let Some(o) = owned().as_mut() {
            o.daemon = None;
        }
        Ok(())
    }

    /// SIGTERMs the daemon and waits for it (VMs keep running).
    pub fn stop_daemon(&self, mut daemon: Daemon) -> anyhow::Result<()> {
        if let Some(pid) = Pid::from_raw(daemon.pid() as i32) {
            rustix::process::kill_process(pid, Signal::TERM).context("SIGTERM hearthd")?;
        }
        daemon.child.wait().context("reap hearthd")?;
        if let Some(o) = owned().as_mut() {
            o.daemon = None;
        }
        Ok(())
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.daemon_log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A sparse image with data in two extents, so a sparse copy has both
/// data to copy and holes to skip.
fn write_sparse_image(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::create(path).context("create the rootfs image")?;
    f.set_len(ROOTFS_SIZE).context("size the rootfs image")?;
    let data: Vec<u8> = (0..ROOTFS_DATA).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all_at(&data, 0).context("write the rootfs image")?;
    f.write_all_at(&data[..64 << 10], ROOTFS_SIZE / 2)
        .context("write the rootfs image")?;
    f.sync_all().context("sync the rootfs image")?;
    Ok(())
}

/// `(state, ppid)` of `pid` from `/proc/<pid>/stat`.
fn stat_state_ppid(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Live (non-zombie) processes other than this one with `needle` in their
/// command line.
pub fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .filter(|&pid| matches!(stat_state_ppid(pid), Some((s, _)) if s != 'Z' && s != 'X'))
        .collect()
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    matches!(stat_state_ppid(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

/// Reaps this process's zombie children, except the daemon (whose
/// `Child` handle reaps it). Only called where no other code of the bench
/// is waiting for a child of its own (between steps, never during the
/// bare variant's `nft` runs), so it never steals an exit status someone
/// expects. Returns how many it reaped.
pub fn reap_orphans() -> usize {
    let me = std::process::id();
    let daemon = owned().as_ref().and_then(|o| o.daemon);
    let mut n = 0;
    for pid in pids() {
        if Some(pid) == daemon {
            continue;
        }
        if let Some(('Z', ppid)) = stat_state_ppid(pid)
            && ppid == me
            && let Some(p) = Pid::from_raw(pid as i32)
            && rustix::process::waitpid(Some(p), WaitOptions::NOHANG).is_ok()
        {
            n += 1;
        }
    }
    n
}

/// Waits (up to `timeout`) until `pid` is gone or a zombie, then reaps it
/// if it is ours.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(p) = Pid::from_raw(pid as i32)
        && matches!(stat_state_ppid(pid), Some(('Z', ppid)) if ppid == std::process::id())
    {
        let _ = rustix::process::waitpid(Some(p), WaitOptions::NOHANG);
    }
    true
}

/// SIGKILLs `pid` (absent is fine).
pub fn sigkill(pid: u32) {
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, Signal::KILL);
    }
}

/// What [`cleanup`] did.
#[derive(Debug, Default)]
pub struct CleanupReport {
    /// Processes that were still running and had to be killed.
    pub killed: usize,
    /// Steps that failed.
    pub errors: Vec<String>,
}

/// Removes everything the bench made; runs once (later calls wait for it
/// to finish, then do nothing). Order matters: processes first (a namespace
/// with a process in it outlives `ip netns del`, taps and all), then the
/// namespaces, then the files.
pub fn cleanup() -> CleanupReport {
    let _cleaning = CLEANING.lock().unwrap_or_else(|p| p.into_inner());
    let mut report = CleanupReport::default();
    let Some(o) = owned().take() else {
        return report;
    };
    if let Some(pid) = o.daemon {
        sigkill(pid);
        report.killed += 1;
    }
    // Until two scans 50 ms apart find nothing: a step of the main thread
    // that was under way (a shell script, a bare start) may still spawn
    // one more process after a scan.
    let mut quiet = 0;
    for _ in 0..200 {
        let left = processes_mentioning(&o.tmp);
        if left.is_empty() {
            quiet += 1;
            if quiet == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        quiet = 0;
        for pid in left {
            sigkill(pid);
            report.killed += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
        reap_orphans();
    }
    // The daemon too, now that it is dead.
    if let Some(pid) = o.daemon
        && let Some(p) = Pid::from_raw(pid as i32)
    {
        let _ = rustix::process::waitpid(Some(p), WaitOptions::NOHANG);
    }
    reap_orphans();
    let left = processes_mentioning(&o.tmp);
    if !left.is_empty() {
        report
            .errors
            .push(format!("processes still running after SIGKILL: {left:?}"));
    }
    for ns in &o.netns {
        if Path::new("/run/netns").join(ns).exists()
            && let Err(e) = ip(&["netns", "del", ns])
        {
            report.errors.push(format!("{e:#}"));
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&o.tmp)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        report
            .errors
            .push(format!("remove {}: {e}", o.tmp.display()));
    }
    report
}

/// Runs [`cleanup`] when dropped: covers early returns and panics in
/// `main`.
#[derive(Debug)]
pub struct CleanupGuard;

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        let r = cleanup();
        for e in &r.errors {
            eprintln!("hearth-bench: cleanup: {e}");
        }
    }
}

/// Starts a thread that, on SIGINT, SIGTERM or SIGHUP, cleans up and exits
/// with status 130. The handlers are installed before this returns.
pub fn install_signal_cleanup() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("signal runtime")?;
    let mut signals = rt.block_on(async {
        Ok::<_, std::io::Error>([
            (signal(SignalKind::interrupt())?, "SIGINT"),
            (signal(SignalKind::terminate())?, "SIGTERM"),
            (signal(SignalKind::hangup())?, "SIGHUP"),
        ])
    })?;
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            let name = rt.block_on(async {
                let [(a, an), (b, bn), (c, cn)] = &mut signals;
                tokio::select! {
                    _ = a.recv() => *an,
                    _ = b.recv() => *bn,
                    _ = c.recv() => *cn,
                }
            });
            ABORTING.store(true, Ordering::Relaxed);
            eprintln!("\nhearth-bench: {name}: removing everything the bench made");
            let r = cleanup();
            for e in &r.errors {
                eprintln!("hearth-bench: cleanup: {e}");
            }
            let _ = std::io::stderr().flush();
            std::process::exit(130);
        })
        .context("spawn the signal thread")?;
    Ok(())
}

/// Makes the bench the reaper of its orphaned descendants and lifts the
/// open-files limit to its hard maximum (1,000 VMs cost hearthd a pidfd
/// each, and the shell variant's tools inherit the limit).
pub fn prepare_process() -> anyhow::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .context("PR_SET_CHILD_SUBREAPER")?;
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = lim.maximum {
        let want = rustix::process::Rlimit {
            current: Some(max),
            maximum: Some(max),
        };
        rustix::process::setrlimit(rustix::process::Resource::Nofile, want)
            .context("raise RLIMIT_NOFILE")?;
    }
    Ok(())
}

/// Whether `program` is on `PATH`.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(program);
            f.is_file()
        })
    })
}
