//! Human output: tables, times, pretty JSON, error lines.
//!
//! Everything `hearth` prints is built by a pure function here, from API
//! types and an explicit "now", so the formatting is unit-tested without a
//! daemon or a clock. `--json` bypasses all of it except the indentation.

use std::fmt::Write as _;

use hearth_api::{Event, Vm};

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

/// The `hearth events` table: SEQ, TIME, FROM, TO, GEN, REASON.
pub fn events_table(events: &[Event]) -> String {
    let rows = events
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                utc_time(e.at_ms),
                e.from.map_or_else(|| "-".to_owned(), |s| s.to_string()),
                e.to.to_string(),
                e.generation.to_string(),
                e.reason.clone(),
            ]
        })
        .collect();
    table(&["SEQ", "TIME", "FROM", "TO", "GEN", "REASON"], rows)
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
            events_table(&[first, e]),
            "\
SEQ  TIME                  FROM     TO        GEN  REASON
1    2024-06-01T12:34:56Z  -        created   1    create
7    2024-06-01T12:34:56Z  created  starting  2    start
"
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
