//! Named failpoints at every step boundary of every operation, for the
//! crash harness (issue 5): each can be armed to abort the whole process
//! (as close to a power cut as a process gets), to return an error (the
//! unwind path), or to sleep.
//!
//! Compiled in only with the `failpoints` cargo feature, which the test
//! build enables; without it [`check`] is an inlined `Ok(())` and release
//! builds carry no failpoint. Armed through `HEARTH_FAILPOINTS`, read once
//! at daemon start: `name=abort;other=error;third=sleep(200)`.
//! `hearthd --list-failpoints` (feature build) prints [`ALL`], so tests
//! enumerate the points instead of keeping their own list; a unit test
//! checks that [`ALL`] names exactly the points in the source.

/// The environment variable that arms failpoints.
pub const ENV: &str = "HEARTH_FAILPOINTS";

/// Every failpoint, in the order its operation passes through them. The
/// prefix names the operation (`start`, `teardown` — run by stop, kill,
/// delete and a failed start —, `stop`, `kill`, `delete`, `reconcile`,
/// `sweep`).
pub const ALL: &[&str] = &[
    "start.after_starting",
    "start.after_spawn",
    "start.after_tap_reserved",
    "start.after_tap_created",
    "start.after_tap_configured",
    "start.after_disk_made",
    "start.after_firewall_applied",
    "start.before_put",
    "start.before_instance_start",
    "start.after_instance_start",
    "start.after_running",
    "stop.after_stopping",
    "stop.after_ctrl_alt_del",
    "kill.after_stopping",
    "teardown.after_kill",
    "teardown.after_firewall_removed",
    "teardown.after_tap_reset",
    "teardown.after_disk_removed",
    "teardown.after_files_removed",
    "teardown.before_final_state",
    "delete.after_dir_removed",
    "delete.after_row_deleted",
    "reconcile.before_vm",
    "reconcile.after_probe",
    "sweep.after_list",
    "sweep.after_remove",
];

/// The error an armed failpoint returns.
#[derive(Debug, Clone, thiserror::Error)]
#[error("injected failure at failpoint {0}")]
pub struct Injected(pub &'static str);

#[cfg(feature = "failpoints")]
mod armed {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    use std::time::Duration;

    #[derive(Debug, Clone, Copy)]
    pub(super) enum Action {
        Abort,
        Error,
        Sleep(Duration),
    }

    static ARMED: OnceLock<HashMap<String, Action>> = OnceLock::new();

    pub(super) fn parse(spec: &str) -> Result<HashMap<String, Action>, String> {
        let mut out = HashMap::new();
        for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, action) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?}: expected name=action"))?;
            if !super::ALL.contains(&name) {
                return Err(format!(
                    "unknown failpoint {name:?} (hearthd --list-failpoints)"
                ));
            }
            let action = match action {
                "abort" => Action::Abort,
                "error" => Action::Error,
                s => {
                    let ms = s
                        .strip_prefix("sleep(")
                        .and_then(|r| r.strip_suffix(')'))
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| {
                            format!("{name}: action {s:?} is not abort, error or sleep(MS)")
                        })?;
                    Action::Sleep(Duration::from_millis(ms))
                }
            };
            out.insert(name.to_owned(), action);
        }
        Ok(out)
    }

    pub(super) fn init(spec: &str) -> Result<usize, String> {
        let parsed = parse(spec)?;
        let n = parsed.len();
        let _ = ARMED.set(parsed);
        Ok(n)
    }

    pub(super) fn get(name: &str) -> Option<Action> {
        ARMED.get()?.get(name).copied()
    }
}

/// Arms the failpoints named in `HEARTH_FAILPOINTS` (feature build only);
/// returns how many. A malformed value is an error: a test that meant to
/// arm a point must not silently run without it.
pub fn init_from_env() -> Result<usize, String> {
    let spec = std::env::var(ENV).unwrap_or_default();
    #[cfg(feature = "failpoints")]
    {
        armed::init(&spec)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        if spec.is_empty() {
            Ok(0)
        } else {
            Err(format!(
                "{ENV} is set but this hearthd was built without the failpoints feature"
            ))
        }
    }
}

/// Passes failpoint `name`: aborts, errs or sleeps if it is armed.
#[cfg(feature = "failpoints")]
pub fn check(name: &'static str) -> Result<(), Injected> {
    match armed::get(name) {
        None => Ok(()),
        Some(armed::Action::Abort) => {
            eprintln!("hearthd: failpoint {name}: abort");
            std::process::abort()
        }
        Some(armed::Action::Error) => Err(Injected(name)),
        Some(armed::Action::Sleep(d)) => {
            std::thread::sleep(d);
            Ok(())
        }
    }
}

/// Passes failpoint `name`: a no-op without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn check(_name: &'static str) -> Result<(), Injected> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `failpoint::check("…")` in the source is in [`ALL`] and every
    /// entry of [`ALL`] is used.
    #[test]
    fn the_list_matches_the_source() {
        let sources = [
            include_str!("lifecycle/start.rs"),
            include_str!("lifecycle/teardown.rs"),
            include_str!("lifecycle/mod.rs"),
            include_str!("sweep.rs"),
        ];
        // The macro's own definition is not a use.
        let sources = sources.map(|s| s.replace("failpoint::check($name)", ""));
        let mut used = Vec::new();
        for src in &sources {
            for marker in ["failpoint::check(\"", "fp!(\""] {
                for part in src.split(marker).skip(1) {
                    used.push(part.split('"').next().unwrap_or_default().to_owned());
                }
            }
        }
        used.sort();
        used.dedup();
        let mut all: Vec<String> = ALL.iter().map(|s| s.to_string()).collect();
        all.sort();
        assert_eq!(used, all);
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn specs_parse() {
        let p = armed::parse("start.after_spawn=abort; teardown.after_kill=sleep(5);").unwrap();
        assert_eq!(p.len(), 2);
        assert!(armed::parse("nope=abort").is_err());
        assert!(armed::parse("start.after_spawn=explode").is_err());
    }
}
