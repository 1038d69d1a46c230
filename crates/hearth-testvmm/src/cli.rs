//! Command line and process start, in Firecracker's order: parse
//! arguments, validate the instance id, configure the logger, announce the
//! version, install signal handlers, configure metrics, bind the API
//! socket (refusing an existing path), then serve.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::{LevelFilter, LoggerConfig};
use crate::faults::{self, Faults};
use crate::fclog::{self, Level, Logger, Metrics, Thread};
use crate::server::Server;
use crate::vmm::Vmm;
use crate::{FIRECRACKER_VERSION, VMM_VERSION, guest};

const ABOUT: &str = "TEST STAND-IN for Firecracker: serves Firecracker's HTTP API on a Unix socket but runs no guest.";

const LONG_ABOUT: &str = "\
TEST STAND-IN for Firecracker: serves Firecracker's HTTP API on a Unix socket but runs no guest.

hearth-testvmm answers the subset of Firecracker v1.16's API that hearth uses
(GET /, GET /version, GET|PUT|PATCH /machine-config, PUT /logger, /metrics,
/boot-source, /drives/{id}, /network-interfaces/{id}, /actions) with
Firecracker's validation, status codes and fault messages. It opens the files
it is given as Firecracker does, attaches the taps it is given with TUNSETIFF,
and checks the kernel as Firecracker's ELF loader does, but it creates no VM:
after InstanceStart it prints a few console lines to stdout, and after
SendCtrlAltDel it exits 0 as Firecracker does when its guest reboots.
With an ip= kernel argument it also plays the guest's network stack on the
tap (see below). Other Firecracker endpoints answer 400 saying the stand-in
does not implement them.";

const AFTER_LONG_HELP: &str = "\
Guest network: when the kernel command line (boot_args) has Linux's static
  ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:...
argument (e.g. ip=10.231.0.6::10.231.0.5:255.255.255.252::eth0:off; trailing
fields may be left out; DHCP is not emulated) and the device (eth0 = the first
network interface configured) exists, InstanceStart brings up a small TCP/IP
stack on its tap in the guest's place: the interface's guest_mac, the address
and netmask, a default route via the gateway. It answers ARP and ping, and on
port 7 serves
  UDP  echo;
  TCP  echo (a few connections at once), except that a line
       \"CONNECT <ip>:<port>\\n\" makes the guest open one TCP connection to
       <ip>:<port>, send \"hello from <guest-ip>\\n\", read one line back, close
       it, and answer \"OK <that line>\\n\" or \"ERR <reason>\\n\" (3 s timeout).
It announces itself on stdout (the console) with
  hearth-testvmm: guest network eth0 <ip>/<prefix> gw <gw> mac <mac>: up
or says \"hearth-testvmm: guest network not started: <why>\" (a bad ip=). Without
an ip= argument or a network interface, no stack runs and the taps stay silent.

Fault injection (environment; for tests of whatever supervises this process):
  HEARTH_TESTVMM_CRASH=<point>  die by SIGABRT (no core dump) at <point>,
                                without answering the request that triggered it
  HEARTH_TESTVMM_HANG=<point>   from <point> on, accept API connections and read
                                requests but never answer any

  <point> is one of:
    before-start        when PUT /actions {\"action_type\": \"InstanceStart\"} arrives
    after-start:<ms>    <ms> milliseconds after a successful InstanceStart
    on-put:<path>       when a PUT to exactly <path> arrives (e.g. on-put:/boot-source);
                        a trailing '*' matches by prefix (e.g. on-put:/drives/*)

  e.g. HEARTH_TESTVMM_CRASH=after-start:200, HEARTH_TESTVMM_HANG=after-start:0

Exit status: 0 after SendCtrlAltDel (or --help, --version, --write-test-guest);
1 when the API socket path already exists or another start-up step fails;
152 for a bad --level; 153 for bad arguments; killed by SIGABRT for an invalid
--id (as Firecracker's panic) or an injected crash; 156 on SIGHUP.";

/// Command line: Firecracker's flags (those hearth passes, plus the logging
/// ones, which work as in Firecracker; `--boot-timer` and `--no-seccomp`
/// are accepted and change nothing), plus `--write-test-guest`.
#[derive(Debug, Parser)]
#[command(
    name = "hearth-testvmm",
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = "Guest network and fault-injection variables: see --help.",
    after_long_help = AFTER_LONG_HELP,
    disable_version_flag = true
)]
pub struct Cli {
    /// Path of the Unix socket to serve the API on; must not exist yet.
    #[arg(long, value_name = "PATH", default_value = "/run/firecracker.socket")]
    api_sock: PathBuf,

    /// MicroVM identifier: 1 to 64 alphanumeric characters or '-'.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    id: String,

    /// Log to this file or named pipe instead of stdout.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,

    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long, value_name = "LEVEL")]
    level: Option<String>,

    /// Log only records from modules whose path starts with this.
    #[arg(long, value_name = "MODULE")]
    module: Option<String>,

    /// Show the level in log lines.
    #[arg(long)]
    show_level: bool,

    /// Show file and line in log lines.
    #[arg(long)]
    show_log_origin: bool,

    /// Write metrics to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,

    /// Accepted for compatibility; no effect (there is no guest to time).
    #[arg(long)]
    boot_timer: bool,

    /// Accepted for compatibility; no effect (no seccomp filters are installed).
    #[arg(long)]
    no_seccomp: bool,

    /// Largest API request body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 51200)]
    http_api_max_payload_size: usize,

    /// Print the version and exit.
    #[arg(long)]
    version: bool,

    /// Write a tiny x86-64 ELF "kernel" that real Firecracker boots (it
    /// prints to the serial console and resets on Ctrl+Alt+Del) to PATH,
    /// and exit.
    #[arg(long, value_name = "PATH")]
    write_test_guest: Option<PathBuf>,
}

/// Firecracker's `validate_instance_id`; `Err` is its `ValidatorError`'s
/// `Debug` form.
fn validate_instance_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("InvalidLen({}, 1, 64)", id.len()));
    }
    match id
        .chars()
        .enumerate()
        .find(|(_, c)| !(*c == '-' || c.is_alphanumeric()))
    {
        Some((i, c)) => Err(format!("InvalidChar({c:?}, {i})")),
        None => Ok(()),
    }
}

extern "C" fn on_sighup(_: libc::c_int) {
    // SAFETY: `_exit` is async-signal-safe.
    unsafe { libc::_exit(156) }
}

/// Fails start-up as Firecracker's `main` does: the error to the log, its
/// `Debug` form to stderr, then the exit line to the log.
fn fail(log: &mut Logger, display: &str, debug: &str, code: u8) -> ExitCode {
    log.log(Level::Error, Thread::Main, "firecracker", display);
    eprintln!("Error: {debug}");
    log.log(
        Level::Error,
        Thread::Main,
        "firecracker",
        &format!("Firecracker exiting with error. exit_code={code}"),
    );
    ExitCode::from(code)
}

/// Runs the program; `main` only calls this.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Firecracker's FcExitCode::ArgParsing.
            return if e.use_stderr() {
                ExitCode::from(153)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if cli.version {
        println!(
            "hearth-testvmm {} (TEST STAND-IN for Firecracker v{FIRECRACKER_VERSION}: serves its API, runs no guest)",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.write_test_guest {
        return match std::fs::write(path, guest::test_guest_elf()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hearth-testvmm: cannot write {}: {e}", path.display());
                ExitCode::FAILURE
            }
        };
    }
    let faults = match Faults::from_env() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hearth-testvmm: {e}");
            return ExitCode::FAILURE;
        }
    };

    if let Err(why) = validate_instance_id(&cli.id) {
        // Firecracker panics here (`expect("Invalid instance ID")`) and,
        // built with panic = "abort", dies by SIGABRT; its panic hook logs
        // to stdout under the default instance id.
        let mut early = Logger::new("anonymous-instance");
        early.log(
            Level::Error,
            Thread::Main,
            "firecracker",
            &format!(
                "Firecracker panicked at src/firecracker/src/main.rs: Invalid instance ID: {why}"
            ),
        );
        eprintln!(
            "hearth-testvmm: --id {:?}: Invalid instance ID: {why}",
            cli.id
        );
        faults::abort_without_core();
    }

    let mut log = Logger::new(&cli.id);
    let level = match cli
        .level
        .as_deref()
        .map(str::parse::<LevelFilter>)
        .transpose()
    {
        Ok(l) => l,
        Err(e) => {
            return fail(
                &mut log,
                &format!(
                    "Invalid value for logger level: {e}.Possible values: [Error, Warning, Info, Debug]"
                ),
                &format!("InvalidLogLevel({e:?})"),
                152,
            );
        }
    };
    if let Err(e) = log.update(LoggerConfig {
        log_path: cli.log_path.clone(),
        level,
        show_level: cli.show_level.then_some(true),
        show_log_origin: cli.show_log_origin.then_some(true),
        module: cli.module.clone(),
    }) {
        return fail(
            &mut log,
            &format!("Could not initialize logger: Failed to open target file: {e}"),
            &format!("LoggerInitialization(LoggerUpdateError({e:?}))"),
            1,
        );
    }
    log.log(
        Level::Info,
        Thread::Main,
        "firecracker",
        &format!("Running Firecracker v{VMM_VERSION}"),
    );

    // SAFETY: installs a handler that only calls `_exit`.
    unsafe {
        libc::signal(
            libc::SIGHUP,
            on_sighup as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }

    let mut metrics = Metrics::default();
    if let Some(path) = &cli.metrics_path {
        let opened = fclog::open_file_nonblock(path).map_err(|e| e.to_string());
        if let Err(e) = opened.and_then(|f| metrics.init(f).map_err(|e| e.to_string())) {
            return fail(
                &mut log,
                &format!(
                    "Could not initialize metrics: Cannot initialize the metrics system due to bad user input: {e}"
                ),
                &format!("MetricsInitialization(InitializationFailure({e:?}))"),
                1,
            );
        }
    }

    let listener = match std::os::unix::net::UnixListener::bind(&cli.api_sock) {
        Ok(l) => l,
        Err(e) => {
            let (debug, display) = if e.kind() == std::io::ErrorKind::AddrInUse {
                (
                    format!(
                        "FailedToBindSocket({:?})",
                        cli.api_sock.display().to_string()
                    ),
                    format!(
                        "Failed to open the API socket at: {}. Check that it is not already used.",
                        cli.api_sock.display()
                    ),
                )
            } else {
                (
                    format!("FailedToBindAndRunHttpServer(IOError({e:?}))"),
                    format!("Failed to bind and run the HTTP server: IO error: {e}"),
                )
            };
            return fail(
                &mut log,
                &format!("RunWithApiError error: {display}"),
                &format!("RunWithApi({debug})"),
                1,
            );
        }
    };
    log.log(
        Level::Info,
        Thread::Main,
        "firecracker",
        &format!("Listening on API socket ({:?}).", cli.api_sock),
    );
    let _ = std::io::stdout().flush();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hearth-testvmm: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = Server::new(
        Vmm::new(&cli.id, log, metrics),
        faults,
        cli.http_api_max_payload_size,
    );
    runtime.block_on(async move {
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(listener))
        {
            Ok(l) => l,
            Err(e) => {
                eprintln!("hearth-testvmm: cannot use the API socket: {e}");
                return ExitCode::FAILURE;
            }
        };
        server.serve(listener).await;
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_id_rules_match_firecracker() {
        assert!(validate_instance_id("vm-1").is_ok());
        assert!(validate_instance_id(&"a".repeat(64)).is_ok());
        assert_eq!(validate_instance_id(""), Err("InvalidLen(0, 1, 64)".into()));
        assert_eq!(
            validate_instance_id(&"a".repeat(65)),
            Err("InvalidLen(65, 1, 64)".into())
        );
        assert_eq!(
            validate_instance_id("a_b"),
            Err("InvalidChar('_', 1)".into())
        );
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
