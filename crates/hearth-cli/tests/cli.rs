//! Runs the built `hearth` binary for what needs no daemon: the message
//! when the daemon is away, `doctor`, `version` and `completions`. The
//! end-to-end tests against a real `hearthd` live with the daemon.

use std::path::PathBuf;
use std::process::{Command, Output};

/// `hearth args…` with no HEARTH_* variables leaking in from the caller.
fn hearth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .env_remove("HEARTH_SOCKET")
        .env_remove("HEARTH_CONFIG")
        .output()
        .expect("run hearth")
}

/// An empty config file (all defaults), so the host's own
/// /etc/hearth/hearth.toml does not matter.
fn empty_config() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hearth-cli-test.toml");
    std::fs::write(&path, "").expect("write config");
    path
}

#[test]
fn unreachable_daemon_is_one_line_and_exit_1() {
    for args in [
        &["--socket", "/nonexistent/hearth-test.sock", "ls"][..],
        &["--socket", "/nonexistent/hearth-test.sock", "start", "web"],
        &[
            "logs",
            "-f",
            "web",
            "--socket",
            "/nonexistent/hearth-test.sock",
        ],
    ] {
        let out = hearth(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "error: cannot reach hearthd at /nonexistent/hearth-test.sock: is it running?\n",
            "{args:?}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn socket_from_env() {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["ls"])
        .env("HEARTH_SOCKET", "/nonexistent/hearth-env.sock")
        .env_remove("HEARTH_CONFIG")
        .output()
        .expect("run hearth");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: cannot reach hearthd at /nonexistent/hearth-env.sock: is it running?\n"
    );
}

#[test]
fn doctor_needs_no_daemon() {
    let config = empty_config();
    let config = config.to_str().expect("utf-8 path");
    let out = hearth(&[
        "--config",
        config,
        "--socket",
        "/nonexistent/hearth-test.sock",
        "doctor",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let checks = report["checks"].as_array().expect("checks");
    for name in ["kvm", "vmm", "tun", "state_dir"] {
        assert!(checks.iter().any(|c| c["name"] == name), "no {name} check");
    }

    let out = hearth(&["--config", config, "doctor"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.contains("kvm")), "{text}");
}

#[test]
fn version_without_daemon() {
    let out = hearth(&["--socket", "/nonexistent/hearth-test.sock", "version"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("hearth   {}\n", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(text.contains("cannot reach hearthd"), "{text}");
}

#[test]
fn completions_go_to_stdout() {
    let out = hearth(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hearth"));
}

#[test]
fn bad_config_is_reported_with_its_cause() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hearth-cli-bad.toml");
    std::fs::write(&path, "stat_dir = \"/x\"\n").expect("write config");
    let out = hearth(&["--config", path.to_str().expect("utf-8"), "ls"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: cannot find hearthd's socket (use --socket)\n"),
        "{err}"
    );
    assert!(err.contains("  caused by: invalid config file"), "{err}");
}

/// A canned stand-in for hearthd on a Unix socket: records each request
/// and answers it from a function. Enough HTTP/1.1 for one request per
/// connection; it lets these tests check what the CLI sends and prints
/// without the real daemon.
mod fake {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    /// One request as the fake saw it.
    #[derive(Debug, Clone)]
    pub struct Request {
        pub method: String,
        pub uri: String,
        pub body: String,
    }

    /// How to answer: status, and the body in chunks (more
    /// than one chunk means `Transfer-Encoding: chunked`).
    pub struct Answer {
        pub status: u16,
        pub chunks: Vec<String>,
    }

    pub fn json(status: u16, body: &str) -> Answer {
        Answer {
            status,
            chunks: vec![body.to_owned()],
        }
    }

    pub struct Daemon {
        pub socket: PathBuf,
        pub seen: Arc<Mutex<Vec<Request>>>,
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.socket);
        }
    }

    pub fn start(tag: &str, answer: impl Fn(&Request) -> Answer + Send + 'static) -> Daemon {
        let socket = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("hearth-fake-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).expect("bind fake socket");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                reader.read_line(&mut line).expect("request line");
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or_default().to_owned();
                let uri = parts.next().unwrap_or_default().to_owned();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).expect("header");
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        len = v.trim().parse().expect("length");
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).expect("body");
                let req = Request {
                    method,
                    uri,
                    body: String::from_utf8(body).expect("utf-8"),
                };
                let a = answer(&req);
                log.lock().expect("lock").push(req);
                let head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", a.status);
                if a.chunks.len() == 1 {
                    let b = &a.chunks[0];
                    let _ = write!(stream, "{head}Content-Length: {}\r\n\r\n{b}", b.len());
                } else {
                    let _ = write!(stream, "{head}Transfer-Encoding: chunked\r\n\r\n");
                    for c in &a.chunks {
                        let _ = write!(stream, "{:x}\r\n{c}\r\n", c.len());
                        let _ = stream.flush();
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    let _ = write!(stream, "0\r\n\r\n");
                }
            }
        });
        Daemon { socket, seen }
    }
}

const VM_ID: &str = "0190f3a2-1b2c-7d4e-8f00-000000000001";

fn vm_json(state: &str) -> String {
    format!(
        r#"{{"id":"{VM_ID}","name":"web","spec":{{"vcpus":2,"memory_mib":256,"kernel":"/k","rootfs":"/r",
        "initrd":null,"kernel_args":"console=ttyS0","capabilities":["nat"]}},"state":"{state}",
        "generation":2,"runtime":{{"pid":77}},"created_at_ms":0,"updated_at_ms":0,"last_error":null}}"#
    )
}

fn hearth_at(daemon: &fake::Daemon, args: &[&str]) -> Output {
    let mut all = vec!["--socket", daemon.socket.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(&all)
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env_remove("HEARTH_SOCKET")
        .env_remove("HEARTH_CONFIG")
        .output()
        .expect("run hearth")
}

fn stdout(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn run_is_create_then_start_with_absolute_paths() {
    let d = fake::start("run", |r| match r.uri.as_str() {
        "/v1/vms" => fake::json(201, &vm_json("created")),
        _ => fake::json(200, &vm_json("running")),
    });
    let out = hearth_at(
        &d,
        &[
            "run",
            "web",
            "--vcpus",
            "2",
            "--memory",
            "256",
            "--kernel",
            "vmlinux",
            "--rootfs",
            "/images/r.ext4",
            "--cap",
            "nat",
        ],
    );
    assert_eq!(stdout(&out), format!("{VM_ID}\nweb running\n"));
    let seen = d.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].uri.as_str()),
        ("POST", "/v1/vms")
    );
    let body: serde_json::Value = serde_json::from_str(&seen[0].body).expect("json");
    let kernel = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vmlinux");
    assert_eq!(body["name"], "web");
    assert_eq!(body["spec"]["kernel"], kernel.to_str().expect("utf-8"));
    assert_eq!(body["spec"]["rootfs"], "/images/r.ext4");
    assert_eq!(body["spec"]["vcpus"], 2);
    assert_eq!(body["spec"]["memory_mib"], 256);
    assert_eq!(body["spec"]["capabilities"], serde_json::json!(["nat"]));
    assert_eq!(
        (seen[1].method.as_str(), seen[1].uri.as_str()),
        ("POST", format!("/v1/vms/{VM_ID}/start").as_str())
    );
}

#[test]
fn ls_table_and_json() {
    let d = fake::start("ls", |_| {
        fake::json(200, &format!("[{}]", vm_json("running")))
    });
    let text = stdout(&hearth_at(&d, &["ls"]));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("NAME  ID             STATE    VCPUS  MEM     PID  AGE"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("web   0190f3a2-1b2c  running  2      256MiB  77   "),
        "{text}"
    );

    let text = stdout(&hearth_at(&d, &["list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v[0]["name"], "web");
    assert!(text.contains("\n  {\n"), "pretty: {text}");
}

#[test]
fn api_errors_print_message_and_chain() {
    let d = fake::start("err", |_| {
        fake::json(
            409,
            r#"{"code":"conflict","message":"cannot start VM web","chain":["it is running"]}"#,
        )
    });
    let out = hearth_at(&d, &["start", "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: cannot start VM web\n  caused by: it is running\n"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn stop_rm_and_kill_send_what_the_flags_say() {
    let d = fake::start("stop", |r| match r.method.as_str() {
        "DELETE" => fake::json(204, ""),
        _ => fake::json(200, &vm_json("stopped")),
    });
    assert_eq!(
        stdout(&hearth_at(&d, &["stop", "web", "--timeout", "3"])),
        "web stopped\n"
    );
    assert_eq!(stdout(&hearth_at(&d, &["kill", "web"])), "web stopped\n");
    assert_eq!(stdout(&hearth_at(&d, &["rm", "--force", "web"])), "web\n");
    assert_eq!(stdout(&hearth_at(&d, &["delete", "web"])), "web\n");
    let seen = d.seen.lock().expect("lock").clone();
    let calls: Vec<(&str, &str)> = seen
        .iter()
        .map(|r| (r.method.as_str(), r.uri.as_str()))
        .collect();
    assert_eq!(
        calls,
        [
            ("POST", "/v1/vms/web/stop"),
            ("POST", "/v1/vms/web/kill"),
            ("DELETE", "/v1/vms/web?force=true"),
            ("DELETE", "/v1/vms/web?force=false"),
        ]
    );
    let stop: serde_json::Value = serde_json::from_str(&seen[0].body).expect("json");
    assert_eq!(stop["timeout_secs"], 3);
}

#[test]
fn logs_follow_streams_chunks() {
    let d = fake::start("logs", |_| fake::Answer {
        status: 200,
        chunks: vec!["boot\n".into(), "login: ".into(), "ok\n".into()],
    });
    let out = hearth_at(&d, &["logs", "-f", "--tail", "5", "web"]);
    assert_eq!(stdout(&out), "boot\nlogin: ok\n");
    let seen = d.seen.lock().expect("lock").clone();
    assert_eq!(seen[0].uri, "/v1/vms/web/console?follow=true&tail=5");
}

#[test]
fn events_follow_prints_rows_as_lines_arrive() {
    let ev = |seq: u32, from: &str, to: &str, reason: &str| {
        format!(
            r#"{{"seq":{seq},"vm_id":"{VM_ID}","at_ms":0,"kind":"transition","from":{from},"to":"{to}","generation":{seq},"reason":"{reason}"}}"#
        )
    };
    let a = ev(4, r#""created""#, "starting", "start");
    let b = ev(5, r#""starting""#, "running", "start");
    let d = {
        // A line split across chunks, and two lines in one chunk.
        let (a1, a2) = a.split_at(20);
        let chunks = vec![a1.to_owned(), format!("{a2}\n{b}\n")];
        fake::start("events", move |_| fake::Answer {
            status: 200,
            chunks: chunks.clone(),
        })
    };
    let out = hearth_at(&d, &["events", "-f", "--since", "3", "web"]);
    assert_eq!(
        stdout(&out),
        "\
SEQ     TIME                  FROM      TO        GEN   REASON
4       1970-01-01T00:00:00Z  created   starting  4     start
5       1970-01-01T00:00:00Z  starting  running   5     start
"
    );
    let out = hearth_at(&d, &["events", "--json"]);
    assert_eq!(stdout(&out), format!("{a}\n{b}\n"));
    let uris: Vec<_> = d
        .seen
        .lock()
        .expect("lock")
        .iter()
        .map(|r| r.uri.clone())
        .collect();
    assert_eq!(
        uris,
        [
            "/v1/events?since=3&follow=true&vm=web",
            "/v1/events?since=0&follow=false"
        ]
    );
}
