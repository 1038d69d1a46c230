//! `hearthd`: loads the config, opens the store, rebuilds every VM's
//! in-memory state from it (re-adopting live VMMs), then serves the API on
//! a Unix socket. On SIGTERM or SIGINT it stops serving and exits, leaving
//! every VM running (DESIGN.md, invariant 4).
//!
//! Memory (issue 6): glibc's allocator keeps what a burst of operations
//! made resident. Each thread that allocates may get an arena of its own
//! (up to eight per core, and the blocking pool grows to tens of threads
//! under load), an arena is never unmapped, and `free` gives back only
//! memory at the top of a heap: RSS stayed near the burst's peak for good.
//! So hearthd caps malloc at two arenas and trims the heap once the daemon
//! is quiet ([`trim_when_idle`]).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use hearthd::capability::HostNet;
use hearthd::config::{Config, DiskStrategy, Ipv4Net};
use hearthd::host::net::NetHost;
use hearthd::lifecycle::Lifecycle;
use hearthd::store::Store;
use hearthd::vmm::firecracker::Firecracker;

/// The hearth daemon: runs Firecracker microVMs and owns every kernel
/// object they need.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Config file (default /etc/hearth/hearth.toml when it exists).
    #[arg(long, env = "HEARTH_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Overrides `socket`.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Overrides `vmm_binary`.
    #[arg(long)]
    vmm_binary: Option<PathBuf>,
    /// Print every failpoint name and exit (crash-harness builds only).
    #[cfg(feature = "failpoints")]
    #[arg(long)]
    list_failpoints: bool,
}

/// Refuses to run beside a live daemon on the same socket, and removes a
/// socket file a dead daemon left behind.
async fn claim_socket(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another hearthd is already serving {}; refusing to start",
                path.display()
            );
        }
        tracing::info!(socket = %path.display(), "removing stale socket left by a dead daemon");
        std::fs::remove_file(path).with_context(|| format!("remove {}", path.display()))?;
    }
    let listener =
        tokio::net::UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Finds the uplink and refuses an address pool that collides with a host
/// route (other than hearth's own taps).
async fn check_network(config: &Config, net: &dyn NetHost) -> anyhow::Result<HostNet> {
    let pool = config.pool();
    let routes = net.routes().await.context("read the routing table")?;
    for r in &routes {
        let ours = r.oif.as_deref().is_some_and(|o| o.starts_with("hth"));
        let net = Ipv4Net {
            addr: r.dst,
            prefix_len: r.prefix_len,
        };
        if r.prefix_len > 0 && !ours && net.overlaps(pool) {
            bail!(
                "address_pool {pool} overlaps the host route {net}{}; choose another pool",
                r.oif
                    .as_deref()
                    .map(|o| format!(" dev {o}"))
                    .unwrap_or_default()
            );
        }
    }
    let uplink = if config.uplink.is_empty() {
        routes
            .iter()
            .find(|r| r.prefix_len == 0)
            .and_then(|r| r.oif.clone())
    } else {
        Some(config.uplink.clone())
    };
    match &uplink {
        Some(u) => tracing::info!(uplink = %u, pool = %pool, "network"),
        None => {
            tracing::warn!(pool = %pool, "no default route and no `uplink` set: VMs with nat cannot start")
        }
    }
    Ok(HostNet { uplink })
}

async fn run(args: Args) -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    if args.list_failpoints {
        for name in hearthd::failpoint::ALL {
            println!("{name}");
        }
        return Ok(());
    }
    let armed = hearthd::failpoint::init_from_env().map_err(anyhow::Error::msg)?;
    if armed > 0 {
        tracing::warn!(armed, "failpoints armed (crash-harness build)");
    }
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(d) = args.state_dir {
        config.state_dir = d;
    }
    if let Some(s) = args.socket {
        config.socket = s;
    }
    if let Some(v) = args.vmm_binary {
        config.vmm_binary = v;
    }
    config.check_paths()?;
    let vmm_binary = config.resolve_vmm_binary().with_context(|| {
        format!(
            "VMM binary {} not found (set vmm_binary; `hearth doctor` explains)",
            config.vmm_binary.display()
        )
    })?;
    let _lock = hearthd::daemon::lock_state_dir(&config)?;
    let store = Arc::new(Store::open(&config.db_path())?);
    let host = hearthd::daemon::linux_host()?;
    if config.disk_strategy == DiskStrategy::DmSnapshot && !host.disk.dm_available() {
        bail!(
            "disk_strategy is dm-snapshot but device-mapper does not work on this host (`hearth doctor` explains)"
        );
    }
    let host_net = check_network(&config, host.net.as_ref()).await?;
    let lifecycle = Lifecycle::new(
        store,
        config.clone(),
        host,
        Arc::new(Firecracker::new(vmm_binary.clone())),
        host_net,
    );
    let t = std::time::Instant::now();
    let report = lifecycle.recover().await?;
    lifecycle.metrics().set_reconcile_duration(t.elapsed());
    tracing::info!(
        adopted = report.adopted,
        cleaned = report.cleaned,
        failed = report.failed,
        corrupt = report.corrupt,
        took_ms = t.elapsed().as_millis() as u64,
        "recovered VMs from the store"
    );
    // An orphan sweep that cannot run (nft listing fails, say) must not
    // keep the daemon — and every VM's API — down: the orphans stay for
    // the next sweep (`hearth gc`, or the next start).
    match lifecycle.gc().await {
        Ok(swept) if !swept.is_empty() => {
            let failed = swept.iter().filter(|o| o.error.is_some()).count();
            tracing::info!(orphans = swept.len(), failed, "orphan sweep done");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "orphan sweep failed; continuing")
        }
    }
    lifecycle.prewarm_taps().await?;
    // Only after recovery: every VM the poller sees is adopted or settled.
    let poller = hearthd::poller::Poller::new(
        lifecycle.clone(),
        Arc::new(hearthd::poller::ProcFs::new()),
        config.poll_interval(),
    );
    let poller_task = poller.spawn();
    #[cfg(target_env = "gnu")]
    let trim_task = tokio::spawn(trim_when_idle(lifecycle.clone()));
    let listener = claim_socket(&config.socket).await?;
    tracing::info!(
        socket = %config.socket.display(),
        state_dir = %config.state_dir.display(),
        vmm = %vmm_binary.display(),
        "hearthd serving"
    );
    let closing = lifecycle.clone();
    let shutdown = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down; VMs keep running");
        // Open `events?follow=true` responses end, so serving can finish.
        closing.store().close_event_streams();
    };
    axum::serve(listener, hearthd::api::router(lifecycle))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serve")?;
    poller_task.abort();
    #[cfg(target_env = "gnu")]
    trim_task.abort();
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// How long the event log must stay quiet before [`trim_when_idle`] trims.
#[cfg(target_env = "gnu")]
const TRIM_AFTER_QUIET: std::time::Duration = std::time::Duration::from_secs(1);

/// Returns freed heap to the OS once per quiet spell: when no event has
/// been committed for [`TRIM_AFTER_QUIET`] (every state change commits
/// one), and once at start. Between spells it sleeps until the next event,
/// so an idle daemon never wakes for it.
#[cfg(target_env = "gnu")]
async fn trim_when_idle(lifecycle: Arc<Lifecycle>) {
    let mut events = lifecycle.store().subscribe_events();
    loop {
        while let Ok(changed) = tokio::time::timeout(TRIM_AFTER_QUIET, events.changed()).await {
            if changed.is_err() {
                return;
            }
        }
        // Milliseconds after a burst: off the async workers.
        let _ = tokio::task::spawn_blocking(|| {
            let t = std::time::Instant::now();
            // SAFETY: malloc_trim only gives free pages back to the
            // kernel; it has no preconditions.
            unsafe { libc::malloc_trim(0) };
            tracing::debug!(took_us = t.elapsed().as_micros() as u64, "heap trimmed");
        })
        .await;
        if events.changed().await.is_err() {
            return;
        }
    }
}

/// Caps glibc malloc at two arenas (the module doc says why). Called
/// before any thread starts.
#[cfg(target_env = "gnu")]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

fn main() -> std::process::ExitCode {
    #[cfg(target_env = "gnu")]
    limit_malloc_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hearthd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearthd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
