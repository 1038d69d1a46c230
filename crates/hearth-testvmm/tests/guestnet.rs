//! The stand-in playing the guest's network stack (`src/guestnet.rs`),
//! driven from the host side of its tap, as hearth's integration tests
//! will: ping, TCP and UDP echo, and `CONNECT` to a listener on the host.
//!
//! Privileged: everything happens in a throw-away network namespace
//! `hearth-tv<pid>` holding the tap `hthtv<n>`; guards delete both, and
//! kill the stand-in, whatever the outcome. Needs `ip` (iproute2) and
//! `ping` (iputils-ping).

// Test helpers, not only #[test] functions, panic on any failure by design.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-testvmm");
const HOST_IP: &str = "10.231.0.5";
const GUEST_IP: &str = "10.231.0.6";
const MAC: &str = "06:00:ac:10:00:02";
const TIMEOUT: Duration = Duration::from_secs(5);

fn needs_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("HEARTH_SKIP_PRIVILEGED").is_some() {
        eprintln!("skipped (HEARTH_SKIP_PRIVILEGED is set): needs root");
        return false;
    }
    panic!(
        "this test needs root (it creates a network namespace and a tap); \
         set HEARTH_SKIP_PRIVILEGED=1 to skip it explicitly"
    );
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a tap in it; both deleted on drop.
struct Netns {
    name: String,
    tap: String,
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id();
        let ns = Netns {
            name: format!("hearth-tv{id}"),
            tap: format!("hthtv{}", id % 100_000),
        };
        run(Command::new("ip").args(["netns", "add", &ns.name]));
        let ip = |args: &[&str]| run(Command::new("ip").args(["-n", &ns.name]).args(args));
        ip(&["tuntap", "add", "dev", &ns.tap, "mode", "tap", "vnet_hdr"]);
        ip(&["addr", "add", &format!("{HOST_IP}/30"), "dev", &ns.tap]);
        ip(&["link", "set", &ns.tap, "up"]);
        ns
    }

    /// `argv` run inside the namespace.
    fn exec(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace; sockets it
    /// creates stay in the namespace wherever they are used afterwards.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).unwrap();
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.name, "link", "del", &self.tap])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The stand-in; SIGKILLed and reaped on drop.
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One request on a fresh API connection; returns the status code.
fn put(sock: &Path, path: &str, body: &str) -> u16 {
    let mut stream = UnixStream::connect(sock).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        stream,
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut status = String::new();
    BufReader::new(stream).read_line(&mut status).unwrap();
    status.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn connect_echo(ns: &Netns) -> BufReader<TcpStream> {
    let stream = ns.enter(|| TcpStream::connect_timeout(&echo_addr(), TIMEOUT).unwrap());
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    BufReader::new(stream)
}

fn echo_addr() -> SocketAddr {
    SocketAddr::from((GUEST_IP.parse::<Ipv4Addr>().unwrap(), 7))
}

/// Sends `line` and reads one line back.
fn exchange(conn: &mut BufReader<TcpStream>, line: &str) -> String {
    conn.get_mut().write_all(line.as_bytes()).unwrap();
    let mut back = String::new();
    conn.read_line(&mut back).unwrap();
    back
}

#[test]
fn guest_network_answers_on_the_tap() {
    if !needs_root() {
        return;
    }
    let ns = Netns::new();
    let dir = tempfile::Builder::new()
        .prefix("hearth-test-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let (sock, console, kernel) = (d.join("api.sock"), d.join("console"), d.join("vmlinux"));
    run(Command::new(BIN).arg("--write-test-guest").arg(&kernel));
    let _vmm = Vmm(ns
        .exec(&[
            BIN,
            "--api-sock",
            sock.to_str().unwrap(),
            "--id",
            "vm-net-1",
        ])
        .stdin(Stdio::null())
        .stdout(File::create(&console).unwrap())
        .spawn()
        .unwrap());
    wait_for("the API socket", || UnixStream::connect(&sock).is_ok());

    let boot = serde_json::json!({
        "kernel_image_path": kernel,
        "boot_args": format!(
            "console=ttyS0 reboot=k ip={GUEST_IP}::{HOST_IP}:255.255.255.252::eth0:off"
        ),
    });
    assert_eq!(put(&sock, "/boot-source", &boot.to_string()), 204);
    let net = serde_json::json!({"iface_id": "eth0", "host_dev_name": ns.tap, "guest_mac": MAC});
    assert_eq!(
        put(&sock, "/network-interfaces/eth0", &net.to_string()),
        204
    );
    assert_eq!(
        put(&sock, "/actions", r#"{"action_type": "InstanceStart"}"#),
        204
    );
    let banner =
        format!("hearth-testvmm: guest network eth0 {GUEST_IP}/30 gw {HOST_IP} mac {MAC}: up\n");
    wait_for("the network banner", || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.contains(&banner))
    });

    // ARP and ICMP echo.
    let ping = ns.exec(&["ping", "-c1", "-W2", GUEST_IP]).output().unwrap();
    assert!(
        ping.status.success(),
        "ping failed (is iputils-ping installed?): {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );

    // TCP echo, several connections at once, and one after another.
    let mut conns: Vec<_> = (0..3).map(|_| connect_echo(&ns)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(exchange(c, &format!("hello {i}\n")), format!("hello {i}\n"));
    }
    // Bytes without a newline are echoed too, binary ones included.
    let c = &mut conns[0];
    c.get_mut().write_all(&[0, 1, 0xff]).unwrap();
    let mut back = [0u8; 3];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, [0, 1, 0xff]);
    drop(conns);
    for _ in 0..6 {
        let mut c = connect_echo(&ns);
        assert_eq!(exchange(&mut c, "again\n"), "again\n");
    }

    // UDP echo.
    let udp = ns.enter(|| UdpSocket::bind((HOST_IP, 0)).unwrap());
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    udp.send_to(b"datagram", echo_addr()).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = udp.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"datagram"[..], echo_addr()));

    // CONNECT: the guest connects out to a listener on the host.
    let listener = ns.enter(|| TcpListener::bind((HOST_IP, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || {
        let (stream, peer) = listener.accept().unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        stream.read_line(&mut line).unwrap();
        stream.get_mut().write_all(b"welcome\n").unwrap();
        (peer, line)
    });
    let mut c = connect_echo(&ns);
    assert_eq!(
        exchange(&mut c, &format!("CONNECT {HOST_IP}:{port}\n")),
        "OK welcome\n"
    );
    let (peer, line) = accepted.join().unwrap();
    assert_eq!(peer.ip().to_string(), GUEST_IP);
    assert_eq!(line, format!("hello from {GUEST_IP}\n"));
    // The echo connection goes on afterwards; a refused CONNECT says so.
    assert_eq!(exchange(&mut c, "still here\n"), "still here\n");
    let refused = exchange(&mut c, &format!("CONNECT {HOST_IP}:1\n"));
    assert!(refused.starts_with("ERR "), "{refused}");
    assert_eq!(
        exchange(&mut c, "CONNECT nowhere\n"),
        "ERR bad address \"nowhere\"\n"
    );
}
