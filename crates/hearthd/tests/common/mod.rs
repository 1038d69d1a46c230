//! Harness for the privileged integration tests: the real `hearthd`
//! binary, the real `hearth` CLI, `hearth-testvmm` (or whatever VMM
//! `HEARTH_TEST_VMM` names), in a network namespace of its own named
//! `hearth-…`, with a state dir under a temp dir named `hearth-test-…`.
//!
//! Everything a test starts is torn down by [`TestEnv`]'s `Drop`, even when
//! an assertion fails: the daemon, every process whose command line names
//! the state dir, and the namespace.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hearth_api::client::{HttpMethod, request};

/// The opt-out for machines where root is not available. Without it a
/// privileged test fails loudly when not run as root.
pub const SKIP_ENV: &str = "HEARTH_SKIP_PRIVILEGED";

/// True when the test should run; panics when it cannot and nobody opted
/// out explicitly.
pub fn require_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var_os(SKIP_ENV).is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: privileged test, not root, and {SKIP_ENV}=1 opts out");
        return false;
    }
    panic!(
        "this integration test needs root (network namespaces, VMM processes); \
         run it as root, or set {SKIP_ENV}=1 to skip privileged tests explicitly"
    );
}

/// A sibling binary of `hearthd` in the target dir.
pub fn bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_hearthd"))
        .parent()
        .unwrap()
        .join(name)
}

/// The VMM the suite runs: `HEARTH_TEST_VMM`, else hearth-testvmm.
pub fn vmm_binary() -> PathBuf {
    std::env::var_os("HEARTH_TEST_VMM")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin("hearth-testvmm"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One isolated hearth host.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    /// Where hearthd runs: the "host".
    pub netns: String,
    /// Beyond the host's uplink: the "internet" ([`OUTER_IP`]).
    pub outer_ns: String,
    /// Replaces the VMM binary for this env's daemon.
    pub vmm_override: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub daemon: Option<Child>,
    pub daemon_env: Vec<(String, String)>,
    rt: tokio::runtime::Runtime,
}

impl TestEnv {
    /// A fresh namespace, state dir, test kernel and rootfs. `tag` keeps
    /// namespace names unique across tests running in parallel.
    pub fn new(tag: &str) -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .unwrap();
        let netns = format!("hearth-{tag}-{}", std::process::id());
        let outer_ns = format!("{netns}-out");
        for ns in [&netns, &outer_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            run(Command::new("ip").args(["netns", "add", ns]));
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
        }
        // The host's uplink: a veth pair (this kernel has no dummy driver)
        // from the host namespace to the outer one, with the default route.
        run(Command::new("ip").args([
            "-n", &netns, "link", "add", UPLINK, "type", "veth", "peer", "name", "hthx0", "netns",
            &outer_ns,
        ]));
        run(Command::new("ip").args([
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{HOST_UPLINK_IP}/24"),
            "dev",
            UPLINK,
        ]));
        run(Command::new("ip").args(["-n", &netns, "link", "set", UPLINK, "up"]));
        run(Command::new("ip").args(["-n", &netns, "route", "add", "default", "via", OUTER_IP]));
        run(Command::new("ip").args([
            "-n",
            &outer_ns,
            "addr",
            "add",
            &format!("{OUTER_IP}/24"),
            "dev",
            "hthx0",
        ]));
        run(Command::new("ip").args(["-n", &outer_ns, "link", "set", "hthx0", "up"]));
        let kernel = dir.path().join("vmlinux.bin");
        run(Command::new(bin("hearth-testvmm"))
            .arg("--write-test-guest")
            .arg(&kernel));
        let rootfs = dir.path().join("rootfs.ext4");
        std::fs::File::create(&rootfs)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let state_dir = dir.path().join("state");
        let socket = dir.path().join("hearth.sock");
        TestEnv {
            dir,
            netns,
            outer_ns,
            vmm_override: None,
            state_dir,
            socket,
            kernel,
            rootfs,
            daemon: None,
            daemon_env: Vec::new(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// Starts `hearthd` in the namespace and waits for its socket.
    pub fn start_daemon(&mut self) {
        if let Err(st) = self.try_start_daemon() {
            panic!("hearthd exited at start ({st}):\n{}", self.daemon_log());
        }
    }

    /// Spawns `hearthd` in the namespace (with [`TestEnv::daemon_env`])
    /// without waiting for it to serve.
    pub fn spawn_daemon(&mut self) {
        assert!(self.daemon.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("hearthd.log"))
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(env!("CARGO_BIN_EXE_hearthd"))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--vmm-binary")
            .arg(self.vmm_override.clone().unwrap_or_else(vmm_binary))
            .env("HEARTH_CONFIG", "/dev/null")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.daemon_env {
            cmd.env(k, v);
        }
        self.daemon = Some(cmd.spawn().unwrap());
    }

    /// Starts `hearthd` and waits for its socket; returns its exit status
    /// instead when it exits first (a daemon that refuses to start, or one
    /// armed to fail while it starts). Panics if it neither serves nor
    /// exits within 10 s.
    pub fn try_start_daemon(&mut self) -> Result<(), std::process::ExitStatus> {
        self.spawn_daemon();
        let start = Instant::now();
        loop {
            if let Some(st) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                self.daemon = None;
                return Err(st);
            }
            if self.try_api("GET", "/v1/health", None).is_some() {
                return Ok(());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "hearthd did not answer:\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the daemon to exit on its own; returns its
    /// exit status, or `None` if it is still running.
    pub fn wait_daemon_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let st = self.daemon.as_mut()?.try_wait().unwrap();
            if let Some(st) = st {
                self.daemon = None;
                return Some(st);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the daemon (not its VMs).
    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    /// SIGTERMs the daemon and waits for it.
    pub fn stop_daemon(&mut self) -> std::process::ExitStatus {
        let mut d = self.daemon.take().expect("daemon running");
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(d.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        d.wait().unwrap()
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hearthd.log")).unwrap_or_default()
    }

    /// Runs the CLI against this daemon.
    pub fn hearth(&self, args: &[&str]) -> Output {
        Command::new(bin("hearth"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env("HEARTH_CONFIG", "/dev/null")
            .output()
            .unwrap()
    }

    /// Runs the CLI and insists it succeeds; returns stdout.
    pub fn hearth_ok(&self, args: &[&str]) -> String {
        let out = self.hearth(args);
        assert!(
            out.status.success(),
            "hearth {args:?} failed: {}{}\n--- hearthd log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn try_api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Option<(u16, serde_json::Value)> {
        let method = HttpMethod::from_bytes(method.as_bytes()).unwrap();
        let body = body.map(|b| b.to_string().into_bytes());
        let resp = self
            .rt
            .block_on(request(&self.socket, method, path, body))
            .ok()?;
        let json = serde_json::from_slice(&resp.body).unwrap_or(serde_json::Value::Null);
        Some((resp.status.as_u16(), json))
    }

    /// One HTTP call to the daemon.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        self.try_api(method, path, body)
            .unwrap_or_else(|| panic!("daemon unreachable for {method} {path}"))
    }

    /// One HTTP call to the daemon; the body as text.
    pub fn raw(&self, method: &str, path: &str) -> String {
        let method = HttpMethod::from_bytes(method.as_bytes()).unwrap();
        let resp = self
            .rt
            .block_on(request(&self.socket, method, path, None))
            .unwrap();
        String::from_utf8(resp.body.to_vec()).unwrap()
    }

    /// A create request body for this env's kernel and rootfs.
    pub fn create_body(&self, name: &str) -> serde_json::Value {
        serde_json::json!({"name": name, "spec": {
            "vcpus": 1, "memory_mib": 128,
            "kernel": self.kernel, "rootfs": self.rootfs}})
    }

    /// The VM as the API reports it.
    pub fn vm(&self, name: &str) -> serde_json::Value {
        let (s, v) = self.api("GET", &format!("/v1/vms/{name}"), None);
        assert_eq!(s, 200, "{v}");
        v
    }

    /// Polls until `name` is in `state`.
    pub fn wait_state(&self, name: &str, state: &str) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let vm = self.vm(name);
            if vm["state"] == state {
                return vm;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{name} never reached {state}: {vm}\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Live processes whose command line mentions this env's dir.
    pub fn processes(&self) -> Vec<u32> {
        processes_mentioning(self.dir.path())
    }

    /// Entries of `<state>/vms`.
    pub fn vm_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.state_dir.join("vms")) {
            Ok(d) => d.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Live (non-zombie) processes with `needle` in their command line.
pub fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        if !zombie && cmd.windows(needle.len()).any(|w| w == needle) {
            out.push(pid);
        }
    }
    out
}

/// True when `pid` is alive (not a zombie).
pub fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.kill_daemon();
        for pid in self.processes() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32).unwrap(),
                rustix::process::Signal::KILL,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for ns in [&self.netns, &self.outer_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The host's uplink in [`TestEnv::netns`].
pub const UPLINK: &str = "hthu0";
/// The host's address on its uplink.
pub const HOST_UPLINK_IP: &str = "192.0.2.1";
/// The far end of the uplink, in [`TestEnv::outer_ns`].
pub const OUTER_IP: &str = "192.0.2.2";

/// Runs `f` on a thread inside network namespace `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Runs a command inside namespace `ns`; returns stdout, asserting success.
pub fn ns_cmd(ns: &str, args: &[&str]) -> String {
    let out = run(Command::new("ip").args(["netns", "exec", ns]).args(args));
    String::from_utf8(out.stdout).unwrap()
}

/// Sends `line` to `addr` over TCP and reads one line back.
pub fn tcp_line(addr: &str, line: &str) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(line.as_bytes())?;
    let mut r = std::io::BufReader::new(s);
    let mut out = String::new();
    r.read_line(&mut out)?;
    Ok(out)
}

/// Ids of the VMs that have elements marked `hearth:vm:<id>` in hearth's
/// nft table in namespace `ns`, sorted (the firewall's ownership marks).
pub fn marked_vms(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "table", "ip", "hearth"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ids: Vec<String> = text
        .split("comment \"hearth:vm:")
        .skip(1)
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Puts an element marked for VM `vm_id` in hearth's table behind
/// hearthd's back (making the table and set if need be): an orphan for
/// the sweep to find.
pub fn plant_marked_element(ns: &str, vm_id: &str, tap: &str) {
    let script = format!(
        "add table ip hearth\nadd set ip hearth dnat_taps {{ type ifname; }}\n\
         add element ip hearth dnat_taps {{ \"{tap}\" comment \"hearth:vm:{vm_id}\" }}\n"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{script}");
}
