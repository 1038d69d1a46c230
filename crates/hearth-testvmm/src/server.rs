//! The HTTP/1.1 server on the API socket: hyper on a current-thread tokio
//! runtime (no thread pool, so a thousand stand-ins stay cheap), with the
//! framing behaviour of Firecracker's micro_http where a client can see it
//! (`Server: Firecracker API`, keep-alive, no `Date`, its 400 answers to
//! unparsable requests, its payload limit), plus the parts of a running
//! VMM the API cannot show: console output, the exit after Ctrl+Alt+Del,
//! periodic metrics, the guest's network stack ([`crate::guestnet`]), and
//! the injected faults of [`crate::faults`].

use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, SERVER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use crate::api::{self, Effect, Method};
use crate::faults::{self, Faults, Point};
use crate::fclog::{Level, Thread};
use crate::guestnet;
use crate::vmm::Vmm;

/// Firecracker's metrics period (`WRITE_METRICS_PERIOD_MS`).
const METRICS_PERIOD: Duration = Duration::from_secs(60);
/// How long after answering SendCtrlAltDel the process exits (a Linux
/// guest takes longer to reboot; the test guest about this long).
const CTRL_ALT_DEL_EXIT_DELAY: Duration = Duration::from_millis(10);

/// Mutable state, behind one lock that is never held across an `.await`.
#[derive(Debug)]
struct State {
    vmm: Vmm,
    /// A `before-start` or `on-put` hang has fired.
    hung: bool,
    /// An `after-start` hang fires at this instant.
    hang_at: Option<Instant>,
}

impl State {
    fn is_hung(&self) -> bool {
        self.hung || self.hang_at.is_some_and(|t| Instant::now() >= t)
    }
}

/// Everything the connections share.
#[derive(Debug)]
pub struct Server {
    state: Mutex<State>,
    faults: Faults,
    payload_limit: usize,
}

impl Server {
    /// A server for `vmm`.
    pub fn new(vmm: Vmm, faults: Faults, payload_limit: usize) -> Arc<Self> {
        Arc::new(Server {
            state: Mutex::new(State {
                vmm,
                hung: false,
                hang_at: None,
            }),
            faults,
            payload_limit,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs through the VMM's logger.
    pub fn log(&self, level: Level, thread: Thread, module: &str, message: &str) {
        self.lock().vmm.log.log(level, thread, module, message);
    }

    /// Accepts connections forever.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        self.log(
            Level::Info,
            Thread::Api,
            "firecracker::api_server",
            "API server started.",
        );
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    self.log(
                        Level::Error,
                        Thread::Api,
                        "firecracker::api_server",
                        &format!("API Server error on retrieving incoming request: {e}"),
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let server = Arc::clone(&self);
            tokio::spawn(async move {
                let service = service_fn(move |req| Arc::clone(&server).serve_request(req));
                // A client that goes away mid-request is not our problem.
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .title_case_headers(true)
                    .auto_date_header(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn serve_request(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let Some(method) = Method::from_name(req.method().as_str()) else {
            return Ok(micro_http_error(
                "Invalid HTTP Method: Unsupported HTTP method.",
            ));
        };
        let target = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let limit = self.payload_limit;
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let too_large = |size: usize| {
            micro_http_error(&format!(
                "Request payload with size {size} is larger than the limit of {limit} allowed by server."
            ))
        };
        if let Some(size) = declared.filter(|&s| s > limit) {
            return Ok(too_large(size));
        }
        let bytes = match Limited::new(req.into_body(), limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return Ok(too_large(declared.unwrap_or(limit + 1))),
        };
        let body = (!bytes.is_empty()).then_some(&bytes[..]);

        if self.fault_fires(method, &target, body) {
            // Hung: the request was read and will never be answered.
            return std::future::pending().await;
        }

        let (response, effect, net) = {
            let mut state = self.lock();
            let (response, effect) = api::handle(&mut state.vmm, method, &target, body);
            let mut net = None;
            if effect == Effect::Started {
                console(&state.vmm.boot_console());
                if let Some(Point::AfterStart(after)) = &self.faults.hang {
                    state.hang_at = Some(Instant::now() + *after);
                }
                net = guestnet::plan(&state.vmm);
            }
            (response, effect, net)
        };
        match effect {
            Effect::None => {}
            Effect::Started => {
                start_guest_net(net);
                self.after_start();
            }
            Effect::CtrlAltDel => {
                let server = Arc::clone(&self);
                tokio::spawn(async move {
                    tokio::time::sleep(CTRL_ALT_DEL_EXIT_DELAY).await;
                    server.exit_after_reset();
                });
            }
        }
        Ok(to_hyper(&response))
    }

    /// Applies the injected faults to a request about to be served.
    /// Crashes do not return; `true` means "never answer".
    fn fault_fires(&self, method: Method, target: &str, body: Option<&[u8]>) -> bool {
        let path = target.split('?').next().unwrap_or(target);
        let start = api::is_instance_start(method, target, body);
        let fires = |point: &Option<Point>| match point {
            Some(Point::BeforeStart) => start,
            Some(p) => method == Method::Put && p.matches_put(path),
            None => false,
        };
        let mut state = self.lock();
        if state.is_hung() {
            return true;
        }
        if fires(&self.faults.crash) {
            let what = format!(
                "{} {target}",
                if start { "InstanceStart on PUT" } else { "PUT" }
            );
            drop(state);
            faults::crash(&what);
        }
        if fires(&self.faults.hang) {
            state.hung = true;
            return true;
        }
        false
    }

    /// Timers that run once the "guest" runs.
    fn after_start(self: &Arc<Self>) {
        if let Some(Point::AfterStart(after)) = self.faults.crash {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                faults::crash(&format!("{} ms after InstanceStart", after.as_millis()));
            });
        }
        let server = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(METRICS_PERIOD);
            tick.tick().await; // the first tick is immediate; start already wrote
            loop {
                tick.tick().await;
                let mut state = server.lock();
                if let Err(e) = state.vmm.metrics.write() {
                    let msg = format!("Failed to write metrics: Failed to write metrics: {e}");
                    state
                        .vmm
                        .log
                        .log(Level::Error, Thread::Main, "firecracker::metrics", &msg);
                }
            }
        });
    }

    /// The guest reset through the i8042: Firecracker stops the VM, writes
    /// its metrics and exits 0. The API socket file is left in place, as
    /// Firecracker leaves it.
    fn exit_after_reset(&self) -> ! {
        let mut state = self.lock();
        console(&state.vmm.reset_console());
        let vmm = &mut state.vmm;
        vmm.log
            .log(Level::Info, Thread::Main, "vmm", "Vmm is stopping.");
        if let Err(e) = vmm.metrics.write() {
            let msg =
                format!("Failed to write metrics while stopping: Failed to write metrics: {e}");
            vmm.log.log(Level::Error, Thread::Main, "vmm", &msg);
        }
        vmm.log.log(
            Level::Info,
            Thread::Main,
            "firecracker",
            "Firecracker exiting successfully. exit_code=0",
        );
        std::process::exit(0)
    }
}

/// Brings the guest's network up, as its kernel would with `ip=`; says so
/// (or why not) on the console.
fn start_guest_net(net: Option<Result<guestnet::GuestNet, String>>) {
    let started = match net {
        None => return,
        Some(net) => net.and_then(|net| {
            let banner = net.banner();
            let stack = net.into_stack().map_err(|e| e.to_string())?;
            tokio::spawn(stack.run());
            Ok(banner)
        }),
    };
    match started {
        Ok(banner) => console(&banner),
        Err(why) => console(&format!(
            "hearth-testvmm: guest network not started: {why}\n"
        )),
    }
}

/// Writes guest console text to stdout, where Firecracker's serial port
/// output goes.
fn console(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn base_response(status: u16, body: Option<String>) -> Response<Full<Bytes>> {
    let has_body = body.is_some();
    let mut resp = Response::new(Full::new(Bytes::from(body.unwrap_or_default())));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_REQUEST);
    let h = resp.headers_mut();
    h.insert(SERVER, HeaderValue::from_static("Firecracker API"));
    h.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
    if has_body {
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    resp
}

fn to_hyper(r: &api::Response) -> Response<Full<Bytes>> {
    let mut resp = base_response(r.status, r.body.clone());
    if r.deprecation {
        resp.headers_mut()
            .insert("deprecation", HeaderValue::from_static("true"));
    }
    resp
}

/// micro_http's answer to a request it cannot parse (note: its body is not
/// valid JSON, it contains a raw newline; that is Firecracker's behaviour).
fn micro_http_error(message: &str) -> Response<Full<Bytes>> {
    base_response(
        400,
        Some(format!(
            "{{ \"error\": \"{message}\nAll previous unanswered requests will be dropped.\" }}"
        )),
    )
}
