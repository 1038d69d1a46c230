//! [`Firewall`] over nf_tables netlink ([`super::nfnl`]): every call is one
//! batch on one long-lived socket, which the kernel commits as one
//! transaction — all of it or none of it.
//!
//! # The ruleset: fixed rules, per-VM set elements
//!
//! Everything lives in `table ip hearth`; no other table, chain or policy
//! is touched. The rules are fixed and made once; a VM is nothing but
//! elements of six sets, each carrying the comment `hearth:vm:<id>` (the
//! ownership mark of DESIGN.md: a leaked element names its VM):
//!
//! ```text
//! table ip hearth
//! ├─ map dnat_ports  inet_proto . inet_service : ipv4_addr . inet_service
//! │                      tcp . 8080 : 172.16.0.2 . 80               per forward
//! ├─ set nat_out     ipv4_addr . ifname        172.16.0.2 . "eth0"           NAT
//! ├─ set fwd_out     ifname . ifname           "hth1" . "eth0"               NAT
//! ├─ set fwd_in      ifname . ifname           "eth0" . "hth1"               NAT
//! ├─ set fwd_dnat    ifname . ipv4_addr . inet_proto . inet_service
//! │                      "hth1" . 172.16.0.2 . tcp . 80             per forward
//! ├─ set dnat_taps   ifname                    "hth1"          with any forward
//! │
//! ├─ chain prerouting   nat, hook prerouting, prio dstnat (-100)
//! │    fib daddr type local dnat ip to meta l4proto . th dport map @dnat_ports
//! ├─ chain output       nat, hook output, prio -100 (the host's own connections)
//! │    fib daddr type local dnat ip to meta l4proto . th dport map @dnat_ports
//! ├─ chain postrouting  nat, hook postrouting, prio srcnat (100)
//! │    ip saddr 127.0.0.0/8 ct status dnat masquerade
//! │    ip saddr . oifname @nat_out masquerade
//! └─ chain forward      filter, hook forward, prio filter (0), policy accept
//!      iifname . oifname @fwd_out accept
//!      iifname . oifname @fwd_in ct state established,related accept
//!      oifname . ip daddr . meta l4proto . th dport @fwd_dnat ct status dnat accept
//!      iifname @dnat_taps ct status dnat accept
//! ```
//!
//! A packet costs a hash lookup per rule whatever the number of VMs, and a
//! VM's transaction touches only its own elements: no rule, no chain, no
//! jump. That last point is what keeps it flat. An earlier design gave
//! each VM chains reached through verdict maps; adding a jump (or a rule)
//! makes the kernel re-validate the whole table at commit, walking every
//! VM's chain: ~1.3 ms more per transaction per 1,000 VMs (perf:
//! `nft_table_validate` was three quarters of the commit). Elements with
//! plain data need no validation.
//!
//! The loopback masquerade is a base rule: a connection from 127.0.0.0/8
//! that was DNATed must leave with a routable source (with
//! `route_localnet=1` on the tap, set elsewhere), whichever VM it went to.
//!
//! # Base objects: once per daemon, and again when missing
//!
//! The table, chains, sets and rules are made by one transaction — `add`
//! table, chains and sets (no-ops when present), then `flush` each chain
//! and `add` its rules, atomically (packets see the old or the new chain,
//! never an empty one) — before the first VM transaction of this process,
//! and again whenever a transaction fails with ENOENT (the table or a set
//! was deleted behind our back), after which that transaction is retried
//! once.
//!
//! # Apply
//!
//! One `add element` per element, in one transaction. A host port already
//! forwarded to another VM makes the kernel refuse its `dnat_ports` element
//! (the key exists with other data), and with it the whole transaction:
//! nothing of the VM is left. Applying the same plan again changes nothing.
//!
//! # Removal: only what is still ours
//!
//! A set element without data does not say whose it is, and a late retry
//! of a removal could find a key (tap, address) that has since been given
//! to another VM. So removal first asks the kernel for each of the plan's
//! keys (a get by key: no dump, so it costs the same with 1,000 VMs) and
//! then deletes, in one transaction, those whose comment names this VM.
//! What is absent is skipped, so removing twice, or removing what was
//! never applied, succeeds. The gets and the delete are done back to back
//! under the socket, so no transaction of hearth's runs between.
//!
//! [`Firewall::remove_orphan`] (a sweep's removal of elements the store
//! knows nothing about) and [`Firewall::list_vms`] read the sets whole:
//! they are for sweeps, not for starts and stops.
//!
//! # Group commit, without a thread in between
//!
//! One socket, and whoever holds it leads. A caller queues its
//! transaction and, if the socket is free, takes it and sends everything
//! queued — its own transaction and any that arrived meanwhile — as one
//! batch, then keeps going until the queue is empty. A caller that finds
//! the socket taken just awaits its answer: the leader sends its
//! transaction in the next batch. So a lone start pays no thread wakeup at
//! all (an earlier design handed every transaction to a thread of its own;
//! waking it was as long as the kernel's commit, and whether it woke at
//! once made the figure bimodal), and concurrent starts still share a
//! transaction. A leader runs on the caller's (tokio) thread; the kernel
//! handles a batch inside `sendmsg`, some tens of microseconds. The reads
//! that walk whole sets ([`Firewall::list_vms`], [`Firewall::remove_orphan`],
//! for sweeps) take the socket on a blocking thread instead.
//!
//! If a combined batch is refused, each transaction in it is sent again on
//! its own, so every caller gets its own answer and one VM's refusal never
//! fails another's.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::nfnl::{self, Attrs, Kind, Msg, NfSocket, Refused, attr};
use super::{Firewall, FirewallError, Proto, TABLE, VmRules};

/// Base chains.
const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const POSTROUTING: &str = "postrouting";
const FORWARD: &str = "forward";

/// The sets a VM's elements go in (module doc).
const DNAT_PORTS: &str = "dnat_ports";
const NAT_OUT: &str = "nat_out";
const FWD_OUT: &str = "fwd_out";
const FWD_IN: &str = "fwd_in";
const FWD_DNAT: &str = "fwd_dnat";
const DNAT_TAPS: &str = "dnat_taps";
const SETS: [&str; 6] = [DNAT_PORTS, NAT_OUT, FWD_OUT, FWD_IN, FWD_DNAT, DNAT_TAPS];

/// Linux's IFNAMSIZ; names are compared over all of it, NUL-padded.
const IFNAMSIZ: usize = 16;

/// Userdata comments are one TLV: at most 255 bytes with the NUL; nft
/// itself refuses more than 128.
const COMMENT_MAX: usize = 128;

/// Most messages one combined batch carries (a few hundred KiB).
const BATCH_MAX_MSGS: usize = 4096;

/// The real firewall: nf_tables over netlink, on one socket that its
/// callers take turns to lead (module doc, "Group commit"). Clones share
/// the socket.
#[derive(Debug, Clone)]
pub struct Nft {
    inner: Arc<Inner>,
}

impl Default for Nft {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a leader answers.
type Reply<T> = oneshot::Sender<Result<T, Refused>>;

/// One caller's transaction, waiting to be sent.
type Pending = (Vec<Msg>, Reply<()>);

/// What callers queue for the leader: a transaction to group with others,
/// or work of its own on the socket (a removal that reads first).
enum Job {
    Batch(Vec<Msg>, Reply<()>),
    Run(Box<dyn FnOnce(&mut Worker) + Send>),
}

/// The queue and the socket. Lock order: `socket` may be held while
/// `queue` is taken, never the other way round.
struct Inner {
    queue: Mutex<Vec<Job>>,
    socket: Mutex<Worker>,
    /// Tests hold leaders back to queue several callers at once.
    #[cfg(test)]
    paused: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

impl Nft {
    /// Opens the socket, in the network namespace of the calling thread.
    /// If it cannot be opened, every call fails saying why.
    pub fn new() -> Self {
        let sock =
            NfSocket::open().map_err(|e| format!("cannot open a netfilter netlink socket: {e}"));
        if let Err(e) = &sock {
            tracing::error!(error = %e, "nftables unavailable");
        }
        Self {
            inner: Arc::new(Inner {
                queue: Mutex::default(),
                socket: Mutex::new(Worker {
                    sock,
                    base_made: false,
                }),
                #[cfg(test)]
                paused: Default::default(),
            }),
        }
    }

    async fn batch(&self, op: &'static str, msgs: Vec<Msg>) -> Result<(), FirewallError> {
        let (tx, rx) = oneshot::channel();
        self.inner.submit(Job::Batch(msgs, tx));
        rx.await
            .map_err(|_| FirewallError::Gone { op })?
            .map_err(|r| refused(op, r))
    }

    /// Runs `f` on the socket, between transactions, led like a batch.
    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Worker) -> Result<T, Refused> + Send + 'static,
    ) -> Result<T, FirewallError> {
        let (tx, rx) = oneshot::channel();
        self.inner.submit(Job::Run(Box::new(move |w| {
            let _ = tx.send(f(w));
        })));
        rx.await
            .map_err(|_| FirewallError::Gone { op })?
            .map_err(|r| refused(op, r))
    }

    /// Runs `f` on the socket from a blocking thread: for reads whose
    /// cost grows with the number of VMs, which must not hold up a tokio
    /// worker. Whatever was queued meanwhile is sent after.
    async fn run_blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Worker) -> Result<T, Refused> + Send + 'static,
    ) -> Result<T, FirewallError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let out = f(&mut inner.socket.lock().unwrap_or_else(PoisonError::into_inner));
            inner.lead();
            out
        })
        .await
        .map_err(|_| FirewallError::Gone { op })?
        .map_err(|r| refused(op, r))
    }
}

impl Inner {
    fn submit(&self, job: Job) {
        lock(&self.queue).push(job);
        self.lead();
    }

    /// Sends what is queued if the socket is free, until the queue is
    /// empty. Whoever holds the socket calls this after letting it go, so
    /// a job queued while the socket was taken is never left behind: its
    /// caller failed to take the socket only because someone held it, and
    /// that someone looks at the queue again after releasing it.
    fn lead(&self) {
        #[cfg(test)]
        if self.paused.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        loop {
            let mut w = match self.socket.try_lock() {
                Ok(w) => w,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            loop {
                let jobs = std::mem::take(&mut *lock(&self.queue));
                if jobs.is_empty() {
                    break;
                }
                w.process(jobs);
            }
            drop(w);
            if lock(&self.queue).is_empty() {
                return;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether the kernel's nf_tables answers over netlink in the calling
/// thread's namespace (`hearth doctor`): one chain dump, nothing changed.
pub fn probe() -> Result<(), String> {
    let mut sock =
        NfSocket::open().map_err(|e| format!("cannot open a netfilter netlink socket: {e}"))?;
    sock.dump(Kind::GetChain, &Attrs::new())
        .map(drop)
        .map_err(|r| format!("{}: {}", r.what, r.error))
}

/// The socket, and what this process knows about the table.
struct Worker {
    sock: Result<NfSocket, String>,
    /// Whether this process made the base objects (module doc).
    base_made: bool,
}

impl Worker {
    /// Sends `jobs` in order: consecutive batches combined, runs between.
    fn process(&mut self, jobs: Vec<Job>) {
        let mut batches = Vec::new();
        for job in jobs {
            match job {
                Job::Batch(msgs, reply) => batches.push((msgs, reply)),
                Job::Run(f) => {
                    self.commit(std::mem::take(&mut batches));
                    f(self);
                }
            }
        }
        self.commit(batches);
    }

    fn sock(&mut self) -> Result<&mut NfSocket, Refused> {
        self.sock.as_mut().map_err(|e| Refused {
            what: "open socket".into(),
            error: std::io::Error::other(e.clone()),
            detail: None,
        })
    }

    /// Sends `batches`, combined as far as [`BATCH_MAX_MSGS`] allows; a
    /// refused combination is retried one transaction at a time.
    fn commit(&mut self, mut batches: Vec<Pending>) {
        while !batches.is_empty() {
            let mut take = 0;
            let mut msgs = 0;
            while take < batches.len()
                && (take == 0 || msgs + batches[take].0.len() <= BATCH_MAX_MSGS)
            {
                msgs += batches[take].0.len();
                take += 1;
            }
            let group: Vec<_> = batches.drain(..take).collect();
            if group.len() == 1 {
                for (msgs, reply) in group {
                    let _ = reply.send(self.transaction(&msgs));
                }
                continue;
            }
            let all: Vec<Msg> = group.iter().flat_map(|(m, _)| m.iter().cloned()).collect();
            match self.transaction(&all) {
                Ok(()) => {
                    for (_, reply) in group {
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(_) => {
                    for (msgs, reply) in group {
                        let _ = reply.send(self.transaction(&msgs));
                    }
                }
            }
        }
    }

    /// One transaction, after the base objects; made again and retried
    /// once if the kernel says something it needs is gone.
    fn transaction(&mut self, msgs: &[Msg]) -> Result<(), Refused> {
        if !self.base_made {
            self.sock()?.batch(&base())?;
            self.base_made = true;
        }
        match self.sock()?.batch(msgs) {
            Err(r) if r.errno() == Some(libc::ENOENT) => {
                tracing::warn!(at = %r.what, "hearth's nftables table or maps were gone; making them again");
                self.base_made = false;
                self.sock()?.batch(&base())?;
                self.base_made = true;
                self.sock()?.batch(msgs)
            }
            other => other,
        }
    }
}

impl Worker {
    /// Every element of hearth's sets.
    fn all_elements(&mut self) -> Result<Vec<Marked>, Refused> {
        let mut found = Vec::new();
        for set in SETS {
            let mut filter = Attrs::new();
            filter
                .str(attr::SET_ELEM_LIST_TABLE, TABLE)
                .str(attr::SET_ELEM_LIST_SET, set);
            for obj in self.sock()?.dump(Kind::GetSetElem, &filter)? {
                found.extend(elements_of(&obj).into_iter().map(|(k, c)| (set, k, c)));
            }
        }
        Ok(found)
    }

    /// The comment of element `key` of `set`, `None` when it is absent;
    /// `Some(None)` when present without one. A get by key, not a dump.
    fn comment_of(
        &mut self,
        set: &'static str,
        key: &[u8],
    ) -> Result<Option<Option<String>>, Refused> {
        let mut a = Attrs::new();
        a.str(attr::SET_ELEM_LIST_TABLE, TABLE)
            .str(attr::SET_ELEM_LIST_SET, set)
            .nest(attr::SET_ELEM_LIST_ELEMENTS, |l| {
                l.nest(attr::LIST_ELEM, |e| {
                    e.nest(attr::SET_ELEM_KEY, |k| {
                        k.bytes(attr::DATA_VALUE, key);
                    });
                });
            });
        match self.sock()?.get(Kind::GetSetElem, &a) {
            Ok(objs) => Ok(objs
                .iter()
                .flat_map(|o| elements_of(o))
                .find(|(k, _)| k == key)
                .map(|(_, c)| c)),
            // The element, its set or the table is not there.
            Err(r) if r.errno() == Some(libc::ENOENT) => Ok(None),
            Err(r) => Err(r),
        }
    }

    /// Deletes those of `elems` whose comment is `comment` (module doc,
    /// "Removal"), in one transaction.
    fn remove_owned(&mut self, elems: &[Elem], comment: &str) -> Result<(), Refused> {
        let mut doomed = Vec::new();
        for e in elems {
            match self.comment_of(e.set, &e.key)? {
                None => {}
                Some(Some(c)) if c == comment => doomed.push(e.delete()),
                Some(other) => tracing::warn!(
                    "leaving {}[{}] alone: it is {} now",
                    e.set,
                    e.text,
                    other.unwrap_or_else(|| "unmarked".into())
                ),
            }
        }
        if doomed.is_empty() {
            return Ok(());
        }
        self.transaction(&doomed)
    }
}

/// An element as read back: (set, key, comment).
type Marked = (&'static str, Vec<u8>, Option<String>);

/// The (key, comment) of each element in a `NEWSETELEM` answer.
fn elements_of(obj: &[u8]) -> Vec<(Vec<u8>, Option<String>)> {
    let Some(list) = nfnl::find_attr(obj, attr::SET_ELEM_LIST_ELEMENTS) else {
        return Vec::new();
    };
    nfnl::parse_attrs(list)
        .filter_map(|(_, elem)| {
            let key = nfnl::find_attr(elem, attr::SET_ELEM_KEY)
                .and_then(|k| nfnl::find_attr(k, attr::DATA_VALUE))?;
            let comment =
                nfnl::find_attr(elem, attr::SET_ELEM_USERDATA).and_then(udata_comment_text);
            Some((key.to_vec(), comment))
        })
        .collect()
}

/// A refused batch as the firewall's error.
fn refused(op: &'static str, r: Refused) -> FirewallError {
    let clash = r.what.starts_with("add element dnat_ports")
        && matches!(r.errno(), Some(libc::EEXIST) | Some(libc::EBUSY));
    FirewallError::Refused {
        op,
        what: r.what,
        detail: match (clash, r.detail) {
            (true, d) => Some(d.map_or_else(
                || "the host port is forwarded to another VM".to_owned(),
                |d| format!("{d} (the host port is forwarded to another VM)"),
            )),
            (false, d) => d,
        },
        source: r.error,
    }
}

#[async_trait]
impl Firewall for Nft {
    async fn apply(&self, rules: &VmRules) -> Result<Vec<String>, FirewallError> {
        validate(rules)?;
        if rules.is_empty() {
            return Ok(Vec::new());
        }
        let plan = VmPlan::new(rules);
        let msgs = plan.elems.iter().map(|e| e.add(&plan.comment)).collect();
        self.batch("apply", msgs).await?;
        Ok(plan.describe())
    }

    async fn remove(&self, rules: &VmRules) -> Result<(), FirewallError> {
        validate(rules)?;
        let plan = VmPlan::new(rules);
        if plan.elems.is_empty() {
            return Ok(());
        }
        self.run("remove", move |w| {
            w.remove_owned(&plan.elems, &plan.comment)
        })
        .await
    }

    async fn remove_orphan(&self, vm_id: &str) -> Result<(), FirewallError> {
        validate_vm_id(vm_id)?;
        let comment = format!("{COMMENT_PREFIX}{vm_id}");
        self.run_blocking("remove orphan", move |w| {
            let doomed: Vec<Msg> = w
                .all_elements()?
                .into_iter()
                .filter(|(_, _, c)| c.as_deref() == Some(comment.as_str()))
                .map(|(set, key, _)| {
                    Elem {
                        set,
                        text: key_text(set, &key),
                        key,
                        data: None,
                    }
                    .delete()
                })
                .collect();
            if doomed.is_empty() {
                return Ok(());
            }
            w.transaction(&doomed)
        })
        .await
    }

    async fn list_vms(&self) -> Result<Vec<String>, FirewallError> {
        let elems = self.run_blocking("list", |w| w.all_elements()).await?;
        let ids: BTreeSet<String> = elems
            .into_iter()
            .filter_map(|(_, _, c)| c?.strip_prefix(COMMENT_PREFIX).map(str::to_owned))
            .collect();
        Ok(ids.into_iter().collect())
    }
}

/// Checks a plan before any kernel call: refuses what the kernel would
/// accept but read differently (a `*` in an interface name is a wildcard to
/// nft) and gives a clear error for what it would refuse. Shared with the
/// fake.
pub(crate) fn validate(rules: &VmRules) -> Result<(), FirewallError> {
    let invalid = |what, reason: String| Err(FirewallError::Invalid { what, reason });
    let s = &rules.short_id;
    if s.is_empty()
        || s.len() > 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return invalid(
            "short id",
            format!("{s:?}: use 1 to 64 letters, digits, '-' or '_'"),
        );
    }
    if rules.is_empty() {
        return Ok(());
    }
    validate_vm_id(&rules.vm_id)?;
    for name in std::iter::once(&rules.tap).chain(rules.nat_uplink.as_ref()) {
        let bad = name.is_empty()
            || name.len() >= IFNAMSIZ
            || name == "."
            || name == ".."
            || name.bytes().any(|b| {
                matches!(b, b'/' | b':' | b'*' | b'"' | b'\\' | 0) || !b.is_ascii_graphic()
            });
        if bad {
            return invalid(
                "interface name",
                format!("{name:?} is not a valid Linux interface name (or uses '*', '\"', '\\')"),
            );
        }
    }
    let mut seen = BTreeSet::new();
    for pf in &rules.port_forwards {
        if pf.host_port == 0 || pf.guest_port == 0 {
            return invalid("port forward", format!("{pf:?}: port 0"));
        }
        if !seen.insert((pf.proto.as_str(), pf.host_port)) {
            return invalid(
                "port forward",
                format!(
                    "host port {}/{} forwarded twice",
                    pf.host_port,
                    pf.proto.as_str()
                ),
            );
        }
    }
    Ok(())
}

/// Checks a VM id before any kernel call: it goes into comments. Shared
/// with the fake.
pub(crate) fn validate_vm_id(vm_id: &str) -> Result<(), FirewallError> {
    if vm_id.is_empty()
        || COMMENT_PREFIX.len() + vm_id.len() > COMMENT_MAX
        || !vm_id.bytes().all(|b| b.is_ascii_graphic() && b != b'"')
    {
        return Err(FirewallError::Invalid {
            what: "VM id",
            reason: format!(
                "{vm_id:?}: must be printable ASCII without quotes, at most {} bytes",
                COMMENT_MAX - COMMENT_PREFIX.len()
            ),
        });
    }
    Ok(())
}

/// The ownership mark of per-VM elements: `hearth:vm:<id>`.
const COMMENT_PREFIX: &str = "hearth:vm:";

/// `hearth:vm:<id>`.
fn comment(rules: &VmRules) -> String {
    format!("{COMMENT_PREFIX}{}", rules.vm_id)
}

/// One element of one of hearth's sets: `set { key [: data] }`.
#[derive(Debug, Clone)]
struct Elem {
    set: &'static str,
    /// The key as the kernel stores it (each field in whole registers).
    key: Vec<u8>,
    /// The data, for the map.
    data: Option<Vec<u8>>,
    /// As nft would print it.
    text: String,
}

/// What one VM puts into the table, derived from its plan alone.
#[derive(Debug)]
struct VmPlan {
    comment: String,
    elems: Vec<Elem>,
}

impl VmPlan {
    fn new(r: &VmRules) -> Self {
        let mut elems = Vec::new();
        if !r.is_empty() {
            let (tap, ip) = (r.tap.as_str(), r.guest_ip);
            let mut elem = |set: &'static str, key: Vec<u8>, data: Option<Vec<u8>>| {
                let text = key_text(set, &key);
                let text = match &data {
                    Some(d) => format!("{text} : {}", data_text(d)),
                    None => text,
                };
                elems.push(Elem {
                    set,
                    key,
                    data,
                    text,
                });
            };
            if let Some(up) = r.nat_uplink.as_deref() {
                elem(
                    NAT_OUT,
                    [&ip.octets()[..], &ifname_bytes(up)].concat(),
                    None,
                );
                elem(
                    FWD_OUT,
                    [ifname_bytes(tap), ifname_bytes(up)].concat(),
                    None,
                );
                elem(FWD_IN, [ifname_bytes(up), ifname_bytes(tap)].concat(), None);
            }
            for pf in &r.port_forwards {
                let (p, h, g) = (pf.proto, pf.host_port, pf.guest_port);
                elem(
                    DNAT_PORTS,
                    [proto_reg(p), port_reg(h)].concat(),
                    Some([&ip.octets()[..], &port_reg(g)].concat()),
                );
                elem(
                    FWD_DNAT,
                    [
                        &ifname_bytes(tap)[..],
                        &ip.octets(),
                        &proto_reg(p),
                        &port_reg(g),
                    ]
                    .concat(),
                    None,
                );
            }
            if !r.port_forwards.is_empty() {
                elem(DNAT_TAPS, ifname_bytes(tap), None);
            }
        }
        VmPlan {
            comment: comment(r),
            elems,
        }
    }

    /// `element set[key]` (and `: data` for the map), for `hearth inspect`.
    fn describe(&self) -> Vec<String> {
        self.elems
            .iter()
            .map(|e| format!("element {}[{}]", e.set, e.text))
            .collect()
    }
}

impl Elem {
    /// `add element set { key comment "…" [: data] }`.
    fn add(&self, comment: &str) -> Msg {
        let comment = udata_comment(comment);
        let attrs = self.elem_attrs(|e| {
            if let Some(d) = &self.data {
                e.nest(attr::SET_ELEM_DATA, |a| {
                    a.bytes(attr::DATA_VALUE, d);
                });
            }
            e.bytes(attr::SET_ELEM_USERDATA, &comment);
        });
        Msg::add(
            Kind::NewSetElem,
            format!("add element {}[{}]", self.set, self.text),
            attrs,
        )
    }

    /// `delete element set { key }`.
    fn delete(&self) -> Msg {
        Msg::del(
            Kind::DelSetElem,
            format!("delete element {}[{}]", self.set, self.text),
            self.elem_attrs(|_| {}),
        )
    }

    fn elem_attrs(&self, more: impl FnOnce(&mut Attrs)) -> Attrs {
        let mut a = Attrs::new();
        a.str(attr::SET_ELEM_LIST_TABLE, TABLE)
            .str(attr::SET_ELEM_LIST_SET, self.set)
            .nest(attr::SET_ELEM_LIST_ELEMENTS, |l| {
                l.nest(attr::LIST_ELEM, |e| {
                    e.nest(attr::SET_ELEM_KEY, |k| {
                        k.bytes(attr::DATA_VALUE, &self.key);
                    });
                    more(e);
                });
            });
        a
    }
}

/// The base transaction: table, chains and sets (`add` is a no-op when
/// they exist), then each chain flushed and its rules added again (module
/// doc, "Base objects").
fn base() -> Vec<Msg> {
    let mut msgs = Vec::new();
    let mut t = Attrs::new();
    t.str(attr::TABLE_NAME, TABLE).be32(attr::TABLE_FLAGS, 0);
    msgs.push(Msg::add(Kind::NewTable, format!("add table ip {TABLE}"), t));
    for (name, kind, hook, prio) in [
        (PREROUTING, "nat", HOOK_PRE_ROUTING, -100),
        (OUTPUT, "nat", HOOK_LOCAL_OUT, -100),
        (POSTROUTING, "nat", HOOK_POST_ROUTING, 100),
        (FORWARD, "filter", HOOK_FORWARD, 0),
    ] {
        let mut a = chain_attrs(name);
        a.str(attr::CHAIN_TYPE, kind)
            .be32(attr::CHAIN_POLICY, NF_ACCEPT)
            .nest(attr::CHAIN_HOOK, |h| {
                h.be32(attr::HOOK_HOOKNUM, hook)
                    .be32(attr::HOOK_PRIORITY, prio as u32);
            });
        msgs.push(Msg::add(Kind::NewChain, format!("add chain {name}"), a));
    }
    // Key and data types (nft's datatype numbers, six bits per field of a
    // concatenation) and nft's userdata (byte orders, concatenation hints)
    // exactly as nft 1.0.6 writes them for these `type` declarations, so
    // that `nft list` prints these sets as its own.
    const UD_CONCAT: &[u8] = &[0, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0];
    const UD_MAP: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0, 4, 8, 0, 4, 13, 0, 0, 0,
        1, 0, 6, 4, 0, 0, 0, 0,
    ];
    const UD_IFNAME: &[u8] = &[0, 4, 1, 0, 0, 0];
    let concat = |types: &[u32]| types.iter().fold(0, |acc, t| (acc << 6) | t);
    let ifname_pair = concat(&[TYPE_IFNAME, TYPE_IFNAME]);
    // (name, flags, key type, key length, data type and length, userdata)
    type SetDef<'a> = (&'a str, u32, u32, u32, Option<(u32, u32)>, &'a [u8]);
    let sets: [SetDef; 6] = [
        (
            DNAT_PORTS,
            SET_MAP,
            concat(&[TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
            8,
            Some((concat(&[TYPE_IPADDR, TYPE_INET_SERVICE]), 8)),
            UD_MAP,
        ),
        (
            NAT_OUT,
            0,
            concat(&[TYPE_IPADDR, TYPE_IFNAME]),
            20,
            None,
            UD_CONCAT,
        ),
        (FWD_OUT, 0, ifname_pair, 32, None, UD_CONCAT),
        (FWD_IN, 0, ifname_pair, 32, None, UD_CONCAT),
        (
            FWD_DNAT,
            0,
            concat(&[
                TYPE_IFNAME,
                TYPE_IPADDR,
                TYPE_INET_PROTOCOL,
                TYPE_INET_SERVICE,
            ]),
            28,
            None,
            UD_CONCAT,
        ),
        (DNAT_TAPS, 0, TYPE_IFNAME, 16, None, UD_IFNAME),
    ];
    for (id, (name, flags, key_type, key_len, data, udata)) in sets.into_iter().enumerate() {
        let mut a = Attrs::new();
        a.str(attr::SET_TABLE, TABLE)
            .str(attr::SET_NAME, name)
            .be32(attr::SET_FLAGS, flags)
            .be32(attr::SET_KEY_TYPE, key_type)
            .be32(attr::SET_KEY_LEN, key_len);
        if let Some((data_type, data_len)) = data {
            a.be32(attr::SET_DATA_TYPE, data_type)
                .be32(attr::SET_DATA_LEN, data_len);
        }
        a.be32(attr::SET_ID, id as u32 + 1)
            .bytes(attr::SET_USERDATA, udata);
        msgs.push(Msg::add(Kind::NewSet, format!("add set {name}"), a));
    }

    let meta = |key, dreg| Expr::Meta { key, dreg };
    let lookup = |set| Expr::Lookup { set };
    let dnat_dispatch = || {
        vec![
            Expr::Fib {
                result: FIB_RESULT_ADDRTYPE,
                flags: FIB_F_DADDR,
            },
            Expr::Cmp {
                op: CMP_EQ,
                data: RTN_LOCAL.to_ne_bytes().to_vec(),
            },
            meta(META_L4PROTO, REG_1),
            Expr::Payload {
                base: BASE_TRANSPORT,
                offset: 2,
                len: 2,
                dreg: REG32_01,
            },
            Expr::MapToReg1 { set: DNAT_PORTS },
            Expr::Dnat {
                addr_reg: REG_1,
                port_reg: REG32_01,
            },
        ]
    };
    let ifname_pair_lookup = |set| {
        vec![
            meta(META_IIFNAME, REG_1),
            meta(META_OIFNAME, REG_2),
            lookup(set),
        ]
    };
    let rules: [(&str, Vec<Vec<Expr>>); 4] = [
        (PREROUTING, vec![dnat_dispatch()]),
        (OUTPUT, vec![dnat_dispatch()]),
        (
            POSTROUTING,
            vec![
                [
                    // ip saddr 127.0.0.0/8: the first byte is 127.
                    vec![
                        Expr::Payload {
                            base: BASE_NETWORK,
                            offset: 12,
                            len: 1,
                            dreg: REG_1,
                        },
                        Expr::Cmp {
                            op: CMP_EQ,
                            data: vec![127],
                        },
                    ],
                    Expr::ct_any(CT_STATUS, IPS_DST_NAT),
                    vec![Expr::Masq],
                ]
                .concat(),
                vec![
                    Expr::Payload {
                        base: BASE_NETWORK,
                        offset: 12,
                        len: 4,
                        dreg: REG_1,
                    },
                    meta(META_OIFNAME, REG32_01),
                    lookup(NAT_OUT),
                    Expr::Masq,
                ],
            ],
        ),
        (
            FORWARD,
            vec![
                [ifname_pair_lookup(FWD_OUT), vec![Expr::Accept]].concat(),
                [
                    ifname_pair_lookup(FWD_IN),
                    Expr::ct_any(CT_STATE, CT_ESTABLISHED | CT_RELATED),
                    vec![Expr::Accept],
                ]
                .concat(),
                [
                    vec![
                        meta(META_OIFNAME, REG_1),
                        Expr::Payload {
                            base: BASE_NETWORK,
                            offset: 16,
                            len: 4,
                            dreg: REG_2,
                        },
                        meta(META_L4PROTO, REG32_05),
                        Expr::Payload {
                            base: BASE_TRANSPORT,
                            offset: 2,
                            len: 2,
                            dreg: REG32_06,
                        },
                        lookup(FWD_DNAT),
                    ],
                    Expr::ct_any(CT_STATUS, IPS_DST_NAT),
                    vec![Expr::Accept],
                ]
                .concat(),
                [
                    vec![meta(META_IIFNAME, REG_1), lookup(DNAT_TAPS)],
                    Expr::ct_any(CT_STATUS, IPS_DST_NAT),
                    vec![Expr::Accept],
                ]
                .concat(),
            ],
        ),
    ];
    for (chain, rules) in rules {
        msgs.push(flush_chain(chain));
        for exprs in rules {
            msgs.push(add_rule(chain, &exprs));
        }
    }
    msgs
}

fn chain_attrs(name: &str) -> Attrs {
    let mut a = Attrs::new();
    a.str(attr::CHAIN_TABLE, TABLE).str(attr::CHAIN_NAME, name);
    a
}

/// `flush chain`: a rule delete naming the chain and no rule.
fn flush_chain(name: &str) -> Msg {
    let mut a = Attrs::new();
    a.str(attr::RULE_TABLE, TABLE).str(attr::RULE_CHAIN, name);
    Msg::del(Kind::DelRule, format!("flush chain {name}"), a)
}

fn add_rule(chain: &str, exprs: &[Expr]) -> Msg {
    let mut a = Attrs::new();
    a.str(attr::RULE_TABLE, TABLE)
        .str(attr::RULE_CHAIN, chain)
        .nest(attr::RULE_EXPRESSIONS, |l| {
            for e in exprs {
                e.encode(l);
            }
        });
    Msg::add(Kind::NewRule, format!("add rule in {chain}"), a)
}

/// nft's comment userdata: one TLV, type 0 (`NFTNL_UDATA_*_COMMENT`), the
/// text with its NUL.
fn udata_comment(comment: &str) -> Vec<u8> {
    let mut v = vec![0, (comment.len() + 1) as u8];
    v.extend_from_slice(comment.as_bytes());
    v.push(0);
    v
}

/// The comment in an element's userdata, if it has one.
fn udata_comment_text(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while let [ty, len, tail @ ..] = rest {
        let len = usize::from(*len);
        let value = tail.get(..len)?;
        if *ty == 0 {
            return Some(nfnl::attr_str(value));
        }
        rest = &tail[len..];
    }
    None
}

/// An interface name as the kernel compares it: NUL-padded to IFNAMSIZ.
fn ifname_bytes(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(IFNAMSIZ, 0);
    v
}

fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
    }
}

/// A protocol as one field of a concatenation: its own 4-byte register.
fn proto_reg(p: Proto) -> [u8; 4] {
    [proto_number(p), 0, 0, 0]
}

/// A port as one field of a concatenation: big-endian, in 4 bytes.
fn port_reg(port: u16) -> [u8; 4] {
    let [hi, lo] = port.to_be_bytes();
    [hi, lo, 0, 0]
}

fn proto_text(n: u8) -> String {
    match n {
        6 => "tcp".into(),
        17 => "udp".into(),
        n => n.to_string(),
    }
}

/// A key as nft would print it.
fn key_text(set: &str, key: &[u8]) -> String {
    let name = |b: &[u8]| format!("{:?}", nfnl::attr_str(b));
    let ip = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string();
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]).to_string();
    match (set, key.len()) {
        (DNAT_PORTS, 8) => format!("{} . {}", proto_text(key[0]), port(&key[4..])),
        (NAT_OUT, 20) => format!("{} . {}", ip(key), name(&key[4..])),
        (FWD_OUT | FWD_IN, 32) => format!("{} . {}", name(&key[..16]), name(&key[16..])),
        (FWD_DNAT, 28) => format!(
            "{} . {} . {} . {}",
            name(&key[..16]),
            ip(&key[16..]),
            proto_text(key[20]),
            port(&key[24..])
        ),
        (DNAT_TAPS, 16) => name(key),
        _ => format!("{key:02x?}"),
    }
}

/// The map's data (address . port) as nft would print it.
fn data_text(data: &[u8]) -> String {
    match data {
        [a, b, c, d, hi, lo, ..] => format!(
            "{} . {}",
            Ipv4Addr::new(*a, *b, *c, *d),
            u16::from_be_bytes([*hi, *lo])
        ),
        _ => format!("{data:02x?}"),
    }
}

// Kernel constants (linux/netfilter.h, linux/netfilter/nf_tables.h, nft's
// datatype numbers).
const NF_ACCEPT: u32 = 1;
const HOOK_PRE_ROUTING: u32 = 0;
const HOOK_FORWARD: u32 = 2;
const HOOK_LOCAL_OUT: u32 = 3;
const HOOK_POST_ROUTING: u32 = 4;
const SET_MAP: u32 = 0x8;
const TYPE_IPADDR: u32 = 7;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_IFNAME: u32 = 41;
const REG_VERDICT: u32 = 0;
/// 128-bit registers 1 and 2 (32-bit registers 0–3 and 4–7).
const REG_1: u32 = 1;
const REG_2: u32 = 2;
/// 32-bit registers 1, 5 and 6: fields of a concatenation.
const REG32_01: u32 = 9;
const REG32_05: u32 = 13;
const REG32_06: u32 = 14;
const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_L4PROTO: u32 = 16;
const BASE_NETWORK: u32 = 1;
const BASE_TRANSPORT: u32 = 2;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const CT_STATE: u32 = 0;
const CT_STATUS: u32 = 2;
const CT_ESTABLISHED: u32 = 1 << 1;
const CT_RELATED: u32 = 1 << 2;
const IPS_DST_NAT: u32 = 1 << 5;
const FIB_RESULT_ADDRTYPE: u32 = 3;
const FIB_F_DADDR: u32 = 2;
const RTN_LOCAL: u32 = 2;
const NAT_DNAT: u32 = 1;
const NFPROTO_IPV4: u32 = 2;

/// The nf_tables expressions hearth's rules use; compare, bitwise and ct
/// work on register 1.
#[derive(Debug, Clone)]
enum Expr {
    Meta {
        key: u32,
        dreg: u32,
    },
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    Cmp {
        op: u32,
        data: Vec<u8>,
    },
    /// reg 1 = reg 1 & mask (xor 0).
    And {
        mask: Vec<u8>,
    },
    Ct {
        key: u32,
    },
    Fib {
        result: u32,
        flags: u32,
    },
    /// Membership of the key in register 1 (and on) in a set.
    Lookup {
        set: &'static str,
    },
    /// The map's data for the key in register 1, into register 1.
    MapToReg1 {
        set: &'static str,
    },
    Accept,
    Dnat {
        addr_reg: u32,
        port_reg: u32,
    },
    Masq,
}

impl Expr {
    /// `ct <key> <bits>`: any of the bits set.
    fn ct_any(key: u32, bits: u32) -> Vec<Expr> {
        vec![
            Expr::Ct { key },
            Expr::And {
                mask: bits.to_ne_bytes().to_vec(),
            },
            Expr::Cmp {
                op: CMP_NEQ,
                data: vec![0; 4],
            },
        ]
    }

    /// Appends this expression as one element of a rule's expression list.
    fn encode(&self, list: &mut Attrs) {
        list.nest(attr::LIST_ELEM, |e| {
            e.str(attr::EXPR_NAME, self.name())
                .nest(attr::EXPR_DATA, |a| self.data(a));
        });
    }

    /// The kernel's name of the expression.
    fn name(&self) -> &'static str {
        match self {
            Expr::Meta { .. } => "meta",
            Expr::Payload { .. } => "payload",
            Expr::Cmp { .. } => "cmp",
            Expr::And { .. } => "bitwise",
            Expr::Ct { .. } => "ct",
            Expr::Fib { .. } => "fib",
            Expr::Lookup { .. } | Expr::MapToReg1 { .. } => "lookup",
            Expr::Accept => "immediate",
            Expr::Dnat { .. } => "nat",
            Expr::Masq => "masq",
        }
    }

    /// Its attributes (`NFTA_<NAME>_*`, numbered as in nf_tables.h).
    fn data(&self, a: &mut Attrs) {
        match self {
            Expr::Meta { key, dreg } => {
                a.be32(2, *key).be32(1, *dreg);
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                a.be32(1, *dreg)
                    .be32(2, *base)
                    .be32(3, *offset)
                    .be32(4, *len);
            }
            Expr::Cmp { op, data } => {
                a.be32(1, REG_1).be32(2, *op).nest(3, |d| {
                    d.bytes(attr::DATA_VALUE, data);
                });
            }
            Expr::And { mask } => {
                a.be32(1, REG_1)
                    .be32(2, REG_1)
                    .be32(3, mask.len() as u32)
                    .nest(4, |d| {
                        d.bytes(attr::DATA_VALUE, mask);
                    })
                    .nest(5, |d| {
                        d.bytes(attr::DATA_VALUE, &vec![0; mask.len()]);
                    });
            }
            Expr::Ct { key } => {
                a.be32(2, *key).be32(1, REG_1);
            }
            Expr::Fib { result, flags } => {
                a.be32(1, REG_1).be32(2, *result).be32(3, *flags);
            }
            Expr::Lookup { set } => {
                a.str(1, set).be32(2, REG_1);
            }
            Expr::MapToReg1 { set } => {
                a.str(1, set).be32(2, REG_1).be32(3, REG_1);
            }
            Expr::Accept => {
                a.be32(1, REG_VERDICT).nest(2, |d| {
                    d.nest(attr::DATA_VERDICT, |v| {
                        v.be32(attr::VERDICT_CODE, NF_ACCEPT);
                    });
                });
            }
            Expr::Dnat { addr_reg, port_reg } => {
                a.be32(1, NAT_DNAT)
                    .be32(2, NFPROTO_IPV4)
                    .be32(3, *addr_reg)
                    .be32(5, *port_reg);
            }
            Expr::Masq => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;
    use std::process::Command as StdCommand;

    use serde_json::Value;

    use super::*;
    use crate::host::firewall::PortForward;
    use crate::host::testns::in_netns;

    /// Runs `f` on a current-thread runtime inside a fresh network
    /// namespace, where sockets are opened and `nft` children run.
    fn in_ns<T, F>(tag: &str, f: impl FnOnce() -> F + Send + 'static) -> Option<T>
    where
        T: Send + 'static,
        F: Future<Output = T>,
    {
        in_netns(tag, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
    }

    fn vm(s: &str, tap: &str, last: u8, nat: bool, ports: &[(u16, Proto, u16)]) -> VmRules {
        VmRules {
            short_id: s.into(),
            vm_id: format!("0190-{s}"),
            tap: tap.into(),
            guest_ip: Ipv4Addr::new(172, 16, 0, last),
            nat_uplink: nat.then(|| "eth0".to_owned()),
            port_forwards: ports
                .iter()
                .map(|&(host_port, proto, guest_port)| PortForward {
                    host_port,
                    proto,
                    guest_port,
                })
                .collect(),
        }
    }

    /// `nft <args>` in the current thread's namespace, its stdout.
    fn nft(args: &[&str]) -> String {
        let out = StdCommand::new("nft").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `nft -f -` with `script`.
    fn nft_script(script: &str) {
        use std::io::Write as _;
        let mut child = StdCommand::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "{script}");
    }

    /// What `nft -j list table ip hearth` shows, in a comparable form.
    #[derive(Debug, Default)]
    struct Table {
        /// Chain → number of rules.
        rules: BTreeMap<String, usize>,
        /// (set, key as JSON, comment) of every element.
        elems: BTreeSet<(String, String, Option<String>)>,
    }

    fn table() -> Option<Table> {
        let out = StdCommand::new("nft")
            .args(["-j", "list", "table", "ip", "hearth"])
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut t = Table::default();
        for o in doc["nftables"].as_array().unwrap() {
            if let Some(c) = o.get("chain") {
                t.rules
                    .entry(c["name"].as_str().unwrap().to_owned())
                    .or_default();
            } else if let Some(r) = o.get("rule") {
                *t.rules
                    .entry(r["chain"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            } else if let Some(set) = o.get("set").or_else(|| o.get("map")) {
                let name = set["name"].as_str().unwrap();
                for e in set
                    .get("elem")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    // A map's element is [key, data]; the key may be
                    // {"elem": {"val": …, "comment": …}}.
                    let key = if o.get("map").is_some() { &e[0] } else { e };
                    let (val, comment) = match key.get("elem") {
                        Some(inner) => (&inner["val"], inner["comment"].as_str()),
                        None => (key, None),
                    };
                    t.elems
                        .insert((name.into(), val.to_string(), comment.map(str::to_owned)));
                }
            }
        }
        Some(t)
    }

    impl Table {
        /// Elements marked for VM `vm_id`: (set, key).
        fn of(&self, vm_id: &str) -> Vec<(String, String)> {
            let mark = format!("hearth:vm:{vm_id}");
            self.elems
                .iter()
                .filter(|e| e.2.as_deref() == Some(mark.as_str()))
                .map(|e| (e.0.clone(), e.1.clone()))
                .collect()
        }

        /// The fixed chains, each with its rules once.
        fn assert_base(&self) {
            let want: BTreeMap<String, usize> = [
                ("forward", 4),
                ("output", 1),
                ("postrouting", 2),
                ("prerouting", 1),
            ]
            .into_iter()
            .map(|(c, n)| (c.to_owned(), n))
            .collect();
            assert_eq!(self.rules, want);
        }
    }

    #[test]
    fn apply_installs_exactly_the_vms_elements() {
        in_ns("fw-apply", || async {
            let fw = Nft::new();
            let a = vm("ab12", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]);
            assert_eq!(
                fw.apply(&a).await.unwrap(),
                [
                    r#"element nat_out[172.16.0.2 . "eth0"]"#,
                    r#"element fwd_out["hth1" . "eth0"]"#,
                    r#"element fwd_in["eth0" . "hth1"]"#,
                    "element dnat_ports[tcp . 8080 : 172.16.0.2 . 80]",
                    r#"element fwd_dnat["hth1" . 172.16.0.2 . tcp . 80]"#,
                    r#"element dnat_taps["hth1"]"#,
                ]
            );
            eprintln!("{}", nft(&["list", "table", "ip", "hearth"]));
            let t = table().unwrap();
            t.assert_base();
            // Every element is marked, and nothing else is there.
            assert_eq!(t.of("0190-ab12").len(), 6, "{t:?}");
            assert_eq!(t.elems.len(), 6);
            assert_eq!(fw.list_vms().await.unwrap(), ["0190-ab12"]);
            // The mark is in nft's own listing too (leak-audit reads it).
            let text = nft(&["list", "set", "ip", "hearth", "fwd_out"]);
            assert!(
                text.contains(r#""hth1" . "eth0" comment "hearth:vm:0190-ab12""#),
                "{text}"
            );
            // A VM with no rules gets nothing.
            let mut empty = vm("e", "hth7", 30, false, &[]);
            empty.port_forwards.clear();
            assert!(fw.apply(&empty).await.unwrap().is_empty());
            fw.remove(&empty).await.unwrap();
        });
    }

    #[test]
    fn vms_are_independent_and_removal_is_idempotent() {
        in_ns("fw-indep", || async {
            let fw = Nft::new();
            let a = vm("aaa", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]);
            let b = vm("bbb", "hth2", 6, true, &[(5353, Proto::Udp, 53)]);
            let c = vm("ccc", "hth3", 10, false, &[(2222, Proto::Tcp, 22)]);
            // Removing on a host that never saw hearth succeeds.
            fw.remove(&a).await.unwrap();
            fw.remove(&a).await.unwrap();
            assert_eq!(fw.list_vms().await.unwrap(), Vec::<String>::new());

            fw.apply(&a).await.unwrap();
            let only_a = table().unwrap();
            fw.apply(&b).await.unwrap();
            fw.apply(&c).await.unwrap();
            fw.apply(&c).await.unwrap();
            let t = table().unwrap();
            t.assert_base();
            assert_eq!(t.of("0190-aaa"), only_a.of("0190-aaa"));
            assert_eq!(t.of("0190-ccc").len(), 3, "re-applying changed nothing");
            assert_eq!(t.elems.len(), 6 + 6 + 3);
            assert_eq!(
                fw.list_vms().await.unwrap(),
                ["0190-aaa", "0190-bbb", "0190-ccc"]
            );

            fw.remove(&b).await.unwrap();
            let t = table().unwrap();
            assert!(t.of("0190-bbb").is_empty());
            assert_eq!(t.of("0190-aaa"), only_a.of("0190-aaa"));
            fw.remove(&b).await.unwrap();
            fw.remove(&vm("never", "hth9", 99, true, &[(1, Proto::Tcp, 1)]))
                .await
                .unwrap();
            fw.remove(&a).await.unwrap();
            fw.remove(&c).await.unwrap();
            fw.remove(&c).await.unwrap();
            let t = table().unwrap();
            t.assert_base();
            assert!(t.elems.is_empty(), "{:?}", t.elems);
            assert!(!nft(&["list", "ruleset"]).contains("hearth:vm:"));
        });
    }

    #[test]
    fn base_objects_are_made_once_and_again_when_deleted() {
        in_ns("fw-base", || async {
            let fw = Nft::new();
            let vms: Vec<VmRules> = (0..5)
                .map(|i| vm(&format!("v{i}"), &format!("hth{i}"), 2 + 4 * i, true, &[]))
                .collect();
            for v in vms.iter().chain(&vms) {
                fw.apply(v).await.unwrap();
            }
            let t = table().unwrap();
            t.assert_base();
            assert_eq!(t.elems.len(), 5 * 3);

            // Deleted behind our back: the next transaction rebuilds it.
            nft(&["delete", "table", "ip", "hearth"]);
            assert_eq!(fw.list_vms().await.unwrap(), Vec::<String>::new());
            fw.remove(&vms[0]).await.unwrap();
            fw.apply(&vms[1]).await.unwrap();
            let t = table().unwrap();
            t.assert_base();
            assert_eq!(fw.list_vms().await.unwrap(), ["0190-v1"]);
        });
    }

    #[test]
    fn concurrent_transactions_of_different_vms_all_land() {
        in_ns("fw-conc", || async {
            let fw = Nft::new();
            let vms: Vec<VmRules> = (0..16u8)
                .map(|i| {
                    let port = 8000 + u16::from(i);
                    vm(
                        &format!("c{i}"),
                        &format!("hth{i}"),
                        2 + 4 * i,
                        true,
                        &[(port, Proto::Tcp, 80)],
                    )
                })
                .collect();
            let applied = futures_util::future::join_all(vms.iter().map(|v| fw.apply(v))).await;
            assert!(applied.iter().all(Result::is_ok), "{applied:?}");
            let t = table().unwrap();
            t.assert_base();
            assert_eq!(t.elems.len(), 16 * 6);
            let removed = futures_util::future::join_all(vms.iter().map(|v| fw.remove(v))).await;
            assert!(removed.iter().all(Result::is_ok), "{removed:?}");
            assert_eq!(fw.list_vms().await.unwrap(), Vec::<String>::new());
        });
    }

    #[test]
    fn a_refusal_in_a_combined_batch_fails_only_its_own_vm() {
        in_ns("fw-group", || async {
            let fw = Nft::new();
            fw.apply(&vm("own", "hth0", 2, false, &[(8080, Proto::Tcp, 80)]))
                .await
                .unwrap();
            // Queued together while no one may lead, so sent as one batch
            // first; one of them clashes on 8080/tcp.
            fw.inner
                .paused
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let vms: Vec<VmRules> = (1..9u8)
                .map(|i| {
                    let port = if i == 4 { 8080 } else { 9000 + u16::from(i) };
                    vm(
                        &format!("g{i}"),
                        &format!("hth{i}"),
                        2 + 4 * i,
                        true,
                        &[(port, Proto::Tcp, 80)],
                    )
                })
                .collect();
            let applying = vms.iter().map(|v| {
                let (fw, v) = (fw.clone(), v.clone());
                tokio::spawn(async move { fw.apply(&v).await })
            });
            let applying: Vec<_> = applying.collect();
            while lock(&fw.inner.queue).len() < vms.len() {
                tokio::task::yield_now().await;
            }
            fw.inner
                .paused
                .store(false, std::sync::atomic::Ordering::SeqCst);
            fw.inner.lead();
            assert!(lock(&fw.inner.queue).is_empty());
            let mut applied = Vec::new();
            for a in applying {
                applied.push(a.await.unwrap());
            }
            for (v, r) in vms.iter().zip(&applied) {
                assert_eq!(r.is_err(), v.short_id == "g4", "{}: {r:?}", v.short_id);
            }
            let mut want: Vec<String> = (1..9)
                .filter(|&i| i != 4)
                .map(|i| format!("0190-g{i}"))
                .collect();
            want.push("0190-own".into());
            assert_eq!(fw.list_vms().await.unwrap(), want);
        });
    }

    #[test]
    fn a_refused_apply_leaves_nothing_of_the_vm() {
        in_ns("fw-atomic", || async {
            let fw = Nft::new();
            let a = vm("aaa", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]);
            fw.apply(&a).await.unwrap();
            let before = table().unwrap();

            // Host port 8080/tcp is taken: the kernel refuses the element,
            // and with it every other element of `b`.
            let b = vm(
                "bbb",
                "hth2",
                6,
                true,
                &[(9090, Proto::Tcp, 90), (8080, Proto::Tcp, 80)],
            );
            let err = fw.apply(&b).await.unwrap_err();
            match &err {
                FirewallError::Refused {
                    op, what, source, ..
                } => {
                    assert_eq!(
                        (*op, what.as_str()),
                        (
                            "apply",
                            "add element dnat_ports[tcp . 8080 : 172.16.0.6 . 80]"
                        )
                    );
                    assert!(
                        matches!(source.raw_os_error(), Some(libc::EEXIST | libc::EBUSY)),
                        "{source}"
                    );
                    assert!(err.to_string().contains("forwarded to another VM"), "{err}");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(table().unwrap().elems, before.elems);
            assert_eq!(fw.list_vms().await.unwrap(), ["0190-aaa"]);

            // A name hearth refuses fails before any kernel call.
            let mut c = vm("ccc", "hth3", 10, true, &[]);
            c.nat_uplink = Some("a\"b".into());
            let err = fw.apply(&c).await.unwrap_err();
            assert!(matches!(err, FirewallError::Invalid { .. }), "{err:?}");
            assert_eq!(fw.list_vms().await.unwrap(), ["0190-aaa"]);
        });
    }

    #[test]
    fn removal_leaves_keys_that_now_belong_to_another_vm() {
        in_ns("fw-reuse", || async {
            let fw = Nft::new();
            let a = vm("aaa", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]);
            fw.apply(&a).await.unwrap();
            fw.remove(&a).await.unwrap();
            // b reuses a's tap, address and port.
            let b = vm("bbb", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]);
            fw.apply(&b).await.unwrap();
            let before = table().unwrap();
            assert_eq!(before.of("0190-bbb").len(), 6);
            // A late retry of a's removal must succeed and leave b alone.
            fw.remove(&a).await.unwrap();
            assert_eq!(table().unwrap().elems, before.elems);
            assert_eq!(fw.list_vms().await.unwrap(), ["0190-bbb"]);
        });
    }

    #[test]
    fn an_orphan_is_removed_by_its_vm_id_alone() {
        in_ns("fw-orphan", || async {
            let fw = Nft::new();
            let x = vm("xxx", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]);
            let y = vm("yyy", "hth2", 6, true, &[(8081, Proto::Tcp, 80)]);
            fw.apply(&x).await.unwrap();
            fw.apply(&y).await.unwrap();
            // All a sweep knows is the mark.
            fw.remove_orphan("0190-xxx").await.unwrap();
            fw.remove_orphan("0190-xxx").await.unwrap();
            fw.remove_orphan("never").await.unwrap();
            let err = fw.remove_orphan("a\"b").await.unwrap_err();
            assert!(matches!(err, FirewallError::Invalid { .. }), "{err:?}");
            let t = table().unwrap();
            assert!(t.of("0190-xxx").is_empty());
            assert_eq!(t.of("0190-yyy").len(), 6);
            assert_eq!(fw.list_vms().await.unwrap(), ["0190-yyy"]);
        });
    }

    #[test]
    fn the_ruleset_reads_back_as_nft_itself_would_write_it() {
        // What hearth sends over netlink, as nft lists it (and as its
        // debug view shows the expressions: registers, lengths)...
        let listings = || {
            (
                nft(&["list", "table", "ip", "hearth"]),
                nft(&["--debug=netlink", "list", "table", "ip", "hearth"])
                    .lines()
                    // Rule handles follow the chain name; they need not match.
                    .map(|l| match l.strip_prefix("ip hearth ") {
                        Some(rest) => rest.split(' ').next().unwrap().to_owned(),
                        None => l.to_owned(),
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let ours = in_ns("fw-same-a", move || async move {
            let fw = Nft::new();
            fw.apply(&vm("ab12", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]))
                .await
                .unwrap();
            fw.apply(&vm("cd34", "hth2", 6, false, &[(5353, Proto::Udp, 53)]))
                .await
                .unwrap();
            listings()
        })
        .unwrap();
        // ...is what nft makes of the same ruleset written in its language.
        let theirs = in_ns("fw-same-b", move || async move {
            nft_script(
                r#"
add table ip hearth
add chain ip hearth prerouting { type nat hook prerouting priority -100; policy accept; }
add chain ip hearth output { type nat hook output priority -100; policy accept; }
add chain ip hearth postrouting { type nat hook postrouting priority 100; policy accept; }
add chain ip hearth forward { type filter hook forward priority 0; policy accept; }
add map ip hearth dnat_ports { type inet_proto . inet_service : ipv4_addr . inet_service; }
add set ip hearth nat_out { type ipv4_addr . ifname; }
add set ip hearth fwd_out { type ifname . ifname; }
add set ip hearth fwd_in { type ifname . ifname; }
add set ip hearth fwd_dnat { type ifname . ipv4_addr . inet_proto . inet_service; }
add set ip hearth dnat_taps { type ifname; }
add rule ip hearth prerouting fib daddr type local dnat ip to meta l4proto . th dport map @dnat_ports
add rule ip hearth output fib daddr type local dnat ip to meta l4proto . th dport map @dnat_ports
add rule ip hearth postrouting ip saddr 127.0.0.0/8 ct status dnat masquerade
add rule ip hearth postrouting ip saddr . oifname @nat_out masquerade
add rule ip hearth forward iifname . oifname @fwd_out accept
add rule ip hearth forward iifname . oifname @fwd_in ct state established,related accept
add rule ip hearth forward oifname . ip daddr . meta l4proto . th dport @fwd_dnat ct status dnat accept
add rule ip hearth forward iifname @dnat_taps ct status dnat accept
add element ip hearth nat_out { 172.16.0.2 . "eth0" comment "hearth:vm:0190-ab12" }
add element ip hearth fwd_out { "hth1" . "eth0" comment "hearth:vm:0190-ab12" }
add element ip hearth fwd_in { "eth0" . "hth1" comment "hearth:vm:0190-ab12" }
add element ip hearth dnat_ports { tcp . 8080 comment "hearth:vm:0190-ab12" : 172.16.0.2 . 80 }
add element ip hearth fwd_dnat { "hth1" . 172.16.0.2 . tcp . 80 comment "hearth:vm:0190-ab12" }
add element ip hearth dnat_taps { "hth1" comment "hearth:vm:0190-ab12" }
add element ip hearth dnat_ports { udp . 5353 comment "hearth:vm:0190-cd34" : 172.16.0.6 . 53 }
add element ip hearth fwd_dnat { "hth2" . 172.16.0.6 . udp . 53 comment "hearth:vm:0190-cd34" }
add element ip hearth dnat_taps { "hth2" comment "hearth:vm:0190-cd34" }
"#,
            );
            listings()
        })
        .unwrap();
        assert_eq!(ours.0, theirs.0);
        // Elements of a hash set come out in hash order: compare as sorted.
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        assert_eq!(sorted(ours.1), sorted(theirs.1));
    }

    #[test]
    fn keys_print_as_nft_prints_them_and_comments_read_back() {
        let plan = VmPlan::new(&vm("aaa", "hth1", 2, true, &[(8080, Proto::Udp, 53)]));
        let texts: Vec<&str> = plan.elems.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                r#"172.16.0.2 . "eth0""#,
                r#""hth1" . "eth0""#,
                r#""eth0" . "hth1""#,
                "udp . 8080 : 172.16.0.2 . 53",
                r#""hth1" . 172.16.0.2 . udp . 53"#,
                r#""hth1""#,
            ]
        );
        let c = udata_comment("hearth:vm:x");
        assert_eq!(udata_comment_text(&c).as_deref(), Some("hearth:vm:x"));
        assert_eq!(udata_comment_text(&[1, 2, 0, 0]), None);
        assert_eq!(udata_comment_text(&[0, 9, b'a']), None, "truncated");
    }
}
