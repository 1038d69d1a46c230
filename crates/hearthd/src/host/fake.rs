//! Hand-written fakes of the host traits: an in-memory model of the kernel
//! that records every call and can be told to fail at a given one. Unit
//! tests of the lifecycle run against these; integration tests against the
//! real kernel.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::process::{ExitInfo, ProcessError, ProcessHost, SpawnSpec};

#[derive(Debug)]
struct FakeProc {
    start_time: u64,
    args: Vec<std::ffi::OsString>,
    exited: watch::Sender<Option<String>>,
}

#[derive(Debug, Default)]
struct Model {
    next_pid: u32,
    procs: BTreeMap<u32, FakeProc>,
    calls: Vec<String>,
    fail_spawn: bool,
    fail_kill: bool,
}

/// A fake process table.
#[derive(Debug, Clone, Default)]
pub struct FakeProcesses {
    inner: Arc<Mutex<Model>>,
}

impl FakeProcesses {
    /// An empty process table.
    pub fn new() -> Self {
        Self::default()
    }

    fn m(&self) -> MutexGuard<'_, Model> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, as `op pid`.
    pub fn calls(&self) -> Vec<String> {
        self.m().calls.clone()
    }

    /// Pids of live processes.
    pub fn live(&self) -> Vec<u32> {
        self.m()
            .procs
            .iter()
            .filter(|(_, p)| p.exited.borrow().is_none())
            .map(|(&pid, _)| pid)
            .collect()
    }

    /// Makes the next spawns fail.
    pub fn fail_spawn(&self, on: bool) {
        self.m().fail_spawn = on;
    }

    /// Makes kills fail.
    pub fn fail_kill(&self, on: bool) {
        self.m().fail_kill = on;
    }

    /// The process exits on its own.
    pub fn exit(&self, pid: u32, how: &str) {
        if let Some(p) = self.m().procs.get(&pid) {
            p.exited.send_replace(Some(how.to_owned()));
        }
    }

    /// The live process with `arg` on its command line.
    pub fn pid_with_arg(&self, arg: &Path) -> Option<u32> {
        self.find_by_arg(arg).first().map(|&(pid, _)| pid)
    }
}

impl ProcessHost for FakeProcesses {
    fn spawn(&self, spec: &SpawnSpec) -> Result<(u32, u64), ProcessError> {
        let mut m = self.m();
        m.calls.push(format!("spawn {}", spec.program.display()));
        if m.fail_spawn {
            return Err(ProcessError::Spawn {
                program: spec.program.clone(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        m.next_pid += 1;
        let pid = 1000 + m.next_pid;
        let start_time = 5000 + u64::from(m.next_pid);
        let (tx, _) = watch::channel(None);
        m.procs.insert(
            pid,
            FakeProc {
                start_time,
                args: spec.args.clone(),
                exited: tx,
            },
        );
        Ok((pid, start_time))
    }

    fn is_alive(&self, pid: u32, start_time: u64, arg: Option<&Path>) -> bool {
        let m = self.m();
        m.procs.get(&pid).is_some_and(|p| {
            p.start_time == start_time
                && p.exited.borrow().is_none()
                && arg.is_none_or(|a| p.args.iter().any(|x| x == a.as_os_str()))
        })
    }

    fn find_by_arg(&self, arg: &Path) -> Vec<(u32, u64)> {
        self.m()
            .procs
            .iter()
            .filter(|(_, p)| {
                p.exited.borrow().is_none() && p.args.iter().any(|x| x == arg.as_os_str())
            })
            .map(|(&pid, p)| (pid, p.start_time))
            .collect()
    }

    fn find_by_arg_under(&self, dir: &Path) -> Vec<(u32, u64, std::path::PathBuf)> {
        self.m()
            .procs
            .iter()
            .filter(|(_, p)| p.exited.borrow().is_none())
            .filter_map(|(&pid, p)| {
                let arg = p
                    .args
                    .iter()
                    .map(Path::new)
                    .find(|a| a.starts_with(dir) && *a != dir)?;
                Some((pid, p.start_time, arg.to_owned()))
            })
            .collect()
    }

    fn kill(&self, pid: u32, start_time: u64) -> BoxFuture<'static, Result<(), ProcessError>> {
        let mut m = self.m();
        m.calls.push(format!("kill {pid}"));
        let result = if m.fail_kill {
            Err(ProcessError::Sys {
                op: "pidfd_send_signal",
                pid,
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            })
        } else {
            if let Some(p) = m.procs.get(&pid)
                && p.start_time == start_time
                && p.exited.borrow().is_none()
            {
                p.exited.send_replace(Some("killed by signal 9".into()));
            }
            Ok(())
        };
        Box::pin(async move { result })
    }

    fn wait_exit(&self, pid: u32, start_time: u64) -> BoxFuture<'static, ExitInfo> {
        let rx = self
            .m()
            .procs
            .get(&pid)
            .filter(|p| p.start_time == start_time)
            .map(|p| p.exited.subscribe());
        Box::pin(async move {
            let Some(mut rx) = rx else {
                return ExitInfo {
                    description: "exited (status unknown)".into(),
                };
            };
            let how = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|v| v.clone());
            ExitInfo {
                description: how.unwrap_or_else(|| "exited".into()),
            }
        })
    }
}
