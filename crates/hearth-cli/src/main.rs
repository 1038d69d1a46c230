//! `hearth`: the command line for `hearthd`.
//!
//! The CLI is a thin client by design (DESIGN.md: "the CLI holds no logic"):
//! each subcommand is one API call (`run` is two: create, then start), its
//! answer printed either as JSON (`--json`) or as a short human form. All
//! validation and every state decision is the daemon's, so a rule lives in
//! one place and scripts that speak the HTTP API see the same behaviour as
//! the CLI. The one transformation is making user-given paths absolute,
//! because the daemon resolves paths against its own working directory.
//!
//! Errors are printed once, here at the edge: the daemon's message and its
//! cause chain, or — when nothing listens on the socket — one line saying
//! so, since a stack of connect errors helps nobody.

mod cli;
mod output;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser as _};
use hearth_api::client::{ClientError, HttpBody, HttpMethod, HttpStatus, UnixConnection};
use hearth_api::{
    CreateVmRequest, ErrorBody, Event, Orphan, StopRequest, Version, Vm, VmSpec, routes,
};
use hearthd::config::Config;
use http_body_util::BodyExt as _;

use crate::cli::{Cli, Command, CreateArgs, SOCKET_ENV, VmArg};

/// The daemon is not there: no socket, or nobody listening on it.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach hearthd at {}: is it running?", socket.display())]
struct Unreachable {
    socket: PathBuf,
}

/// The socket exists but this user may not connect to it.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach hearthd at {}: permission denied (hearthd's socket is for root)", socket.display())]
struct Forbidden {
    socket: PathBuf,
}

/// The daemon answered with an error status.
#[derive(Debug, thiserror::Error)]
#[error("{}", body.message)]
struct ApiError {
    body: ErrorBody,
}

impl ApiError {
    /// Reads an error answer; a body that is not an [`ErrorBody`] (a proxy,
    /// a framework rejection) is kept as the message.
    fn new(status: HttpStatus, body: &[u8]) -> ApiError {
        let body = serde_json::from_slice::<ErrorBody>(body).unwrap_or_else(|_| {
            let text = String::from_utf8_lossy(body).trim().to_owned();
            ErrorBody {
                code: status.as_u16().to_string(),
                message: if text.is_empty() {
                    format!("hearthd answered {status}")
                } else {
                    format!("hearthd answered {status}: {text}")
                },
                chain: vec![],
            }
        });
        ApiError { body }
    }
}

/// The daemon's socket and the calls on it.
struct Api {
    socket: PathBuf,
}

impl Api {
    fn client_error(&self, err: ClientError) -> anyhow::Error {
        match &err {
            ClientError::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Forbidden {
                    socket: self.socket.clone(),
                }
                .into()
            }
            e if e.is_unreachable() => Unreachable {
                socket: self.socket.clone(),
            }
            .into(),
            _ => err.into(),
        }
    }

    /// One request; the body of a 2xx answer, else an [`ApiError`].
    async fn call(&self, method: HttpMethod, uri: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>> {
        let resp = hearth_api::client::request(&self.socket, method, uri, body)
            .await
            .map_err(|e| self.client_error(e))?;
        if !resp.status.is_success() {
            return Err(ApiError::new(resp.status, &resp.body).into());
        }
        Ok(resp.body.to_vec())
    }

    /// One GET whose answer is read as it arrives: the body of a 2xx
    /// answer, else an [`ApiError`].
    async fn stream(&self, uri: &str) -> Result<HttpBody> {
        let mut conn = UnixConnection::connect(&self.socket)
            .await
            .map_err(|e| self.client_error(e))?;
        let (status, body) = conn
            .send_streaming(HttpMethod::GET, uri, None)
            .await
            .map_err(|e| self.client_error(e))?;
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .context("the error answer from hearthd broke off")?
                .to_bytes();
            return Err(ApiError::new(status, &bytes).into());
        }
        Ok(body)
    }

    /// One request whose answer is JSON: the raw body and its parsed form.
    async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        method: HttpMethod,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(Vec<u8>, T)> {
        let raw = self.call(method.clone(), uri, body).await?;
        let parsed = serde_json::from_slice(&raw)
            .with_context(|| format!("unexpected answer from hearthd to {method} {uri}"))?;
        Ok((raw, parsed))
    }
}

/// Percent-encodes a VM name or id for use as one path segment, so that
/// whatever the user typed reaches the daemon as that segment (and is
/// judged there) rather than changing the route.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn vm_uri(vm: &str) -> String {
    routes::vm(&segment(vm))
}

fn vm_action_uri(vm: &str, action: &str) -> String {
    routes::vm_action(&segment(vm), action)
}

/// Writes to stdout; a closed pipe (`hearth ls | head -1`) ends output
/// quietly instead of failing.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

fn emit_line(text: &str) -> Result<()> {
    emit(&format!("{text}\n"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn load_config(explicit: Option<&Path>) -> Result<Config> {
    Config::load(explicit).context("cannot load hearth's config")
}

fn socket_of(cli: &Cli) -> Result<PathBuf> {
    let env = std::env::var_os(SOCKET_ENV);
    cli::resolve_socket(cli.socket.as_deref(), env.as_deref(), || {
        load_config(cli.config.as_deref())
            .map(|c| c.socket)
            .context("cannot find hearthd's socket (use --socket)")
    })
}

/// The request `create` and `run` send: the flags, paths made absolute.
fn create_request(a: &CreateArgs) -> Result<CreateVmRequest> {
    let abs = |p: &Path| {
        std::path::absolute(p).with_context(|| format!("cannot make {} absolute", p.display()))
    };
    Ok(CreateVmRequest {
        name: a.name.clone(),
        spec: VmSpec {
            vcpus: a.vcpus,
            memory_mib: a.memory,
            kernel: abs(&a.kernel)?,
            rootfs: abs(&a.rootfs)?,
            initrd: a.initrd.as_deref().map(abs).transpose()?,
            kernel_args: a.kernel_args.clone(),
            capabilities: a.caps.clone(),
        },
        ttl_secs: a.ttl,
    })
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    // Commands that need no daemon.
    match &cli.command {
        Command::Doctor { leaks: true } => return sweep(&cli, false).await,
        Command::Gc => return sweep(&cli, true).await,
        Command::Doctor { leaks: false } => {
            let config = load_config(cli.config.as_deref())?;
            let report = hearthd::doctor::run(&config);
            return if json {
                emit_line(&serde_json::to_string_pretty(&report)?)
            } else {
                emit(&hearthd::doctor::print_human(&report))
            };
        }
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "hearth", &mut buf);
            return emit(&String::from_utf8_lossy(&buf));
        }
        Command::Version => return version(&cli).await,
        _ => {}
    }

    let api = Api {
        socket: socket_of(&cli)?,
    };
    // A VM answer: JSON, or `name state`.
    let vm_answer = |raw: &[u8], vm: &Vm| {
        if json {
            emit_line(&output::pretty_json(raw))
        } else {
            emit_line(&format!("{} {}", vm.name, vm.state))
        }
    };
    match &cli.command {
        Command::Create(args) => {
            let body = serde_json::to_vec(&create_request(args)?)?;
            let (raw, vm): (_, Vm) = api
                .call_json(HttpMethod::POST, "/v1/vms", Some(body))
                .await?;
            emit_line(&if json {
                output::pretty_json(&raw)
            } else {
                vm.id.to_string()
            })
        }
        Command::Run(args) => {
            let body = serde_json::to_vec(&create_request(args)?)?;
            let (_, vm): (_, Vm) = api
                .call_json(HttpMethod::POST, "/v1/vms", Some(body))
                .await?;
            if !json {
                emit_line(&vm.id.to_string())?;
            }
            let (raw, vm): (_, Vm) = api
                .call_json(
                    HttpMethod::POST,
                    &vm_action_uri(&vm.id.to_string(), "start"),
                    None,
                )
                .await
                .with_context(|| format!("VM {} was created but did not start", vm.name))?;
            if json {
                emit_line(&output::pretty_json(&raw))
            } else {
                emit_line(&format!("{} {}", vm.name, vm.state))
            }
        }
        Command::Start(VmArg { vm }) | Command::Kill(VmArg { vm }) => {
            let action = if matches!(cli.command, Command::Start(_)) {
                "start"
            } else {
                "kill"
            };
            let (raw, vm): (_, Vm) = api
                .call_json(HttpMethod::POST, &vm_action_uri(vm, action), None)
                .await?;
            vm_answer(&raw, &vm)
        }
        Command::Stop { vm, timeout } => {
            let body = serde_json::to_vec(&StopRequest {
                timeout_secs: *timeout,
            })?;
            let (raw, vm): (_, Vm) = api
                .call_json(HttpMethod::POST, &vm_action_uri(vm, "stop"), Some(body))
                .await?;
            vm_answer(&raw, &vm)
        }
        Command::Rm { vm, force } => {
            let uri = format!("{}?force={force}", vm_uri(vm));
            api.call(HttpMethod::DELETE, &uri, None).await?;
            if json { Ok(()) } else { emit_line(vm) }
        }
        Command::Ls => {
            let (raw, vms): (_, Vec<Vm>) = api.call_json(HttpMethod::GET, "/v1/vms", None).await?;
            if json {
                emit_line(&output::pretty_json(&raw))
            } else {
                emit(&output::vm_table(&vms, now_ms()))
            }
        }
        Command::Inspect(VmArg { vm }) => {
            let (raw, _): (_, Vm) = api.call_json(HttpMethod::GET, &vm_uri(vm), None).await?;
            emit_line(&output::pretty_json(&raw))
        }
        Command::Events { vm, follow, since } => {
            events(&api, vm.as_deref(), *follow, *since, json).await
        }
        Command::Logs { vm, follow, tail } => logs(&api, vm, *follow, *tail).await,
        Command::Stats { vm } => {
            let (raw, stats): (_, Vec<hearth_api::VmStats>) = match vm {
                Some(vm) => {
                    let (raw, one) = api
                        .call_json(HttpMethod::GET, &vm_action_uri(vm, "stats"), None)
                        .await?;
                    (raw, vec![one])
                }
                None => api.call_json(HttpMethod::GET, "/v1/stats", None).await?,
            };
            if json {
                emit_line(&output::pretty_json(&raw))
            } else {
                emit(&output::stats_table(&stats, now_ms()))
            }
        }
        Command::Ttl { vm, ttl } => {
            let body = serde_json::to_vec(&hearth_api::TtlRequest { ttl_secs: ttl.0 })?;
            let (raw, vm): (_, Vm) = api
                .call_json(HttpMethod::POST, &vm_action_uri(vm, "ttl"), Some(body))
                .await?;
            if json {
                emit_line(&output::pretty_json(&raw))
            } else {
                emit_line(&output::ttl_line(&vm, now_ms()))
            }
        }
        Command::Doctor { .. } | Command::Gc | Command::Completions { .. } | Command::Version => {
            Ok(())
        }
    }
}

/// Streams the console: each chunk is written as it arrives, so `-f`
/// shows output live. The console is text; `--json` does not change it.
/// `doctor --leaks` (`remove` false) and `gc`: through hearthd, or — when
/// it is not running — straight from the store, saying so.
async fn sweep(cli: &Cli, remove: bool) -> Result<()> {
    let api = Api {
        socket: socket_of(cli)?,
    };
    let (method, uri) = if remove {
        (HttpMethod::POST, "/v1/gc")
    } else {
        (HttpMethod::GET, "/v1/leaks")
    };
    let orphans: Vec<Orphan> = match api.call_json(method, uri, None).await {
        Ok((_, orphans)) => orphans,
        Err(e) if e.downcast_ref::<Unreachable>().is_some() => {
            eprintln!(
                "hearthd is not running at {}: reading the store directly",
                api.socket.display()
            );
            let config = load_config(cli.config.as_deref())?;
            hearthd::sweep::offline(&config, remove).await?
        }
        Err(e) => return Err(e),
    };
    if cli.json {
        emit_line(&serde_json::to_string_pretty(&orphans)?)?;
    } else {
        emit(&output::orphans(&orphans, remove))?;
    }
    if !remove && !orphans.is_empty() || orphans.iter().any(|o| o.error.is_some()) {
        std::process::exit(1);
    }
    Ok(())
}

async fn logs(api: &Api, vm: &str, follow: bool, tail: Option<u64>) -> Result<()> {
    let mut uri = format!("{}?follow={follow}", vm_action_uri(vm, "console"));
    if let Some(n) = tail {
        uri.push_str(&format!("&tail={n}"));
    }
    let mut body = api.stream(&uri).await?;
    let mut stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the console stream from hearthd broke off")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        match stdout.write_all(&data).and_then(|()| stdout.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
    }
    Ok(())
}

/// Prints events as `GET /v1/events` sends them: JSON lines with `--json`;
/// else a table, measured over every row when the answer is complete, or
/// with `-f` fixed-width and printed row by row as events happen.
async fn events(api: &Api, vm: Option<&str>, follow: bool, since: i64, json: bool) -> Result<()> {
    let uri = routes::events(since, follow, vm.map(segment).as_deref());
    let mut body = api.stream(&uri).await?;
    let with_vm = vm.is_none();
    let mut stdout = std::io::stdout();
    // Ok(false): the reader went away (`hearth events -f | head`); stop.
    let mut out = |text: &str| match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("cannot write to stdout"),
    };
    if follow && !json && !out(&output::event_header_line(with_vm))? {
        return Ok(());
    }
    let mut pending = Vec::new();
    let mut all = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the event stream from hearthd broke off")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = &line[..end];
            if line.is_empty() {
                continue;
            }
            let text = if json {
                format!("{}\n", String::from_utf8_lossy(line))
            } else {
                let event: Event =
                    serde_json::from_slice(line).context("unexpected event line from hearthd")?;
                if !follow {
                    all.push(event);
                    continue;
                }
                output::event_line(&event, with_vm)
            };
            if !out(&text)? {
                return Ok(());
            }
        }
    }
    if !follow && !json {
        out(&output::events_table(&all, with_vm))?;
    }
    Ok(())
}

/// The CLI's version, and the daemon's when it answers. Never fails
/// because the daemon is away: that is part of the answer.
async fn version(cli: &Cli) -> Result<()> {
    let cli_version = env!("CARGO_PKG_VERSION");
    let daemon: Result<Version> = async {
        let api = Api {
            socket: socket_of(cli)?,
        };
        Ok(api.call_json(HttpMethod::GET, "/v1/version", None).await?.1)
    }
    .await;
    if cli.json {
        let v = serde_json::json!({
            "cli": { "version": cli_version },
            "daemon": daemon.as_ref().ok(),
            "daemon_error": daemon.as_ref().err().map(|e| format!("{e:#}")),
        });
        return emit_line(&serde_json::to_string_pretty(&v)?);
    }
    let mut text = format!("hearth   {cli_version}\n");
    match daemon {
        Ok(v) => text.push_str(&format!(
            "hearthd  {}\nvmm      {}\n",
            v.version, v.vmm_binary
        )),
        Err(e) => text.push_str(&format!("hearthd  ({e:#})\n")),
    }
    emit(&text)
}

/// The stderr lines for an error: the API's message and chain, or one
/// line for an unreachable daemon, or anyhow's chain for the rest.
fn error_report(err: &anyhow::Error) -> String {
    // Each cause's message, with an API error expanded into the daemon's
    // message and chain (it is always the innermost error we hold).
    let mut lines = Vec::new();
    for cause in err.chain() {
        if let Some(api) = cause.downcast_ref::<ApiError>() {
            lines.push(api.body.message.clone());
            lines.extend(api.body.chain.iter().cloned());
            break;
        }
        lines.push(cause.to_string());
    }
    let (first, rest) = lines
        .split_first()
        .map_or(("", &[][..]), |(f, r)| (f.as_str(), r));
    output::error_lines(first, rest)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprint!("{}", error_report(&err));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("web-1"), "web-1");
        assert_eq!(segment("0190f3a2-1b2c-7d4e"), "0190f3a2-1b2c-7d4e");
        assert_eq!(segment("a/b?c d"), "a%2Fb%3Fc%20d");
        assert_eq!(vm_action_uri("x/y", "start"), "/v1/vms/x%2Fy/start");
    }

    #[test]
    fn paths_become_absolute_and_nothing_else_changes() {
        let cli = Cli::try_parse_from([
            "hearth", "create", "Web", "--vcpus", "3", "--kernel", "vmlinux", "--rootfs", "/r",
            "--initrd", "../i", "--cap", "nat",
        ])
        .unwrap();
        let Command::Create(args) = &cli.command else {
            panic!()
        };
        let req = create_request(args).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(req.name, "Web");
        assert_eq!(req.spec.vcpus, 3);
        assert_eq!(req.spec.kernel, cwd.join("vmlinux"));
        assert_eq!(req.spec.rootfs, PathBuf::from("/r"));
        assert_eq!(req.spec.initrd, Some(cwd.join("../i")));
        assert_eq!(req.spec.capabilities, ["nat"]);
        assert_eq!(req.spec.kernel_args, hearth_api::DEFAULT_KERNEL_ARGS);
    }

    #[test]
    fn error_reports() {
        let api = ApiError::new(
            HttpStatus::CONFLICT,
            br#"{"code":"conflict","message":"VM web is running","chain":["state running","gen 4"]}"#,
        );
        assert_eq!(
            error_report(&api.into()),
            "error: VM web is running\n  caused by: state running\n  caused by: gen 4\n"
        );

        let unreachable = anyhow::Error::from(Unreachable {
            socket: "/run/x.sock".into(),
        });
        assert_eq!(
            error_report(&unreachable),
            "error: cannot reach hearthd at /run/x.sock: is it running?\n"
        );

        let plain = ApiError::new(HttpStatus::UNPROCESSABLE_ENTITY, b"Failed to parse JSON\n");
        assert_eq!(
            error_report(&plain.into()),
            "error: hearthd answered 422 Unprocessable Entity: Failed to parse JSON\n"
        );

        let wrapped = anyhow::Error::from(ApiError::new(
            HttpStatus::INTERNAL_SERVER_ERROR,
            br#"{"code":"internal","message":"cannot create tap","chain":["EPERM"]}"#,
        ))
        .context("VM web was created but did not start");
        assert_eq!(
            error_report(&wrapped),
            "error: VM web was created but did not start\n  caused by: cannot create tap\n  caused by: EPERM\n"
        );
    }
}
