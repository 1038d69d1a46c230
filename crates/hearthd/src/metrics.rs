//! The daemon's Prometheus metrics (`GET /metrics`).
//!
//! Two kinds of numbers live here. Counters, histograms and the reconcile
//! gauge are *events in time* — an operation finished, a teardown failed,
//! an orphan was swept — that nothing else remembers, so they are held in
//! memory from the moment they happen and start at zero with each daemon.
//! Counts of things that exist — VMs by state, taps of the pool — are
//! *facts in the store*, so they are computed from it at every scrape
//! ([`Metrics::render`]) instead of being kept in step by every code path
//! that changes them: a gauge that is recomputed cannot drift.
//!
//! The registry and every handle are owned by one [`Metrics`], which the
//! [`Lifecycle`](crate::lifecycle::Lifecycle) owns; operations are timed in
//! one place ([`Metrics::observe`], wrapped around each lifecycle call by
//! the API layer).
//!
//! The text is OpenMetrics (what `prometheus-client` writes and Prometheus
//! scrapes): counters carry `_total`, and the body ends with `# EOF`.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use hearth_api::VmState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the operation latency buckets: a create is
/// a few SQLite statements (sub-millisecond), a start is milliseconds, a
/// graceful stop may wait seconds for the guest.
const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// An operation of the API, as counted and timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `POST /v1/vms`.
    Create,
    /// `POST /v1/vms/{vm}/start`.
    Start,
    /// `POST /v1/vms/{vm}/stop`.
    Stop,
    /// `POST /v1/vms/{vm}/kill`.
    Kill,
    /// `DELETE /v1/vms/{vm}`.
    Delete,
}

impl Op {
    /// The `op` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Kill => "kill",
            Op::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpResult {
    op: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// What the store holds at scrape time, for the gauges computed from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Every VM's state, as the API reports it.
    pub vm_states: Vec<VmState>,
    /// Taps of the pool that no VM holds.
    pub taps_idle: u64,
    /// Taps of the pool held by a VM.
    pub taps_in_use: u64,
}

/// The registry and the handles the daemon updates.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    vms: Family<StateLabel, Gauge>,
    operations: Family<OpResult, Counter>,
    durations: Family<OpLabel, Histogram, fn() -> Histogram>,
    teardown_failures: Counter,
    orphans_swept: Family<KindLabel, Counter>,
    reconcile_duration: Gauge<f64, AtomicU64>,
    tap_pool: Family<StateLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every hearth metric registered, all at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hearth");
        let vms = Family::<StateLabel, Gauge>::default();
        registry.register("vms", "VMs by state", vms.clone());
        let operations = Family::<OpResult, Counter>::default();
        registry.register(
            "operations",
            "API operations by outcome (create, start, stop, kill, delete)",
            operations.clone(),
        );
        let durations = Family::<OpLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        registry.register(
            "operation_duration_seconds",
            "Time an API operation took, from request to answer",
            durations.clone(),
        );
        let teardown_failures = Counter::default();
        registry.register(
            "teardown_failures",
            "Teardowns that left something behind (retried by the next stop, kill or delete)",
            teardown_failures.clone(),
        );
        let orphans_swept = Family::<KindLabel, Counter>::default();
        registry.register(
            "orphans_swept",
            "Kernel objects and files carrying hearth's mark that no VM claimed, removed by the sweep",
            orphans_swept.clone(),
        );
        let reconcile_duration = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "reconcile_duration_seconds",
            "How long the reconcile at daemon start took",
            reconcile_duration.clone(),
        );
        let tap_pool = Family::<StateLabel, Gauge>::default();
        registry.register(
            "tap_pool_size",
            "Taps of the pool, idle or held by a VM",
            tap_pool.clone(),
        );
        // Show every series from the first scrape, at zero, so that a rate()
        // over a fresh daemon has a starting point.
        for op in [Op::Create, Op::Start, Op::Stop, Op::Kill, Op::Delete] {
            for result in ["ok", "error"] {
                drop(operations.get_or_create(&OpResult {
                    op: op.as_str(),
                    result,
                }));
            }
            drop(durations.get_or_create(&OpLabel { op: op.as_str() }));
        }
        Metrics {
            registry,
            vms,
            operations,
            durations,
            teardown_failures,
            orphans_swept,
            reconcile_duration,
            tap_pool,
        }
    }

    /// Runs `fut` (one operation), then counts its outcome and records
    /// how long it took.
    pub async fn observe<T, E>(
        &self,
        op: Op,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let t = Instant::now();
        let out = fut.await;
        self.record(op, out.is_ok(), t.elapsed());
        out
    }

    /// Counts one finished operation.
    pub fn record(&self, op: Op, ok: bool, took: Duration) {
        let op = op.as_str();
        self.operations
            .get_or_create(&OpResult {
                op,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        self.durations
            .get_or_create(&OpLabel { op })
            .observe(took.as_secs_f64());
    }

    /// Counts a teardown that returned errors.
    pub fn teardown_failed(&self) {
        self.teardown_failures.inc();
    }

    /// Counts one orphan of `kind` (`tap`, `nft-chain`, `dm`, `loop`,
    /// `process`, `vm-dir`, …) removed by the sweep.
    pub fn orphan_swept(&self, kind: &str) {
        self.orphans_swept
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// Records how long the reconcile at daemon start took.
    pub fn set_reconcile_duration(&self, took: Duration) {
        self.reconcile_duration.set(took.as_secs_f64());
    }

    /// The exposition text, with the gauges set from `counts`.
    pub fn render(&self, counts: &StoreCounts) -> Result<String, std::fmt::Error> {
        for state in VmState::ALL {
            let n = counts.vm_states.iter().filter(|&&s| s == state).count();
            self.vms
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for (state, n) in [("idle", counts.taps_idle), ("in_use", counts.taps_in_use)] {
            self.tap_pool
                .get_or_create(&StateLabel { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `name{labels}` (labels exactly as
    /// written), if present.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn operations_are_counted_and_timed() {
        let m = Metrics::new();
        let text = m.render(&StoreCounts::default()).unwrap();
        assert_eq!(
            sample(&text, r#"hearth_operations_total{op="start",result="ok"}"#),
            Some(0.0),
            "{text}"
        );
        let ok: Result<u8, ()> = m.observe(Op::Start, async { Ok(1) }).await;
        assert_eq!(ok, Ok(1));
        let err: Result<u8, &str> = m.observe(Op::Start, async { Err("no") }).await;
        assert_eq!(err, Err("no"));
        m.record(Op::Stop, true, Duration::from_millis(3));
        let text = m.render(&StoreCounts::default()).unwrap();
        for (series, want) in [
            (r#"hearth_operations_total{op="start",result="ok"}"#, 1.0),
            (r#"hearth_operations_total{op="start",result="error"}"#, 1.0),
            (r#"hearth_operations_total{op="stop",result="ok"}"#, 1.0),
            (r#"hearth_operations_total{op="kill",result="ok"}"#, 0.0),
            (
                r#"hearth_operation_duration_seconds_count{op="start"}"#,
                2.0,
            ),
            (r#"hearth_operation_duration_seconds_count{op="stop"}"#, 1.0),
            (
                r#"hearth_operation_duration_seconds_bucket{le="0.0025",op="stop"}"#,
                0.0,
            ),
            (
                r#"hearth_operation_duration_seconds_bucket{le="0.005",op="stop"}"#,
                1.0,
            ),
        ] {
            assert_eq!(sample(&text, series), Some(want), "{series}\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn gauges_come_from_the_store_counts() {
        let m = Metrics::new();
        m.teardown_failed();
        m.orphan_swept("tap");
        m.orphan_swept("tap");
        m.set_reconcile_duration(Duration::from_millis(250));
        let counts = StoreCounts {
            vm_states: vec![VmState::Running, VmState::Running, VmState::Stopped],
            taps_idle: 3,
            taps_in_use: 2,
        };
        let text = m.render(&counts).unwrap();
        for (series, want) in [
            (r#"hearth_vms{state="running"}"#, 2.0),
            (r#"hearth_vms{state="stopped"}"#, 1.0),
            (r#"hearth_vms{state="created"}"#, 0.0),
            (r#"hearth_tap_pool_size{state="idle"}"#, 3.0),
            (r#"hearth_tap_pool_size{state="in_use"}"#, 2.0),
            ("hearth_teardown_failures_total", 1.0),
            (r#"hearth_orphans_swept_total{kind="tap"}"#, 2.0),
            ("hearth_reconcile_duration_seconds", 0.25),
        ] {
            assert_eq!(sample(&text, series), Some(want), "{series}\n{text}");
        }
        // A later scrape reflects the store as it is then.
        let text = m.render(&StoreCounts::default()).unwrap();
        assert_eq!(sample(&text, r#"hearth_vms{state="running"}"#), Some(0.0));
    }
}
