//! Drives the built `hearth-testvmm` binary over its API socket, the way
//! hearthd drives Firecracker: raw HTTP/1.1 over a Unix stream, the child's
//! stdout redirected to a console file. Every child is SIGKILLed when its
//! guard drops, whatever the test's outcome.

// Test helpers, not only #[test] functions, panic on any failure by design;
// clippy's allow-unwrap-in-tests covers only the latter.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-testvmm");

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hearth-test-")
        .tempdir()
        .unwrap()
}

/// A running stand-in; SIGKILLed and reaped on drop.
struct Vmm {
    child: Child,
    sock: PathBuf,
    console: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmm {
    fn spawn(dir: &Path, env: &[(&str, &str)]) -> Vmm {
        Self::spawn_with(dir, env, |_| {})
    }

    fn spawn_with(dir: &Path, env: &[(&str, &str)], tweak: impl FnOnce(&mut Command)) -> Vmm {
        let sock = dir.join("api.sock");
        let console = dir.join("console.log");
        let mut cmd = Command::new(BIN);
        cmd.args(["--api-sock"])
            .arg(&sock)
            .args(["--id", "vm-test-1"])
            .current_dir(dir)
            .env_remove("HEARTH_TESTVMM_CRASH")
            .env_remove("HEARTH_TESTVMM_HANG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(File::create(&console).unwrap())
            .stderr(File::create(dir.join("stderr.log")).unwrap());
        tweak(&mut cmd);
        let child = cmd.spawn().unwrap();
        let mut vmm = Vmm {
            child,
            sock,
            console,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while UnixStream::connect(&vmm.sock).is_err() {
            if let Some(status) = vmm.child.try_wait().unwrap() {
                panic!("hearth-testvmm exited early: {status}");
            }
            assert!(Instant::now() < deadline, "API socket never came up");
            std::thread::sleep(Duration::from_millis(1));
        }
        vmm
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        let mut conn = Conn::open(&self.sock).unwrap();
        conn.call(method, path, body).unwrap()
    }

    fn put(&self, path: &str, body: &str) -> Resp {
        self.call("PUT", path, Some(body))
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {within:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap()
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn fault(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body));
        v["fault_message"].as_str().unwrap().to_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn open(sock: &Path) -> io::Result<Conn> {
        let stream = UnixStream::connect(sock)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Conn {
            reader: BufReader::new(stream),
        })
    }

    fn call(&mut self, method: &str, path: &str, body: Option<&str>) -> io::Result<Resp> {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        self.reader.get_mut().write_all(req.as_bytes())?;

        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok(Resp {
            status,
            headers,
            body: String::from_utf8(body).unwrap(),
        })
    }
}

fn write_guest(dir: &Path) -> PathBuf {
    let path = dir.join("vmlinux");
    let status = Command::new(BIN)
        .arg("--write-test-guest")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

fn write_disk(dir: &Path) -> PathBuf {
    let path = dir.join("rootfs.ext4");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

fn boot_source(kernel: &Path) -> String {
    serde_json::json!({
        "kernel_image_path": kernel,
        "boot_args": "console=ttyS0 reboot=k panic=1"
    })
    .to_string()
}

fn start(vmm: &Vmm) -> Resp {
    vmm.put("/actions", r#"{"action_type": "InstanceStart"}"#)
}

fn configured(dir: &Path, env: &[(&str, &str)]) -> Vmm {
    let kernel = write_guest(dir);
    let disk = write_disk(dir);
    let vmm = Vmm::spawn(dir, env);
    assert_eq!(vmm.put("/boot-source", &boot_source(&kernel)).status, 204);
    let drive = serde_json::json!({
        "drive_id": "rootfs", "path_on_host": disk, "is_root_device": true, "is_read_only": false
    });
    assert_eq!(vmm.put("/drives/rootfs", &drive.to_string()).status, 204);
    vmm
}

#[test]
fn happy_path_boot_and_ctrl_alt_del() {
    let dir = tempdir();
    let d = dir.path();
    let kernel = write_guest(d);
    let disk = write_disk(d);
    let mut vmm = Vmm::spawn(d, &[]);

    let info = vmm.call("GET", "/", None);
    assert_eq!(info.status, 200);
    assert_eq!(info.header("server"), Some("Firecracker API"));
    assert_eq!(
        info.json(),
        serde_json::json!({
            "id": "vm-test-1", "state": "Not started",
            "vmm_version": "1.16.1-hearth-testvmm", "app_name": "Firecracker"
        })
    );
    let version = vmm.call("GET", "/version", None);
    assert_eq!(
        version.json(),
        serde_json::json!({"firecracker_version": "1.16.1-hearth-testvmm"})
    );

    let log_path = d.join("firecracker.log");
    let metrics_path = d.join("metrics.json");
    let logger = serde_json::json!({
        "log_path": log_path, "level": "Info", "show_level": true, "show_log_origin": false
    });
    let r = vmm.put("/logger", &logger.to_string());
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    assert!(log_path.exists(), "PUT /logger creates the log file");
    let metrics = serde_json::json!({ "metrics_path": metrics_path });
    assert_eq!(vmm.put("/metrics", &metrics.to_string()).status, 204);
    assert!(
        metrics_path.exists(),
        "PUT /metrics creates the metrics file"
    );
    assert_eq!(
        vmm.put(
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}"#
        )
        .status,
        204
    );
    assert_eq!(vmm.put("/boot-source", &boot_source(&kernel)).status, 204);
    let drive = serde_json::json!({
        "drive_id": "rootfs", "path_on_host": disk, "is_root_device": true, "is_read_only": false
    });
    assert_eq!(vmm.put("/drives/rootfs", &drive.to_string()).status, 204);
    assert_eq!(start(&vmm).status, 204);

    let info = vmm.call("GET", "/", None);
    assert_eq!(info.json()["state"], "Running");
    let console = vmm.console();
    assert!(console.contains("no guest is running"), "{console}");
    assert!(
        console.contains(
            "Kernel command line: console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw"
        ),
        "{console}"
    );
    assert!(
        console.contains("hearth test guest: hello from a kernel-less guest"),
        "{console}"
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains(
            "[vm-test-1:fc_api:INFO] The API server received a Put request on \"/actions\""
        ),
        "{log}"
    );
    let first_metrics = std::fs::read_to_string(&metrics_path).unwrap();
    let line: serde_json::Value =
        serde_json::from_str(first_metrics.lines().next().unwrap()).unwrap();
    assert!(line["utc_timestamp_ms"].as_u64().unwrap() > 0);

    // After boot: pre-boot-only calls are refused, metrics can be flushed.
    let r = vmm.put(
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "The requested operation is not supported after starting the microVM."
    );
    assert_eq!(
        vmm.put("/actions", r#"{"action_type": "FlushMetrics"}"#)
            .status,
        204
    );

    let r = vmm.put("/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    assert_eq!(r.status, 204);
    let status = vmm.wait_exit(Duration::from_secs(2));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(vmm.console().contains("Ctrl+Alt+Del received"));
    assert!(
        vmm.sock.exists(),
        "like Firecracker, the socket file is left behind"
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("Firecracker exiting successfully. exit_code=0"),
        "{log}"
    );
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let dir = tempdir();
    let vmm = Vmm::spawn(dir.path(), &[]);
    let mut conn = Conn::open(&vmm.sock).unwrap();
    for _ in 0..5 {
        assert_eq!(conn.call("GET", "/", None).unwrap().status, 200);
        let r = conn.call(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 0, "mem_size_mib": 128}"#),
        );
        assert_eq!(r.unwrap().status, 400);
    }
}

#[test]
fn refuses_an_existing_socket_path() {
    let dir = tempdir();
    let sock = dir.path().join("api.sock");
    std::fs::write(&sock, b"not a socket").unwrap();
    let out = Command::new(BIN)
        .arg("--api-sock")
        .arg(&sock)
        .args(["--id", "vm-1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FailedToBindSocket"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Failed to open the API socket at: ")
            && stdout.contains("Check that it is not already used."),
        "{stdout}"
    );
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
}

#[test]
fn instance_start_before_boot_source_is_refused() {
    let dir = tempdir();
    let vmm = Vmm::spawn(dir.path(), &[]);
    let r = start(&vmm);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "Start microvm error: Cannot start microvm without kernel configuration."
    );
    let r = vmm.put("/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "The requested operation is not supported before starting the microVM."
    );
    assert_eq!(vmm.call("GET", "/", None).json()["state"], "Not started");
}

#[test]
fn second_instance_start_is_refused() {
    let dir = tempdir();
    let vmm = configured(dir.path(), &[]);
    assert_eq!(start(&vmm).status, 204);
    let r = start(&vmm);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "The requested operation is not supported after starting the microVM."
    );
}

#[test]
fn bad_machine_config_is_refused() {
    let dir = tempdir();
    let vmm = Vmm::spawn(dir.path(), &[]);
    for body in [
        r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
        r#"{"vcpu_count": 33, "mem_size_mib": 128}"#,
        r#"{"vcpu_count": 3, "mem_size_mib": 128, "smt": true}"#,
    ] {
        let r = vmm.put("/machine-config", body);
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(
            r.fault(),
            "Machine config error: The number of vCPUs must be greater than 0, less than 32 and \
             must be 1 or an even number if SMT is enabled.",
            "{body}"
        );
    }
    let r = vmm.put("/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 0}"#);
    assert_eq!(
        r.fault(),
        "Machine config error: The memory size (MiB) is either 0, or not a multiple of the \
         configured page size."
    );
    let r = vmm.put("/machine-config", "{not json");
    assert_eq!(r.status, 400);
    assert!(
        r.fault()
            .starts_with("An error occurred when deserializing the json body of a request: "),
        "{}",
        r.fault()
    );
}

#[test]
fn missing_files_are_refused() {
    let dir = tempdir();
    let vmm = Vmm::spawn(dir.path(), &[]);
    let missing = dir.path().join("no-such-kernel");
    let r = vmm.put("/boot-source", &boot_source(&missing));
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"
    );
    let body = serde_json::json!({
        "drive_id": "rootfs", "path_on_host": missing, "is_root_device": true, "is_read_only": false
    });
    let r = vmm.put("/drives/rootfs", &body.to_string());
    assert_eq!(r.status, 400);
    assert!(
        r.fault().starts_with(
            "Drive config error: Unable to create the virtio block device: Virtio backend \
             error: Error manipulating the backing file: No such file or directory (os error 2)"
        ),
        "{}",
        r.fault()
    );
    let r = vmm.put("/drives/other", &body.to_string());
    assert_eq!(
        r.fault(),
        "The id from the path does not match the id from the body!"
    );
}

#[test]
fn unknown_paths_and_methods_are_refused() {
    let dir = tempdir();
    let vmm = Vmm::spawn(dir.path(), &[]);
    let r = vmm.call("GET", "/nope", None);
    assert_eq!(r.status, 400);
    assert_eq!(r.fault(), "Invalid request method and/or path: GET nope.");
    let r = vmm.call("POST", "/", None);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("Invalid HTTP Method"), "{}", r.body);
    let r = vmm.call("PUT", "/actions", None);
    assert_eq!(r.fault(), "Empty PUT request.");
    let big = format!(r#"{{"x": "{}"}}"#, "a".repeat(60_000));
    let r = vmm.put("/logger", &big);
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("is larger than the limit of 51200"),
        "{}",
        r.body
    );
}

#[test]
fn crash_after_start() {
    let dir = tempdir();
    let mut vmm = configured(dir.path(), &[("HEARTH_TESTVMM_CRASH", "after-start:100")]);
    let t0 = Instant::now();
    assert_eq!(start(&vmm).status, 204);
    assert_eq!(vmm.call("GET", "/", None).json()["state"], "Running");
    let status = vmm.wait_exit(Duration::from_secs(3));
    assert!(t0.elapsed() >= Duration::from_millis(100));
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
}

#[test]
fn crash_before_start_does_not_answer() {
    let dir = tempdir();
    let mut vmm = configured(dir.path(), &[("HEARTH_TESTVMM_CRASH", "before-start")]);
    let mut conn = Conn::open(&vmm.sock).unwrap();
    let r = conn.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert!(r.is_err(), "answered: {r:?}");
    let status = vmm.wait_exit(Duration::from_secs(3));
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
}

#[test]
fn crash_on_put() {
    let dir = tempdir();
    let kernel = write_guest(dir.path());
    let mut vmm = Vmm::spawn(
        dir.path(),
        &[("HEARTH_TESTVMM_CRASH", "on-put:/boot-source")],
    );
    assert_eq!(
        vmm.put(
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128}"#
        )
        .status,
        204
    );
    let mut conn = Conn::open(&vmm.sock).unwrap();
    assert!(
        conn.call("PUT", "/boot-source", Some(&boot_source(&kernel)))
            .is_err()
    );
    let status = vmm.wait_exit(Duration::from_secs(3));
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
}

#[test]
fn hang_after_start_stops_answering() {
    let dir = tempdir();
    let mut vmm = configured(dir.path(), &[("HEARTH_TESTVMM_HANG", "after-start:50")]);
    assert_eq!(start(&vmm).status, 204);
    std::thread::sleep(Duration::from_millis(80));
    let stream = UnixStream::connect(&vmm.sock).expect("still accepts connections");
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut conn = Conn {
        reader: BufReader::new(stream),
    };
    let err = conn.call("GET", "/", None).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{err:?}"
    );
    assert!(vmm.child.try_wait().unwrap().is_none(), "hung, not dead");
}

#[test]
fn sigterm_kills_like_firecracker() {
    let dir = tempdir();
    let mut vmm = Vmm::spawn(dir.path(), &[]);
    let pid = vmm.child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own, not yet reaped, child's pid.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = vmm.wait_exit(Duration::from_secs(2));
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
}

#[test]
fn command_line_errors() {
    let out = Command::new(BIN).arg("--bogus").output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(153),
        "Firecracker's ArgParsing code"
    );
    let dir = tempdir();
    let out = Command::new(BIN)
        .arg("--api-sock")
        .arg(dir.path().join("s"))
        .args(["--id", "has_underscore"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "Firecracker panics"
    );
    assert!(!dir.path().join("s").exists());
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.starts_with("TEST STAND-IN for Firecracker"), "{help}");
    assert!(help.contains("HEARTH_TESTVMM_CRASH") && help.contains("HEARTH_TESTVMM_HANG"));
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .starts_with("hearth-testvmm ")
    );
}

/// Privileged: attaches real taps. Runs the stand-in in a fresh network
/// namespace of its own, so every tap it creates lives and dies with it and
/// the host namespace never sees one.
#[test]
fn network_interfaces_attach_taps() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var_os("HEARTH_SKIP_PRIVILEGED").is_some() {
            eprintln!("skipped (HEARTH_SKIP_PRIVILEGED is set): needs root");
            return;
        }
        panic!(
            "this test needs root (it creates taps in a private network namespace); \
             set HEARTH_SKIP_PRIVILEGED=1 to skip it explicitly"
        );
    }
    let dir = tempdir();
    let tap = format!("hthtv{}", std::process::id() % 100_000);
    let vmm = Vmm::spawn_with(dir.path(), &[], |cmd| {
        // SAFETY: unshare(2) is async-signal-safe and touches only the
        // child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let net_dev = format!("/proc/{}/net/dev", vmm.child.id());
    let body = |id: &str, dev: &str, mac: &str| {
        serde_json::json!({"iface_id": id, "host_dev_name": dev, "guest_mac": mac}).to_string()
    };

    let r = vmm.put(
        "/network-interfaces/eth0",
        &body("eth0", &tap, "06:00:ac:10:00:02"),
    );
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    let devs = std::fs::read_to_string(&net_dev).unwrap();
    assert!(devs.contains(&format!("{tap}:")), "{devs}");
    assert!(
        !Path::new("/sys/class/net").join(&tap).exists(),
        "not in the host namespace"
    );

    let r = vmm.put(
        "/network-interfaces/eth1",
        &body("eth1", &tap, "06:00:ac:10:00:03"),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.fault().starts_with(
            "Network config error: Could not create the network device: Open tap device \
             failed: Error while creating ifreq structure: Device or resource busy (os error 16)."
        ),
        "{}",
        r.fault()
    );
    let r = vmm.put(
        "/network-interfaces/eth1",
        &body("eth1", "hthx", "06:00:ac:10:00:02"),
    );
    assert_eq!(
        r.fault(),
        "Network config error: The MAC address is already in use: 06:00:ac:10:00:02"
    );
    let r = vmm.put(
        "/network-interfaces/eth1",
        &body("eth1", "hth-much-too-long", "06:00:ac:10:00:04"),
    );
    assert_eq!(
        r.fault(),
        "Network config error: Could not create the network device: Open tap device failed: \
         Invalid interface name"
    );
    // Replacing eth0 with the same tap works: the old one is released first.
    let r = vmm.put(
        "/network-interfaces/eth0",
        &body("eth0", &tap, "06:00:ac:10:00:02"),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    drop(vmm);
    assert!(!Path::new("/sys/class/net").join(&tap).exists());
}
