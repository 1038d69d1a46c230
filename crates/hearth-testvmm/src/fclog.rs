//! Firecracker's logger and metrics, reduced to what a caller can observe.
//!
//! Firecracker logs to stdout until `PUT /logger` (or `--log-path`) names
//! a file, so a VMM whose stdout is redirected to a console file gets its
//! early log lines there too; this does the same. Lines look like
//! Firecracker's: `<local time> [<instance id>:<thread>(:<LEVEL>)(:<file>:<line>)] <message>`.
//! Targets are opened the way Firecracker's `open_file_nonblock` opens them:
//! read-write, created if missing, `O_NONBLOCK`, neither truncated nor
//! appended to.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::panic::Location;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{LevelFilter, LoggerConfig};

/// Opens a log or metrics target like Firecracker's `open_file_nonblock`.
pub fn open_file_nonblock(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .custom_flags(libc::O_NONBLOCK)
        .create(true)
        .read(true)
        .write(true)
        .open(path)
}

/// Severity of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// An error.
    Error,
    /// A warning.
    Warn,
    /// Information.
    Info,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
        }
    }

    fn enabled_by(self, filter: LevelFilter) -> bool {
        let as_filter = match self {
            Level::Error => LevelFilter::Error,
            Level::Warn => LevelFilter::Warn,
            Level::Info => LevelFilter::Info,
        };
        as_filter <= filter
    }
}

/// The `[id:thread]` part names Firecracker's threads.
#[derive(Debug, Clone, Copy)]
pub enum Thread {
    /// The main (VMM) thread.
    Main,
    /// The API server thread.
    Api,
}

impl Thread {
    fn name(self) -> &'static str {
        match self {
            Thread::Main => "main",
            Thread::Api => "fc_api",
        }
    }
}

/// Firecracker's logger state.
#[derive(Debug)]
pub struct Logger {
    instance_id: String,
    target: Option<File>,
    level: LevelFilter,
    show_level: bool,
    show_log_origin: bool,
    module: Option<String>,
    /// Off entirely (unit tests), whatever the configuration says.
    silent: bool,
}

impl Logger {
    /// The logger at process start: stdout, `Info`, no decorations.
    pub fn new(instance_id: &str) -> Self {
        Logger {
            instance_id: instance_id.to_owned(),
            target: None,
            level: LevelFilter::Info,
            show_level: false,
            show_log_origin: false,
            module: None,
            silent: false,
        }
    }

    /// A logger that writes nothing (for unit tests).
    pub fn silent() -> Self {
        Logger {
            silent: true,
            ..Logger::new("test")
        }
    }

    /// Applies a `PUT /logger` (or command-line) configuration, as
    /// Firecracker's `Logger::update` does: the file is opened first, the
    /// level is reset to `Info` when not given, the rest only when given.
    pub fn update(&mut self, config: LoggerConfig) -> io::Result<()> {
        let file = config
            .log_path
            .as_deref()
            .map(open_file_nonblock)
            .transpose()?;
        self.level = config.level.unwrap_or(LevelFilter::Info);
        if let Some(file) = file {
            self.target = Some(file);
        }
        if let Some(v) = config.show_level {
            self.show_level = v;
        }
        if let Some(v) = config.show_log_origin {
            self.show_log_origin = v;
        }
        if let Some(m) = config.module {
            self.module = Some(m);
        }
        Ok(())
    }

    /// Writes one record; `module` is the Firecracker module path the
    /// record would come from (for the module filter).
    #[track_caller]
    pub fn log(&mut self, level: Level, thread: Thread, module: &str, message: &str) {
        if self.silent || !level.enabled_by(self.level) {
            return;
        }
        if let Some(filter) = &self.module
            && !module.starts_with(filter.as_str())
        {
            return;
        }
        let level_part = if self.show_level {
            format!(":{}", level.name())
        } else {
            String::new()
        };
        let origin = if self.show_log_origin {
            let at = Location::caller();
            format!(":{}:{}", at.file(), at.line())
        } else {
            String::new()
        };
        let line = format!(
            "{} [{}:{}{level_part}{origin}] {message}\n",
            local_time(),
            self.instance_id,
            thread.name(),
        );
        // Like Firecracker, a failed log write is dropped, not reported.
        let _ = match &mut self.target {
            Some(file) => file.write_all(line.as_bytes()),
            None => {
                let mut out = io::stdout().lock();
                out.write_all(line.as_bytes()).and_then(|()| out.flush())
            }
        };
    }
}

/// Local time as Firecracker's `LocalTime` prints it:
/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`.
fn local_time() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: all-zero is a valid `libc::tm` (its one pointer field may be null).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live, writable locals of the right types.
    unsafe {
        libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts);
        libc::localtime_r(&ts.tv_sec, &mut tm);
    }
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        ts.tv_nsec
    )
}

/// Request counters, named like Firecracker's `get_api_requests` and
/// `put_api_requests` metrics.
pub const GET_COUNTERS: &[&str] = &[
    "instance_info_count",
    "machine_cfg_count",
    "mmds_count",
    "vmm_version_count",
    "hotplug_memory_count",
];

/// See [`GET_COUNTERS`].
pub const PUT_COUNTERS: &[&str] = &[
    "actions_count",
    "actions_fails",
    "boot_source_count",
    "boot_source_fails",
    "drive_count",
    "drive_fails",
    "logger_count",
    "logger_fails",
    "machine_cfg_count",
    "machine_cfg_fails",
    "metrics_count",
    "metrics_fails",
    "network_count",
    "network_fails",
];

/// Firecracker's metrics, reduced: a destination and a few counters that
/// are reset at every write, as Firecracker's `SharedIncMetric`s are.
#[derive(Debug, Default)]
pub struct Metrics {
    dest: Option<File>,
    get: BTreeMap<&'static str, u64>,
    put: BTreeMap<&'static str, u64>,
}

/// Second `PUT /metrics` (`MetricsError::AlreadyInitialized`).
#[derive(Debug, thiserror::Error)]
#[error("Reinitialization of metrics not allowed.")]
pub struct AlreadyInitialized;

impl Metrics {
    /// Whether a destination has been set.
    pub fn is_initialized(&self) -> bool {
        self.dest.is_some()
    }

    /// Sets the destination; only once, like Firecracker's `METRICS.init`.
    pub fn init(&mut self, file: File) -> Result<(), AlreadyInitialized> {
        if self.dest.is_some() {
            return Err(AlreadyInitialized);
        }
        self.dest = Some(file);
        Ok(())
    }

    /// Counts one GET of the named kind.
    pub fn inc_get(&mut self, name: &'static str) {
        *self.get.entry(name).or_default() += 1;
    }

    /// Counts one PUT of the named kind.
    pub fn inc_put(&mut self, name: &'static str) {
        *self.put.entry(name).or_default() += 1;
    }

    /// Writes one JSON line; `Ok(false)` when no destination is set
    /// (not an error, as in Firecracker).
    pub fn write(&mut self) -> io::Result<bool> {
        let Some(dest) = &mut self.dest else {
            return Ok(false);
        };
        let group = |names: &[&'static str], counts: &mut BTreeMap<&'static str, u64>| {
            let obj: serde_json::Map<String, serde_json::Value> = names
                .iter()
                .map(|n| ((*n).to_owned(), counts.get(n).copied().unwrap_or(0).into()))
                .collect();
            counts.clear();
            serde_json::Value::Object(obj)
        };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let line = serde_json::json!({
            "utc_timestamp_ms": u64::try_from(now_ms).unwrap_or(u64::MAX),
            "get_api_requests": group(GET_COUNTERS, &mut self.get),
            "put_api_requests": group(PUT_COUNTERS, &mut self.put),
        });
        let mut text = line.to_string();
        text.push('\n');
        dest.write_all(text.as_bytes())?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_looks_like_firecrackers() {
        let t = local_time();
        assert_eq!(t.len(), "2024-01-02T03:04:05.123456789".len(), "{t}");
        assert_eq!(&t[10..11], "T");
    }

    #[test]
    fn level_filter_orders_like_log() {
        assert!(Level::Error.enabled_by(LevelFilter::Info));
        assert!(Level::Info.enabled_by(LevelFilter::Info));
        assert!(!Level::Info.enabled_by(LevelFilter::Warn));
        assert!(!Level::Error.enabled_by(LevelFilter::Off));
    }

    #[test]
    fn logger_writes_decorated_lines_to_its_file() {
        let dir = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("fc.log");
        let mut log = Logger::new("vm-1");
        log.update(LoggerConfig {
            log_path: Some(path.clone()),
            level: Some(LevelFilter::Warn),
            show_level: Some(true),
            ..Default::default()
        })
        .unwrap();
        log.log(Level::Info, Thread::Api, "firecracker", "hidden");
        log.log(Level::Warn, Thread::Api, "firecracker", "shown");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("hidden"));
        assert!(
            text.trim_end().ends_with("[vm-1:fc_api:WARN] shown"),
            "{text}"
        );
    }

    #[test]
    fn metrics_init_once_and_counters_reset() {
        let dir = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("metrics");
        let mut m = Metrics::default();
        assert!(!m.write().unwrap());
        m.init(open_file_nonblock(&path).unwrap()).unwrap();
        assert!(m.init(open_file_nonblock(&path).unwrap()).is_err());
        m.inc_put("actions_count");
        assert!(m.write().unwrap());
        assert!(m.write().unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["put_api_requests"]["actions_count"], 1);
        assert_eq!(lines[1]["put_api_requests"]["actions_count"], 0);
    }
}
