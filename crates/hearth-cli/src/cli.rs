//! The command line, as clap types, and where the socket comes from.
//!
//! This module is the whole surface of `hearth`: every subcommand and flag
//! is declared here and nowhere else, so `--help`, shell completions and the
//! parsing tests all read the same definitions. It checks only what clap
//! checks (types, required flags); everything about *values* — is this a
//! valid name, an allowed vCPU count, a known capability — is the daemon's
//! call, answered with a 400, so the CLI and the daemon can never disagree.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use hearth_api::DEFAULT_KERNEL_ARGS;

/// Environment variable naming the daemon's socket.
pub const SOCKET_ENV: &str = "HEARTH_SOCKET";

/// `hearth`: run Firecracker microVMs through hearthd.
#[derive(Debug, Parser)]
#[command(name = "hearth", version, about, long_about = None)]
pub struct Cli {
    /// Print the API's JSON answer instead of human output.
    #[arg(long, global = true)]
    pub json: bool,

    /// hearthd's API socket [env: HEARTH_SOCKET] [default: the config
    /// file's `socket`].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// The config file [env: HEARTH_CONFIG] [default:
    /// /etc/hearth/hearth.toml].
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Define a VM (does not start it); prints its id.
    Create(CreateArgs),
    /// Create a VM and start it.
    Run(CreateArgs),
    /// Start a created or stopped VM.
    Start(VmArg),
    /// Stop a VM gracefully (Ctrl-Alt-Del, then SIGKILL after a timeout).
    Stop {
        /// VM name or id.
        vm: String,
        /// Seconds to wait before SIGKILL [default: the daemon's].
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Kill a VM's VMM at once and tear down what it held.
    Kill(VmArg),
    /// Delete a VM.
    #[command(visible_alias = "delete")]
    Rm {
        /// VM name or id.
        vm: String,
        /// Kill it first if it is running.
        #[arg(long, short)]
        force: bool,
    },
    /// List VMs.
    #[command(visible_alias = "list")]
    Ls,
    /// Show everything hearthd knows about a VM, as JSON.
    Inspect(VmArg),
    /// Print a VM's serial console output.
    Logs {
        /// VM name or id.
        vm: String,
        /// Keep printing new output until the VM stops.
        #[arg(long, short)]
        follow: bool,
        /// Print only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<u64>,
    },
    /// Print events (state changes, teardown and sweep actions) of one VM
    /// or of all; `-f` keeps printing new ones as they happen.
    Events {
        /// VM name or id [default: every VM].
        vm: Option<String>,
        /// Keep printing new events until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Only events after this sequence number (resume where a previous
        /// run stopped).
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        since: i64,
    },
    /// Check this host for what hearthd needs (does not need the daemon).
    Doctor {
        /// Instead, list kernel objects and files that carry hearth's mark
        /// but that no VM record claims; exits 1 if there are any. Asks
        /// hearthd, or reads the store directly when it is not running.
        #[arg(long)]
        leaks: bool,
    },
    /// Remove what `doctor --leaks` lists, in dependency order. Asks
    /// hearthd, or works from the store directly when it is not running.
    Gc,
    /// Show VMs' resource usage (CPU time, RSS, uptime) as the daemon
    /// last sampled it; `--json` adds Firecracker's metrics.
    Stats {
        /// VM name or id [default: every VM].
        vm: Option<String>,
    },
    /// Set a VM's TTL to end DURATION from now (`90s`, `30m`, `2h`), or
    /// remove it (`none`). A running VM is stopped when its TTL ends.
    Ttl {
        /// VM name or id.
        vm: String,
        /// How long from now, or `none`.
        #[arg(value_name = "DURATION|none", value_parser = parse_ttl_or_none)]
        ttl: TtlArg,
    },
    /// Print the CLI's and the daemon's versions.
    Version,
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// A subcommand's one VM argument.
#[derive(Debug, Args)]
pub struct VmArg {
    /// VM name or id.
    pub vm: String,
}

/// What `create` and `run` take: the fields of `VmSpec`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM's name.
    pub name: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    pub memory: u32,
    /// Uncompressed guest kernel (vmlinux).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Root filesystem image.
    #[arg(long, value_name = "PATH")]
    pub rootfs: PathBuf,
    /// Initrd.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_KERNEL_ARGS)]
    pub kernel_args: String,
    /// A capability (feature) for the VM; repeatable.
    #[arg(long = "cap", value_name = "CAP")]
    pub caps: Vec<String>,
    /// Stop the VM once this long has passed since the create (`90s`,
    /// `30m`, `2h`); `hearth ttl` changes it later.
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: Option<u64>,
}

/// `hearth ttl`'s argument: seconds, or `None` for `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlArg(pub Option<u64>);

/// A duration as humantime reads it (`90s`, `30m`, `2h`, `1h 30m`), in
/// whole seconds. Whether the value is allowed is the daemon's call.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 90s, 30m, 2h)"))?;
    if d.subsec_nanos() != 0 {
        return Err("a TTL is counted in whole seconds".into());
    }
    Ok(d.as_secs())
}

fn parse_ttl_or_none(s: &str) -> Result<TtlArg, String> {
    if s == "none" {
        return Ok(TtlArg(None));
    }
    parse_ttl(s).map(|secs| TtlArg(Some(secs)))
}

/// The socket to talk to: `--socket`, else `$HEARTH_SOCKET` (`env`, passed
/// in so tests need not touch the process environment), else the config
/// file's `socket` (which is the default when there is no config file).
/// The config is loaded only when needed, so a broken config file does not
/// stop a command that names its socket.
pub fn resolve_socket<E>(
    flag: Option<&Path>,
    env: Option<&OsStr>,
    config_socket: impl FnOnce() -> Result<PathBuf, E>,
) -> Result<PathBuf, E> {
    if let Some(flag) = flag {
        return Ok(flag.to_owned());
    }
    if let Some(env) = env.filter(|e| !e.is_empty()) {
        return Ok(PathBuf::from(env));
    }
    config_socket()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_with_caps() {
        let cli = parse(&[
            "hearth",
            "run",
            "web",
            "--kernel",
            "vmlinux",
            "--rootfs",
            "/r.ext4",
            "--cap",
            "nat",
            "--cap",
            "port-forward=8080:80",
            "--vcpus",
            "2",
        ]);
        let Command::Run(a) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(a.name, "web");
        assert_eq!(a.vcpus, 2);
        assert_eq!(a.memory, 128);
        assert_eq!(a.kernel, PathBuf::from("vmlinux"));
        assert_eq!(a.rootfs, PathBuf::from("/r.ext4"));
        assert_eq!(a.initrd, None);
        assert_eq!(a.kernel_args, DEFAULT_KERNEL_ARGS);
        assert_eq!(a.caps, ["nat", "port-forward=8080:80"]);
        assert!(!cli.json);
    }

    #[test]
    fn create_requires_kernel_and_rootfs() {
        assert!(Cli::try_parse_from(["hearth", "create", "a", "--kernel", "k"]).is_err());
        assert!(Cli::try_parse_from(["hearth", "create", "a", "--rootfs", "r"]).is_err());
        let cli = parse(&[
            "hearth",
            "create",
            "a",
            "--kernel",
            "k",
            "--rootfs",
            "r",
            "--memory",
            "512",
            "--initrd",
            "i",
            "--kernel-args",
            "console=ttyS0",
        ]);
        let Command::Create(a) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(a.memory, 512);
        assert_eq!(a.initrd, Some(PathBuf::from("i")));
        assert_eq!(a.kernel_args, "console=ttyS0");
        assert!(a.caps.is_empty());
    }

    #[test]
    fn events_vm_is_optional() {
        let cli = parse(&["hearth", "events"]);
        let Command::Events { vm, follow, since } = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!((vm, follow, since), (None, false, 0));
        let cli = parse(&["hearth", "events", "-f", "web", "--since", "42"]);
        let Command::Events { vm, follow, since } = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!((vm.as_deref(), follow, since), (Some("web"), true, 42));
    }

    #[test]
    fn rm_force_and_alias() {
        for args in [
            ["hearth", "rm", "--force", "web"],
            ["hearth", "delete", "web", "-f"],
        ] {
            match parse(&args).command {
                Command::Rm { vm, force } => assert_eq!((vm.as_str(), force), ("web", true)),
                other => panic!("{other:?}"),
            }
        }
        match parse(&["hearth", "rm", "web"]).command {
            Command::Rm { force, .. } => assert!(!force),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn logs_follow_tail() {
        match parse(&["hearth", "logs", "-f", "--tail", "5", "web"]).command {
            Command::Logs { vm, follow, tail } => {
                assert_eq!((vm.as_str(), follow, tail), ("web", true, Some(5)));
            }
            other => panic!("{other:?}"),
        }
        match parse(&["hearth", "logs", "web"]).command {
            Command::Logs { follow, tail, .. } => assert_eq!((follow, tail), (false, None)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn global_flags_anywhere() {
        let cli = parse(&["hearth", "ls", "--json"]);
        assert!(cli.json);
        assert!(matches!(cli.command, Command::Ls));
        let cli = parse(&["hearth", "--json", "--socket", "/s", "list"]);
        assert!(cli.json);
        assert_eq!(cli.socket, Some(PathBuf::from("/s")));
        let cli = parse(&[
            "hearth",
            "stop",
            "web",
            "--timeout",
            "3",
            "--config",
            "/c.toml",
        ]);
        assert_eq!(cli.config, Some(PathBuf::from("/c.toml")));
        match cli.command {
            Command::Stop { vm, timeout } => assert_eq!((vm.as_str(), timeout), ("web", Some(3))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn clap_checks_types_only() {
        // A non-number is clap's to refuse; an odd vCPU count is the daemon's.
        assert!(Cli::try_parse_from(["hearth", "stop", "web", "--timeout", "soon"]).is_err());
        let cli = parse(&[
            "hearth", "create", "BAD_NAME", "--vcpus", "3", "--kernel", "k", "--rootfs", "r",
        ]);
        assert!(matches!(cli.command, Command::Create(a) if a.vcpus == 3 && a.name == "BAD_NAME"));
        assert!(Cli::try_parse_from(["hearth", "completions", "bash"]).is_ok());
        assert!(Cli::try_parse_from(["hearth", "completions", "tcsh"]).is_err());
    }

    #[test]
    fn ttls_parse_as_durations() {
        let cli = parse(&[
            "hearth", "run", "a", "--kernel", "k", "--rootfs", "r", "--ttl", "30m",
        ]);
        assert!(matches!(cli.command, Command::Run(a) if a.ttl == Some(1800)));
        let cli = parse(&["hearth", "create", "a", "--kernel", "k", "--rootfs", "r"]);
        assert!(matches!(cli.command, Command::Create(a) if a.ttl.is_none()));
        for (arg, want) in [("2h", Some(7200)), ("90s", Some(90)), ("none", None)] {
            match parse(&["hearth", "ttl", "web", arg]).command {
                Command::Ttl { vm, ttl } => assert_eq!((vm.as_str(), ttl), ("web", TtlArg(want))),
                other => panic!("{other:?}"),
            }
        }
        // Zero is a duration (the daemon refuses it); these are not.
        assert_eq!(parse_ttl("0s"), Ok(0));
        for bad in ["soon", "1.5s", "30", ""] {
            assert!(
                Cli::try_parse_from(["hearth", "ttl", "web", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(Cli::try_parse_from(["hearth", "ttl", "web"]).is_err());
        match parse(&["hearth", "stats"]).command {
            Command::Stats { vm } => assert_eq!(vm, None),
            other => panic!("{other:?}"),
        }
        match parse(&["hearth", "stats", "web", "--json"]).command {
            Command::Stats { vm } => assert_eq!(vm.as_deref(), Some("web")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn socket_resolution_order() {
        let config = || Ok::<_, String>(PathBuf::from("/from/config.sock"));
        let broken = || Err::<PathBuf, _>("broken config".to_owned());
        let flag = Some(Path::new("/from/flag.sock"));
        let env = Some(OsStr::new("/from/env.sock"));

        assert_eq!(
            resolve_socket(flag, env, broken),
            Ok("/from/flag.sock".into())
        );
        assert_eq!(
            resolve_socket(None, env, broken),
            Ok("/from/env.sock".into())
        );
        assert_eq!(
            resolve_socket(None, None, config),
            Ok("/from/config.sock".into())
        );
        // An empty variable counts as unset.
        assert_eq!(
            resolve_socket(None, Some(OsStr::new("")), config),
            Ok("/from/config.sock".into())
        );
        assert_eq!(
            resolve_socket(None, None, broken),
            Err("broken config".into())
        );
        // No config file: the config's default socket.
        let default = || Ok::<_, String>(hearthd::config::Config::default().socket);
        assert_eq!(
            resolve_socket(None, None, default),
            Ok("/run/hearth/hearth.sock".into())
        );
    }
}
