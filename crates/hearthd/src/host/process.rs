//! VMM processes: spawn in their own session, identify by pid + start
//! time, watch through a pidfd, kill through a pidfd.
//!
//! A pid alone is not an identity: after the VMM exits, the kernel may hand
//! its pid to an unrelated process. So hearth records the pid together with
//! the process's start time (field 22 of `/proc/<pid>/stat`), and before
//! signalling it opens a pidfd first and checks the start time afterwards —
//! the pidfd pins the process, so the check cannot race a pid reuse.
//! When the pid was never recorded (a crash between spawn and the store
//! write), the VMM is found again by its API socket path, which is on its
//! command line and was recorded before the spawn.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};
use tokio::io::unix::AsyncFd;

/// Why a process operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The console log could not be opened for the child's output.
    #[error("cannot open console log {}", path.display())]
    Console {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// exec or fork failed.
    #[error("cannot spawn {}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The process was spawned but vanished before its start time was read.
    #[error("VMM process {pid} exited immediately after spawn")]
    Vanished {
        /// Its pid.
        pid: u32,
    },
    /// A pidfd or signal call failed for another reason than "gone".
    #[error("{op} on pid {pid} failed")]
    Sys {
        /// What was attempted.
        op: &'static str,
        /// The pid.
        pid: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// SIGKILL was sent but the process did not go away in time.
    #[error("pid {pid} did not exit within {timeout:?} of SIGKILL")]
    KillTimeout {
        /// The pid.
        pid: u32,
        /// How long was waited.
        timeout: Duration,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// The binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Where stdout and stderr go (appended).
    pub console_log: PathBuf,
}

/// How a watched process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// `exited with status N`, `killed by signal N`, or `exited (status
    /// unknown: not our child)` for a re-adopted VMM.
    pub description: String,
}

/// The process half of the host.
pub trait ProcessHost: Send + Sync + std::fmt::Debug {
    /// Spawns `spec` in a new session (so the daemon's death does not take
    /// it along) and returns its pid and start time.
    fn spawn(&self, spec: &SpawnSpec) -> Result<(u32, u64), ProcessError>;

    /// True when `pid` is alive, started at `start_time`, and (if given)
    /// has `arg` on its command line. A zombie is not alive.
    fn is_alive(&self, pid: u32, start_time: u64, arg: Option<&Path>) -> bool;

    /// Pids of live processes that have `arg` as one of their arguments.
    fn find_by_arg(&self, arg: &Path) -> Vec<(u32, u64)>;

    /// Live processes with an argument that is a path under `dir`, with
    /// that argument: how the sweep finds VMMs by their API socket.
    fn find_by_arg_under(&self, dir: &Path) -> Vec<(u32, u64, PathBuf)>;

    /// SIGKILLs the process if it is still the one recorded, waits for it
    /// to go, and reaps it if it is our child. Already gone is success.
    fn kill(&self, pid: u32, start_time: u64) -> BoxFuture<'static, Result<(), ProcessError>>;

    /// Resolves when the process exits (immediately if it already has).
    fn wait_exit(&self, pid: u32, start_time: u64) -> BoxFuture<'static, ExitInfo>;
}

/// The real thing: `/proc`, pidfds, `setsid`.
#[derive(Debug, Default)]
pub struct LinuxProcesses;

/// `/proc/<pid>/stat`: (state, start time). `None` when there is no such
/// process.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses the state (field 3) and start time (field 22) of a stat line.
/// The command name (field 2) may contain spaces and parentheses, so the
/// fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3; field 22 is 19 further on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Spawns `spec` in a session of its own (so no signal meant for hearthd's
/// session or terminal reaches it), stdin from /dev/null, stdout and stderr
/// appended to `console`; returns its pid.
///
/// posix_spawn with `POSIX_SPAWN_SETSID` rather than `Command` with a
/// `pre_exec(setsid)`: a pre_exec hook makes std fork, and a fork of the
/// multi-threaded daemon marks all its memory copy-on-write, so the daemon
/// then takes a page fault on every page it writes — measured as well over
/// half of hearthd's CPU under load. glibc's posix_spawn uses
/// `CLONE_VM | CLONE_VFORK`: no copy, no faults. Like `Command`, the child
/// gets SIGPIPE back at its default and an empty signal mask, and inherits
/// the environment; every other fd of hearthd is close-on-exec.
fn spawn_in_new_session(spec: &SpawnSpec, console: &std::fs::File) -> std::io::Result<u32> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;

    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawnp};
    use nix::sys::signal::{SigSet, Signal as NixSignal};

    let c = |s: &std::ffi::OsStr| {
        CString::new(s.as_bytes()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{s:?} contains a NUL byte"),
            )
        })
    };
    let argv: Vec<CString> = std::iter::once(spec.program.as_os_str())
        .chain(spec.args.iter().map(OsString::as_os_str))
        .map(c)
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            c(&kv)
        })
        .collect::<Result<_, _>>()?;

    let mut attr = PosixSpawnAttr::init()?;
    let mut sigpipe = SigSet::empty();
    sigpipe.add(NixSignal::SIGPIPE);
    attr.set_sigdefault(&sigpipe)?;
    attr.set_sigmask(&SigSet::empty())?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::from_bits_retain(libc::c_int::from(libc::POSIX_SPAWN_SETSID)),
    )?;
    let mut actions = PosixSpawnFileActions::init()?;
    let null = std::fs::File::open("/dev/null")?;
    actions.add_dup2(null.as_raw_fd(), 0)?;
    actions.add_dup2(console.as_raw_fd(), 1)?;
    actions.add_dup2(console.as_raw_fd(), 2)?;
    let pid = posix_spawnp(&argv[0], &actions, &attr, &argv, &envp)?;
    Ok(pid.as_raw() as u32)
}

fn cmdline_has(pid: u32, arg: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = arg.as_os_str().as_encoded_bytes();
    raw.split(|&b| b == 0).any(|a| a == want)
}

fn is_gone(e: &rustix::io::Errno) -> bool {
    *e == rustix::io::Errno::SRCH
}

/// Opens a pidfd for `pid` if it is still the process that started at
/// `start_time`; `Ok(None)` when it is gone (or a zombie, or someone else).
fn pidfd_for(pid: u32, start_time: u64) -> Result<Option<OwnedFd>, ProcessError> {
    let Some(p) = Pid::from_raw(pid as i32) else {
        return Ok(None);
    };
    let fd = match rustix::process::pidfd_open(p, PidfdFlags::NONBLOCK) {
        Ok(fd) => fd,
        Err(e) if is_gone(&e) => return Ok(None),
        Err(e) => {
            return Err(ProcessError::Sys {
                op: "pidfd_open",
                pid,
                source: e.into(),
            });
        }
    };
    // Checked after opening: the pidfd now pins whichever process has
    // this pid, so if the start time matches, it is ours.
    match proc_stat(pid) {
        Some((_, st)) if st == start_time => Ok(Some(fd)),
        _ => Ok(None),
    }
}

fn reap(fd: &OwnedFd) -> Option<String> {
    match rustix::process::waitid(
        WaitId::PidFd(fd.as_fd()),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    ) {
        Ok(Some(status)) => Some(if let Some(code) = status.exit_status() {
            format!("exited with status {code}")
        } else if let Some(sig) = status.terminating_signal() {
            format!("killed by signal {sig}")
        } else {
            "exited".to_owned()
        }),
        // ECHILD: not our child (re-adopted after a daemon restart).
        _ => None,
    }
}

async fn wait_readable(fd: OwnedFd) -> Result<OwnedFd, std::io::Error> {
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and
    // refers to the same pidfd until `into_inner` hands it back.
    let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let _guard = afd.readable().await?;
    Ok(afd.into_inner())
}

impl ProcessHost for LinuxProcesses {
    fn spawn(&self, spec: &SpawnSpec) -> Result<(u32, u64), ProcessError> {
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.console_log)
            .map_err(|source| ProcessError::Console {
                path: spec.console_log.clone(),
                source,
            })?;
        let pid = spawn_in_new_session(spec, &console).map_err(|source| ProcessError::Spawn {
            program: spec.program.clone(),
            source,
        })?;
        // Not waited for here: the process is reaped through its pidfd by
        // whoever watches or kills it.
        match proc_stat(pid) {
            Some((_, start)) => Ok((pid, start)),
            None => Err(ProcessError::Vanished { pid }),
        }
    }

    fn is_alive(&self, pid: u32, start_time: u64, arg: Option<&Path>) -> bool {
        match proc_stat(pid) {
            Some((state, st)) if st == start_time && state != 'Z' && state != 'X' => {
                arg.is_none_or(|a| cmdline_has(pid, a))
            }
            _ => false,
        }
    }

    fn find_by_arg(&self, arg: &Path) -> Vec<(u32, u64)> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| cmdline_has(pid, arg))
            .filter_map(|pid| match proc_stat(pid)? {
                (s, st) if s != 'Z' && s != 'X' => Some((pid, st)),
                _ => None,
            })
            .collect()
    }

    fn find_by_arg_under(&self, dir: &Path) -> Vec<(u32, u64, PathBuf)> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let me = std::process::id();
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != me)
            .filter_map(|pid| {
                let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let arg = raw
                    .split(|&b| b == 0)
                    .map(|a| Path::new(std::ffi::OsStr::from_bytes(a)))
                    .find(|a| a.starts_with(dir) && *a != dir)?
                    .to_owned();
                match proc_stat(pid)? {
                    (s, st) if s != 'Z' && s != 'X' => Some((pid, st, arg)),
                    _ => None,
                }
            })
            .collect()
    }

    fn kill(&self, pid: u32, start_time: u64) -> BoxFuture<'static, Result<(), ProcessError>> {
        Box::pin(async move {
            let Some(fd) = pidfd_for(pid, start_time)? else {
                return Ok(());
            };
            match rustix::process::pidfd_send_signal(fd.as_fd(), Signal::KILL) {
                Ok(()) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => {
                    return Err(ProcessError::Sys {
                        op: "pidfd_send_signal",
                        pid,
                        source: e.into(),
                    });
                }
            }
            let timeout = Duration::from_secs(5);
            let fd = tokio::time::timeout(timeout, wait_readable(fd))
                .await
                .map_err(|_| ProcessError::KillTimeout { pid, timeout })?
                .map_err(|source| ProcessError::Sys {
                    op: "poll pidfd",
                    pid,
                    source,
                })?;
            reap(&fd);
            Ok(())
        })
    }

    fn wait_exit(&self, pid: u32, start_time: u64) -> BoxFuture<'static, ExitInfo> {
        Box::pin(async move {
            let unknown = || ExitInfo {
                description: "exited (status unknown: not hearthd's child)".into(),
            };
            let fd = match pidfd_for(pid, start_time) {
                Ok(Some(fd)) => fd,
                _ => return unknown(),
            };
            match wait_readable(fd).await {
                Ok(fd) => reap(&fd).map_or_else(unknown, |description| ExitInfo { description }),
                Err(_) => unknown(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_names() {
        let line = "1234 (fire cracker (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 200";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn own_process_is_alive_and_found() {
        let me = std::process::id();
        let (state, st) = proc_stat(me).unwrap();
        assert_ne!(state, 'Z');
        let host = LinuxProcesses;
        assert!(host.is_alive(me, st, None));
        assert!(!host.is_alive(me, st + 1, None));
    }

    #[tokio::test]
    async fn spawn_in_own_session_then_kill_and_reap() {
        let dir = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .unwrap();
        let marker = dir.path().join("marker-arg");
        let log = dir.path().join("console.log");
        std::fs::write(&marker, "hi\n").unwrap();
        let host = LinuxProcesses;
        // tail keeps its arguments (the marker) on its command line.
        let (pid, st) = host
            .spawn(&SpawnSpec {
                program: "/usr/bin/tail".into(),
                args: vec!["-f".into(), "/dev/null".into(), marker.clone().into()],
                console_log: log.clone(),
            })
            .unwrap();
        // Its own session: sid == pid.
        let sid = rustix::process::getsid(Pid::from_raw(pid as i32)).unwrap();
        assert_eq!(sid.as_raw_nonzero().get() as u32, pid);
        assert!(host.is_alive(pid, st, Some(&marker)));
        assert_eq!(host.find_by_arg(&marker), vec![(pid, st)]);
        // stdin is /dev/null, stdout and stderr the console log, and
        // SIGPIPE is back at its default (hearthd ignores it).
        let fd = |n: u32| std::fs::read_link(format!("/proc/{pid}/fd/{n}")).unwrap();
        assert_eq!(fd(0), Path::new("/dev/null"));
        assert_eq!((fd(1), fd(2)), (log.clone(), log.clone()));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let ignored = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE ignored");
        let exit = host.wait_exit(pid, st);
        host.kill(pid, st).await.unwrap();
        assert!(!host.is_alive(pid, st, None));
        assert!(proc_stat(pid).is_none(), "reaped, not a zombie");
        // Killing again is success; the waiter resolves.
        host.kill(pid, st).await.unwrap();
        exit.await;
    }

    #[tokio::test]
    async fn watcher_reports_exit_status() {
        let dir = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .unwrap();
        let host = LinuxProcesses;
        let (pid, st) = host
            .spawn(&SpawnSpec {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), "sleep 0.1; exit 3".into()],
                console_log: dir.path().join("c.log"),
            })
            .unwrap();
        let info = host.wait_exit(pid, st).await;
        assert_eq!(info.description, "exited with status 3");
    }
}
