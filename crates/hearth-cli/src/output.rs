//! Human output: tables, times, pretty JSON, error lines.
//!
//! Everything `hearth` prints is built by a pure function here, from API
//! types and an explicit "now", so the formatting is unit-tested without a
//! daemon or a clock. `--json` bypasses all of it except the indentation.

use std::fmt::Write as _;

use hearth_api::{Event, EventKind, Vm};

/// Pretty-prints a JSON answer with its keys in the daemon's order
/// (serde_json's `preserve_order`); anything that is not JSON is returned
/// as is.
pub fn pretty_json(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim_end().to_owned())
}

/// The first 13 characters of a UUID (`0190f3a2-1b2c`). For hearth's
/// UUIDv7 ids that is the creation time in milliseconds: enough to tell VMs
/// apart at a glance, not an id (the API takes the full id or the name).
pub fn short_id(id: &impl std::fmt::Display) -> String {
    id.to_string().chars().take(13).collect()
}

/// The `hearth ls` table: NAME, ID, STATE, VCPUS, MEM, PID, AGE.
pub fn vm_table(vms: &[Vm], now_ms: i64) -> String {
    let rows = vms
        .iter()
        .map(|vm| {
            vec![
                vm.name.clone(),
                short_id(&vm.id),
                vm.state.to_string(),
                vm.spec.vcpus.to_string(),
                format!("{}MiB", vm.spec.memory_mib),
                vm.runtime
                    .pid
                    .map_or_else(|| "-".to_owned(), |p| p.to_string()),
                age(now_ms.saturating_sub(vm.created_at_ms)),
            ]
        })
        .collect();
    table(&["NAME", "ID", "STATE", "VCPUS", "MEM", "PID", "AGE"], rows)
}

/// The `hearth stats` table: NAME, STATE, PID, CPU, RSS, UPTIME, TTL (time
/// left). A `-` is a value the daemon does not have: the VM is not
/// running, or has not been sampled yet.
pub fn stats_table(stats: &[hearth_api::VmStats], now_ms: i64) -> String {
    let dash = || "-".to_owned();
    let rows = stats
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.state.to_string(),
                s.pid.map_or_else(dash, |p| p.to_string()),
                s.cpu_ms.map_or_else(dash, cpu_time),
                s.rss_bytes.map_or_else(dash, bytes),
                s.uptime_ms
                    .map_or_else(dash, |ms| age(i64::try_from(ms).unwrap_or(i64::MAX))),
                s.ttl_deadline_ms
                    .map_or_else(dash, |at| time_left(at, now_ms)),
            ]
        })
        .collect();
    table(
        &["NAME", "STATE", "PID", "CPU", "RSS", "UPTIME", "TTL"],
        rows,
    )
}

/// `hearth ttl`'s answer: `web ttl 2024-06-01T12:34:56Z (in 1h 30m)`
/// (the time left in whole seconds, rounded up), or `web ttl none`.
pub fn ttl_line(vm: &Vm, now_ms: i64) -> String {
    match vm.ttl_deadline_ms {
        Some(at) => {
            let left = u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0);
            let left = std::time::Duration::from_secs(left.div_ceil(1000));
            format!(
                "{} ttl {} (in {})",
                vm.name,
                utc_time(at),
                humantime::format_duration(left)
            )
        }
        None => format!("{} ttl none", vm.name),
    }
}

/// Time until `at`, as [`age`] writes it; `ended` once it has passed.
fn time_left(at: i64, now_ms: i64) -> String {
    if at <= now_ms {
        "ended".to_owned()
    } else {
        age(at - now_ms)
    }
}

/// CPU time: `0.25s` under 100 seconds, else as [`age`] writes it.
pub fn cpu_time(ms: u64) -> String {
    if ms < 100_000 {
        format!("{}.{:02}s", ms / 1000, ms % 1000 / 10)
    } else {
        age(i64::try_from(ms).unwrap_or(i64::MAX))
    }
}

/// A size in binary units, one decimal from KiB on: `512B`, `1.5KiB`,
/// `64.0MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// The columns of `hearth events`, with VM (the short id) when the
/// events are of every VM.
fn event_headers(with_vm: bool) -> Vec<&'static str> {
    let mut h = vec!["SEQ", "TIME", "FROM", "TO", "GEN", "REASON"];
    if with_vm {
        h.insert(2, "VM");
    }
    h
}

/// One event's cells. An event that is not a state change names its kind
/// in front of the reason (`teardown: removed …`).
fn event_cells(e: &Event, with_vm: bool) -> Vec<String> {
    let reason = match e.kind {
        EventKind::Transition => e.reason.clone(),
        kind => format!("{kind}: {}", e.reason),
    };
    let mut cells = vec![
        e.seq.to_string(),
        utc_time(e.at_ms),
        e.from.map_or_else(|| "-".to_owned(), |s| s.to_string()),
        e.to.to_string(),
        e.generation.to_string(),
        reason,
    ];
    if with_vm {
        cells.insert(2, short_id(&e.vm_id));
    }
    cells
}

/// The `hearth events` table: SEQ, TIME, [VM,] FROM, TO, GEN, REASON.
pub fn events_table(events: &[Event], with_vm: bool) -> String {
    let rows = events.iter().map(|e| event_cells(e, with_vm)).collect();
    table(&event_headers(with_vm), rows)
}

/// Column widths of `hearth events -f`, which prints each row as it comes
/// and so cannot measure the rows first: wide enough for any state, a
/// short id and a UTC time; REASON is last and unpadded.
const EVENT_WIDTHS: [usize; 7] = [6, 20, 13, 8, 8, 4, 0];

fn fixed_row(cells: &[String], with_vm: bool) -> String {
    let widths = EVENT_WIDTHS
        .iter()
        .enumerate()
        .filter(|(i, _)| with_vm || *i != 2)
        .map(|(_, w)| *w);
    let mut line = String::new();
    for (cell, w) in cells.iter().zip(widths) {
        let _ = write!(line, "{cell:<w$}  ");
    }
    format!("{}\n", line.trim_end())
}

/// The header line of `hearth events -f`.
pub fn event_header_line(with_vm: bool) -> String {
    let cells: Vec<String> = event_headers(with_vm)
        .into_iter()
        .map(str::to_owned)
        .collect();
    fixed_row(&cells, with_vm)
}

/// One row of `hearth events -f`, aligned with [`event_header_line`].
pub fn event_line(e: &Event, with_vm: bool) -> String {
    fixed_row(&event_cells(e, with_vm), with_vm)
}

/// Left-aligned columns two spaces apart, no trailing spaces.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header = headers.iter().map(|h| (*h).to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A duration in milliseconds as `42s`, `5m`, `3h`, `12d`.
pub fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Unix milliseconds as `2024-06-01T12:34:56Z`.
pub fn utc_time(ms: i64) -> String {
    let t = if ms >= 0 {
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64)
    } else {
        std::time::UNIX_EPOCH - std::time::Duration::from_millis(ms.unsigned_abs())
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `doctor --leaks` / `gc` output: one line per orphan, then a summary.
pub fn orphans(orphans: &[hearth_api::Orphan], removed: bool) -> String {
    if orphans.is_empty() {
        return "no leaks found: every marked object is claimed by a VM record\n".into();
    }
    let mut out = String::new();
    for o in orphans {
        let status = match (&o.error, removed) {
            (None, true) => "removed".to_owned(),
            (Some(e), _) => format!("NOT removed: {e}"),
            (None, false) => "orphan".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<8} {:<9} {} ({})",
            status, o.kind, o.object, o.reason
        );
    }
    let _ = writeln!(out, "{} orphan(s)", orphans.len());
    out
}

/// An API error as stderr lines: `error: <message>`, then one indented
/// `caused by:` line per cause.
pub fn error_lines(message: &str, chain: &[String]) -> String {
    let mut out = format!("error: {message}\n");
    for cause in chain {
        let _ = writeln!(out, "  caused by: {cause}");
    }
    out
}

#[cfg(test)]
mod tests {
    use hearth_api::{Runtime, VmSpec, VmState};

    use super::*;

    fn vm(name: &str, id: &str, state: VmState, pid: Option<u32>, created_at_ms: i64) -> Vm {
        Vm {
            id: id.parse().unwrap(),
            name: name.into(),
            spec: VmSpec {
                vcpus: 2,
                memory_mib: 256,
                kernel: "/k".into(),
                rootfs: "/r".into(),
                initrd: None,
                kernel_args: hearth_api::DEFAULT_KERNEL_ARGS.into(),
                capabilities: vec![],
            },
            state,
            generation: 1,
            runtime: Runtime {
                pid,
                ..Runtime::default()
            },
            created_at_ms,
            updated_at_ms: created_at_ms,
            last_error: None,
            ttl_deadline_ms: None,
        }
    }

    #[test]
    fn vm_table_columns() {
        let now = 1_700_000_000_000;
        let vms = [
            vm(
                "web",
                "0190f3a2-1b2c-7d4e-8f00-000000000001",
                VmState::Running,
                Some(4242),
                now - 90_000,
            ),
            vm(
                "a-much-longer-name",
                "0190f3a2-9999-7d4e-8f00-000000000002",
                VmState::Created,
                None,
                now - 3 * 86_400_000,
            ),
        ];
        assert_eq!(
            vm_table(&vms, now),
            "\
NAME                ID             STATE    VCPUS  MEM     PID   AGE
web                 0190f3a2-1b2c  running  2      256MiB  4242  1m
a-much-longer-name  0190f3a2-9999  created  2      256MiB  -     3d
"
        );
        assert_eq!(
            vm_table(&[], now),
            "NAME  ID  STATE  VCPUS  MEM  PID  AGE\n"
        );
    }

    #[test]
    fn events_table_columns() {
        let e = Event {
            seq: 7,
            vm_id: "0190f3a2-1b2c-7d4e-8f00-000000000001".parse().unwrap(),
            at_ms: 1_717_245_296_789,
            kind: EventKind::Transition,
            from: Some(VmState::Created),
            to: VmState::Starting,
            generation: 2,
            reason: "start".into(),
        };
        let first = Event {
            seq: 1,
            from: None,
            to: VmState::Created,
            generation: 1,
            reason: "create".into(),
            ..e.clone()
        };
        assert_eq!(
            events_table(&[first.clone(), e.clone()], false),
            "\
SEQ  TIME                  FROM     TO        GEN  REASON
1    2024-06-01T12:34:56Z  -        created   1    create
7    2024-06-01T12:34:56Z  created  starting  2    start
"
        );
        let teardown = Event {
            seq: 12,
            kind: EventKind::Teardown,
            from: None,
            to: VmState::Stopping,
            generation: 5,
            reason: "removed vmm pid 42, tap hth0".into(),
            ..e.clone()
        };
        assert_eq!(
            events_table(&[first, teardown.clone()], true),
            "\
SEQ  TIME                  VM             FROM  TO        GEN  REASON
1    2024-06-01T12:34:56Z  0190f3a2-1b2c  -     created   1    create
12   2024-06-01T12:34:56Z  0190f3a2-1b2c  -     stopping  5    teardown: removed vmm pid 42, tap hth0
"
        );
        // Follow mode: fixed widths, so rows line up as they arrive.
        assert_eq!(
            event_header_line(true) + &event_line(&e, true) + &event_line(&teardown, true),
            "\
SEQ     TIME                  VM             FROM      TO        GEN   REASON
7       2024-06-01T12:34:56Z  0190f3a2-1b2c  created   starting  2     start
12      2024-06-01T12:34:56Z  0190f3a2-1b2c  -         stopping  5     teardown: removed vmm pid 42, tap hth0
"
        );
        assert_eq!(
            event_line(&e, false),
            "7       2024-06-01T12:34:56Z  created   starting  2     start\n"
        );
    }

    #[test]
    fn stats_table_columns() {
        let now = 1_700_000_000_000;
        let running = hearth_api::VmStats {
            id: "0190f3a2-1b2c-7d4e-8f00-000000000001".parse().unwrap(),
            name: "web".into(),
            state: VmState::Running,
            pid: Some(4242),
            cpu_ms: Some(1234),
            rss_bytes: Some(70 << 20),
            uptime_ms: Some(90_000),
            sampled_at_ms: Some(now),
            ttl_deadline_ms: Some(now + 30 * 60_000),
            vmm_metrics: None,
        };
        let stopped = hearth_api::VmStats {
            name: "db".into(),
            state: VmState::Stopped,
            pid: None,
            cpu_ms: None,
            rss_bytes: None,
            uptime_ms: None,
            sampled_at_ms: None,
            ttl_deadline_ms: Some(now - 1),
            ..running.clone()
        };
        assert_eq!(
            stats_table(&[running, stopped], now),
            "\
NAME  STATE    PID   CPU    RSS      UPTIME  TTL
web   running  4242  1.23s  70.0MiB  1m      30m
db    stopped  -     -      -        -       ended
"
        );
        assert_eq!(cpu_time(5), "0.00s");
        assert_eq!(cpu_time(99_999), "99.99s");
        assert_eq!(cpu_time(3_600_000), "1h");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(3 << 30), "3.0GiB");
    }

    #[test]
    fn ttl_lines() {
        let mut v = vm(
            "web",
            "0190f3a2-1b2c-7d4e-8f00-000000000001",
            VmState::Running,
            None,
            0,
        );
        assert_eq!(ttl_line(&v, 0), "web ttl none");
        v.ttl_deadline_ms = Some(951_782_400_000);
        assert_eq!(
            ttl_line(&v, 951_782_400_000 - 7_200_000),
            "web ttl 2000-02-29T00:00:00Z (in 2h)"
        );
        assert_eq!(
            ttl_line(&v, 951_782_400_000 - 5_399_001),
            "web ttl 2000-02-29T00:00:00Z (in 1h 30m)"
        );
    }

    #[test]
    fn ages() {
        assert_eq!(age(-5), "0s");
        assert_eq!(age(59_999), "59s");
        assert_eq!(age(60_000), "1m");
        assert_eq!(age(3_600_000), "1h");
        assert_eq!(age(47 * 3_600_000), "47h");
        assert_eq!(age(48 * 3_600_000), "2d");
    }

    #[test]
    fn times() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc_time(1_709_251_199_999), "2024-02-29T23:59:59Z");
    }

    #[test]
    fn json_and_errors() {
        assert_eq!(pretty_json(br#"{"a":[1]}"#), "{\n  \"a\": [\n    1\n  ]\n}");
        assert_eq!(pretty_json(b"not json\n"), "not json");
        // Same as serde_json's pretty form, but keys keep the daemon's order
        // and values are untouched.
        let raw =
            br#" {"z": 1, "a" :{"s":"x, \"y\": [z]\\","e":[],"o":{}}, "n":[null,true,-1500.0]} "#;
        assert_eq!(
            pretty_json(raw),
            r#"{
  "z": 1,
  "a": {
    "s": "x, \"y\": [z]\\",
    "e": [],
    "o": {}
  },
  "n": [
    null,
    true,
    -1500.0
  ]
}"#
        );
        let v: serde_json::Value = serde_json::from_slice(raw).unwrap();
        let ours: serde_json::Value = serde_json::from_str(&pretty_json(raw)).unwrap();
        assert_eq!(v, ours);
        assert_eq!(pretty_json(b"[]"), "[]");
        assert_eq!(pretty_json(b"\"a\""), "\"a\"");
        assert_eq!(
            error_lines(
                "cannot start VM web: it is running",
                &["state is running".to_owned()]
            ),
            "error: cannot start VM web: it is running\n  caused by: state is running\n"
        );
    }
}
