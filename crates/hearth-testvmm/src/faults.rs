//! Fault injection for tests of the daemon's process watcher and its
//! hung-VMM detection. Nothing here exists in Firecracker; it is read only
//! from the environment, so a daemon under test passes it on without
//! knowing about it.
//!
//! * `HEARTH_TESTVMM_CRASH=<point>`: die by `SIGABRT` (no core dump) at
//!   `<point>`, without answering the request that triggered it.
//! * `HEARTH_TESTVMM_HANG=<point>`: from `<point>` on, accept connections
//!   and read requests but never answer any.
//!
//! `<point>` is one of `before-start` (when `PUT /actions` InstanceStart
//! arrives), `after-start:<ms>` (that many milliseconds after a successful
//! InstanceStart), or `on-put:<path>` (when a `PUT` to exactly `<path>`
//! arrives; a trailing `*` matches any path with that prefix).

use std::time::Duration;

/// Environment variable that makes the stand-in crash.
pub const CRASH_ENV: &str = "HEARTH_TESTVMM_CRASH";
/// Environment variable that makes the stand-in stop answering.
pub const HANG_ENV: &str = "HEARTH_TESTVMM_HANG";

/// When a fault fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Point {
    /// On receipt of InstanceStart.
    BeforeStart,
    /// This long after InstanceStart succeeded.
    AfterStart(Duration),
    /// On receipt of a PUT to this path (prefix when `prefix` is set).
    OnPut {
        /// The path, without the `*`.
        path: String,
        /// Match by prefix.
        prefix: bool,
    },
}

impl Point {
    /// Parses `before-start`, `after-start:<ms>` or `on-put:<path>`.
    pub fn parse(spec: &str) -> Option<Point> {
        if spec == "before-start" {
            return Some(Point::BeforeStart);
        }
        if let Some(ms) = spec.strip_prefix("after-start:") {
            return ms
                .parse::<u64>()
                .ok()
                .map(|ms| Point::AfterStart(Duration::from_millis(ms)));
        }
        let path = spec.strip_prefix("on-put:")?;
        if !path.starts_with('/') {
            return None;
        }
        Some(match path.strip_suffix('*') {
            Some(p) => Point::OnPut {
                path: p.to_owned(),
                prefix: true,
            },
            None => Point::OnPut {
                path: path.to_owned(),
                prefix: false,
            },
        })
    }

    /// Whether this is an `on-put` point matching a PUT to `request_path`.
    pub fn matches_put(&self, request_path: &str) -> bool {
        match self {
            Point::OnPut { path, prefix: true } => request_path.starts_with(path.as_str()),
            Point::OnPut {
                path,
                prefix: false,
            } => request_path == path,
            _ => false,
        }
    }
}

/// A malformed variable.
#[derive(Debug, thiserror::Error)]
#[error(
    "{var}={value:?} is not understood; expected before-start, after-start:<ms> or on-put:<path>"
)]
pub struct FaultSpecError {
    var: &'static str,
    value: String,
}

/// The faults asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// From [`CRASH_ENV`].
    pub crash: Option<Point>,
    /// From [`HANG_ENV`].
    pub hang: Option<Point>,
}

impl Faults {
    /// Reads both variables through `get` (empty or unset: no fault).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Faults, FaultSpecError> {
        let read = |var: &'static str| match get(var) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Point::parse(&v)
                .map(Some)
                .ok_or(FaultSpecError { var, value: v }),
        };
        Ok(Faults {
            crash: read(CRASH_ENV)?,
            hang: read(HANG_ENV)?,
        })
    }

    /// Reads both variables from the environment.
    pub fn from_env() -> Result<Faults, FaultSpecError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }
}

/// Dies now, by `SIGABRT`, as a crashing Firecracker (built with
/// `panic = "abort"`) would.
pub fn crash(why: &str) -> ! {
    eprintln!("hearth-testvmm: {CRASH_ENV}: crashing on purpose ({why})");
    abort_without_core()
}

/// `abort()`, with core dumps turned off first so that tests leave no core
/// files (or crash reports) behind.
pub fn abort_without_core() -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: PR_SET_DUMPABLE with constant arguments only changes this
    // process's dumpable flag.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_parse() {
        assert_eq!(Point::parse("before-start"), Some(Point::BeforeStart));
        assert_eq!(
            Point::parse("after-start:200"),
            Some(Point::AfterStart(Duration::from_millis(200)))
        );
        let p = Point::parse("on-put:/boot-source").unwrap();
        assert!(p.matches_put("/boot-source"));
        assert!(!p.matches_put("/boot-source2"));
        let p = Point::parse("on-put:/drives/*").unwrap();
        assert!(p.matches_put("/drives/rootfs"));
        assert!(!p.matches_put("/machine-config"));
        for bad in [
            "after-start",
            "after-start:x",
            "on-put:boot-source",
            "later",
        ] {
            assert_eq!(Point::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_variables_are_errors_and_empty_ones_are_ignored() {
        let f = Faults::from_lookup(|k| (k == CRASH_ENV).then(|| "soon".to_owned()));
        assert!(
            f.unwrap_err()
                .to_string()
                .contains("HEARTH_TESTVMM_CRASH=\"soon\"")
        );
        let f = Faults::from_lookup(|_| Some(String::new())).unwrap();
        assert_eq!(f, Faults::default());
    }
}
