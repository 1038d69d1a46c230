//! [`Firewall`] over nf_tables netlink ([`super::nfnl`]): every call is one
//! batch on one long-lived socket, which the kernel commits as one
//! transaction — all of it or none of it.
//!
//! # The ruleset
//!
//! Everything lives in `table ip hearth`; no other table, chain or policy
//! is touched. Four base chains dispatch through verdict maps to per-VM
//! chains, so a packet costs one hash lookup per hook however many VMs
//! there are, and adding or removing a VM is a few map elements and
//! chains:
//!
//! ```text
//! table ip hearth
//! ├─ chain prerouting   nat, hook prerouting, prio dstnat (-100)
//! │    fib daddr type local meta l4proto . th dport vmap @dnat_ports
//! ├─ chain output       nat, hook output, prio -100 (the host's own connections)
//! │    fib daddr type local meta l4proto . th dport vmap @dnat_ports
//! ├─ chain postrouting  nat, hook postrouting, prio srcnat (100)
//! │    ip saddr 127.0.0.0/8 ct status dnat masquerade
//! │    ip saddr vmap @nat_saddr
//! ├─ chain forward      filter, hook forward, prio filter (0), policy accept
//! │    iifname vmap @fwd_iif
//! │    oifname vmap @fwd_oif
//! │
//! ├─ map dnat_ports  inet_proto . inet_service : verdict   tcp . 8080 : jump vm-<s>-dnat
//! ├─ map nat_saddr   ipv4_addr : verdict                   172.16.0.2 : jump vm-<s>-post
//! ├─ map fwd_iif     ifname : verdict                      "hth1" : jump vm-<s>-fwd
//! ├─ map fwd_oif     ifname : verdict                      "hth1" : jump vm-<s>-fwd
//! │
//! ├─ chain vm-<s>-dnat                               (only with port forwards)
//! │    meta l4proto tcp th dport 8080 dnat to 172.16.0.2:80         per forward
//! ├─ chain vm-<s>-post                               (only with NAT)
//! │    oifname "eth0" masquerade
//! └─ chain vm-<s>-fwd
//!      iifname "hth1" oifname "eth0" accept                                   NAT
//!      iifname "eth0" oifname "hth1" ct state established,related accept      NAT
//!      oifname "hth1" ip daddr 172.16.0.2 meta l4proto tcp th dport 80
//!          ct status dnat accept                                      per forward
//!      iifname "hth1" ct status dnat accept              replies of the forwards
//! ```
//!
//! Every per-VM rule carries the comment `hearth:vm:<id>`, and so does every
//! map element, so a leaked object names its VM (DESIGN.md, "Ownership
//! marks"). `vm-<s>-post` exists only with NAT, `vm-<s>-dnat` only with port
//! forwards; a VM with neither gets nothing at all. The loopback masquerade
//! is a base rule: a connection from 127.0.0.0/8 that was DNATed must leave
//! with a routable source (with `route_localnet=1` on the tap, set
//! elsewhere), whichever VM it was DNATed to.
//!
//! # Base objects: once per daemon, and again when missing
//!
//! The table, base chains, maps and dispatch rules are made by one
//! transaction — `add` table, chains and maps (no-ops when present), then
//! `flush` each base chain and `add` its dispatch rules, atomically (packets
//! see the old or the new chain, never an empty one) — before the first VM
//! transaction of this process, and again whenever a transaction fails with
//! ENOENT (the table or a map was deleted behind our back), after which
//! that transaction is retried once. VM transactions therefore only add
//! (apply) or only remove what the VM owns: they never rewrite shared
//! rules, so they cost the same with 10 or 1,000 VMs.
//!
//! # Apply
//!
//! For each of the VM's chains `add` + `flush` (so applying the same plan
//! again replaces its rules instead of doubling them), its rules, and its
//! map elements. A map key held by another VM (a host port already
//! forwarded) makes the kernel refuse the element, and with it the whole
//! transaction: nothing of the VM is left. Rules are sent with
//! `NLM_F_ECHO`, so the description returned for `hearth inspect` carries
//! each rule's kernel handle.
//!
//! # Idempotent removal without reading
//!
//! One transaction: `add chain` for all three of the VM's chains (creates
//! them empty if absent), `add element` for each key the plan uses (a no-op
//! when the same key → same verdict is present; comments are not compared),
//! then `delete element` for each key, `flush chain` and `delete chain` for
//! each chain. Whatever was there or not, the transaction ends with none of
//! it, so removing twice, or removing what was never applied, succeeds
//! (kernels before 6.3 have no `destroy`).
//!
//! Two cases need more, and only they read the ruleset. A key the VM once
//! had may since have been given to another VM (its port, address or tap
//! reused after an earlier, successful removal): adding it back with our
//! verdict clashes, and deleting it by key would remove the other VM's
//! element. And an element the plan does not name may still point at the
//! VM's chains (a plan edited since its apply): deleting the chain is then
//! refused (EBUSY). So when the removal fails, the maps are read and it is
//! retried once without the keys that point at other VMs' chains and with
//! every element that points at ours. The retry still adds-then-deletes
//! each key, so a race cannot make it delete a foreign element: it fails
//! instead.
//!
//! [`Firewall::remove_orphan`] (a sweep's removal of chains the store
//! knows nothing about) has no plan at all: it reads the maps first and
//! removes, in the same kind of transaction, every element that points at
//! the VM's chains, then the chains.
//!
//! # Group commit
//!
//! One thread owns the socket. Callers queue their transaction and await
//! the answer; the thread takes everything queued at once and sends it as
//! one batch, so 64 concurrent teardowns at a recovery cost a few
//! transactions, not 64. If a combined batch is refused, each transaction
//! in it is sent again on its own, so every caller gets its own answer and
//! one VM's refusal never fails another's.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::mpsc;

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::nfnl::{self, Attrs, Kind, Msg, NfSocket, Refused, attr};
use super::{Firewall, FirewallError, Proto, TABLE, VmRules};

/// Base chains.
const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const POSTROUTING: &str = "postrouting";
const FORWARD: &str = "forward";

/// Verdict maps.
const FWD_IIF: &str = "fwd_iif";
const FWD_OIF: &str = "fwd_oif";
const NAT_SADDR: &str = "nat_saddr";
const DNAT_PORTS: &str = "dnat_ports";
const MAPS: [&str; 4] = [FWD_IIF, FWD_OIF, NAT_SADDR, DNAT_PORTS];

/// Per-VM chain suffixes: `vm-<s>-fwd`, `vm-<s>-post`, `vm-<s>-dnat`.
const VM_CHAIN_KINDS: [&str; 3] = ["fwd", "post", "dnat"];

/// Linux's IFNAMSIZ; names are compared over all of it, NUL-padded.
const IFNAMSIZ: usize = 16;

/// Userdata comments are one TLV: at most 255 bytes with the NUL; nft
/// itself refuses more than 128.
const COMMENT_MAX: usize = 128;

/// Most messages one combined batch carries (a few hundred KiB).
const BATCH_MAX_MSGS: usize = 4096;

/// The real firewall: nf_tables over netlink, from one thread that owns
/// the socket (module doc, "Group commit"). Clones share that thread.
#[derive(Debug, Clone)]
pub struct Nft {
    jobs: mpsc::Sender<Job>,
}

impl Default for Nft {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the socket's thread answers.
type Reply<T> = oneshot::Sender<Result<T, Refused>>;

/// One caller's transaction, waiting to be sent.
type Pending = (Vec<Msg>, Reply<nfnl::Echoes>);

/// What callers ask of the socket's thread.
enum Job {
    Batch(Vec<Msg>, Reply<nfnl::Echoes>),
    Dump(Kind, Attrs, Reply<Vec<Vec<u8>>>),
}

impl Nft {
    /// Starts the socket's thread. The socket is opened in the network
    /// namespace of the calling thread, which the new thread inherits.
    pub fn new() -> Self {
        let (jobs, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("hearth-nft".into())
            .spawn(move || Worker::run(rx));
        if let Err(e) = spawned {
            // Every call will then fail with "the nftables thread is gone".
            tracing::error!(error = %e, "cannot start the nftables thread");
        }
        Self { jobs }
    }

    async fn batch(&self, op: &'static str, msgs: Vec<Msg>) -> Result<nfnl::Echoes, FirewallError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Batch(msgs, tx))
            .map_err(|_| FirewallError::Gone { op })?;
        rx.await
            .map_err(|_| FirewallError::Gone { op })?
            .map_err(|r| refused(op, r))
    }

    async fn dump(
        &self,
        op: &'static str,
        kind: Kind,
        attrs: Attrs,
    ) -> Result<Vec<Vec<u8>>, FirewallError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Dump(kind, attrs, tx))
            .map_err(|_| FirewallError::Gone { op })?;
        rx.await
            .map_err(|_| FirewallError::Gone { op })?
            .map_err(|r| refused(op, r))
    }

    /// Every element of hearth's maps, with the chain it jumps to (empty
    /// for any other verdict).
    async fn map_elements(&self) -> Result<Vec<Elem>, FirewallError> {
        const OP: &str = "remove (reading maps)";
        let mut found = Vec::new();
        for map in MAPS {
            let mut filter = Attrs::new();
            filter
                .str(attr::SET_ELEM_LIST_TABLE, TABLE)
                .str(attr::SET_ELEM_LIST_SET, map);
            for obj in self.dump(OP, Kind::GetSetElem, filter).await? {
                let Some(list) = nfnl::find_attr(&obj, attr::SET_ELEM_LIST_ELEMENTS) else {
                    continue;
                };
                for (_, elem) in nfnl::parse_attrs(list) {
                    let key = nfnl::find_attr(elem, attr::SET_ELEM_KEY)
                        .and_then(|k| nfnl::find_attr(k, attr::DATA_VALUE));
                    let Some(key) = key else { continue };
                    let chain = nfnl::find_attr(elem, attr::SET_ELEM_DATA)
                        .and_then(|d| nfnl::find_attr(d, attr::DATA_VERDICT))
                        .and_then(|v| nfnl::find_attr(v, attr::VERDICT_CHAIN))
                        .map(nfnl::attr_str)
                        .unwrap_or_default();
                    found.push(Elem {
                        map,
                        key: key.to_vec(),
                        key_text: key_text(map, key),
                        chain,
                    });
                }
            }
        }
        Ok(found)
    }
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

/// The thread that owns the socket.
struct Worker {
    sock: Result<NfSocket, String>,
    /// Whether this process made the base objects (module doc).
    base_made: bool,
}

impl Worker {
    fn run(rx: mpsc::Receiver<Job>) {
        let mut w = Worker {
            sock: NfSocket::open()
                .map_err(|e| format!("cannot open a netfilter netlink socket: {e}")),
            base_made: false,
        };
        while let Ok(first) = rx.recv() {
            // Everything queued now goes out together.
            let mut jobs = vec![first];
            jobs.extend(rx.try_iter());
            let mut batches = Vec::new();
            for job in jobs {
                match job {
                    Job::Batch(msgs, reply) => batches.push((msgs, reply)),
                    Job::Dump(kind, attrs, reply) => {
                        w.commit(std::mem::take(&mut batches));
                        let _ = reply.send(w.sock().and_then(|s| s.dump(kind, &attrs)));
                    }
                }
            }
            w.commit(batches);
        }
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
                Ok(echoes) => {
                    let mut start = 0;
                    for (msgs, reply) in group {
                        let end = start + msgs.len();
                        let mine = echoes
                            .iter()
                            .filter(|(i, _)| (start..end).contains(i))
                            .map(|(i, p)| (i - start, p.clone()))
                            .collect();
                        let _ = reply.send(Ok(mine));
                        start = end;
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
    fn transaction(&mut self, msgs: &[Msg]) -> Result<nfnl::Echoes, Refused> {
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

/// A refused batch as the firewall's error.
fn refused(op: &'static str, r: Refused) -> FirewallError {
    let clash = r.what.starts_with("add element")
        && matches!(r.errno(), Some(libc::EEXIST) | Some(libc::EBUSY));
    FirewallError::Refused {
        op,
        what: r.what,
        detail: match (clash, r.detail) {
            (true, d) => Some(d.map_or_else(
                || "the key is held by another VM".to_owned(),
                |d| format!("{d} (the key is held by another VM)"),
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
        let msgs = plan.apply_msgs();
        let echoes = self.batch("apply", msgs).await?;
        // Echoed rules come back in the order they were sent.
        let handles: Vec<u64> = echoes
            .iter()
            .filter_map(|(_, payload)| nfnl::find_attr(payload, attr::RULE_HANDLE))
            .filter_map(|h| Some(u64::from_be_bytes(h.try_into().ok()?)))
            .collect();
        let handles = (handles.len() == plan.rules.len()).then_some(handles);
        if handles.is_none() {
            tracing::warn!(vm = %rules.vm_id, "the kernel did not echo one handle per rule; describing without handles");
        }
        Ok(plan.describe(handles.as_deref()))
    }

    async fn remove(&self, rules: &VmRules) -> Result<(), FirewallError> {
        validate(rules)?;
        let plan = VmPlan::new(rules);
        let s = &rules.short_id;
        let first = match self.batch("remove", removal(s, &plan.elems)).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        // A key of ours may now belong to another VM, or an element the
        // plan does not name may still point at our chains (module doc).
        let current = match self.map_elements().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    vm = %rules.vm_id, error = %e,
                    "cannot read hearth's maps after a failed removal"
                );
                return Err(first);
            }
        };
        let ours = |chain: &str| VM_CHAIN_KINDS.iter().any(|k| chain == vm_chain(s, k));
        let mut elems = Vec::new();
        let mut foreign = 0;
        for e in plan.elems {
            let holder = current.iter().find(|c| c.map == e.map && c.key == e.key);
            match holder {
                Some(h) if h.chain != e.chain => {
                    tracing::warn!(
                        vm = %rules.vm_id,
                        "leaving {}[{}] alone: it now points at {}", e.map, e.key_text, h.chain
                    );
                    foreign += 1;
                }
                _ => elems.push(e),
            }
        }
        let mut extra = 0;
        for c in current {
            if ours(&c.chain) && !elems.iter().any(|e| e.map == c.map && e.key == c.key) {
                tracing::warn!(
                    vm = %rules.vm_id,
                    "also removing {}[{}]: it points at {}", c.map, c.key_text, c.chain
                );
                elems.push(c);
                extra += 1;
            }
        }
        if foreign == 0 && extra == 0 {
            return Err(first);
        }
        self.batch("remove", removal(s, &elems)).await.map(drop)
    }

    async fn remove_orphan(&self, short_id: &str) -> Result<(), FirewallError> {
        validate(&orphan(short_id))?;
        // An orphan's elements are unknown, so the maps are read first.
        let ours = |chain: &str| {
            VM_CHAIN_KINDS
                .iter()
                .any(|k| chain == vm_chain(short_id, k))
        };
        let elems: Vec<_> = self
            .map_elements()
            .await?
            .into_iter()
            .filter(|c| ours(&c.chain))
            .collect();
        self.batch("remove orphan", removal(short_id, &elems))
            .await
            .map(drop)
    }

    async fn list_vm_chains(&self) -> Result<Vec<String>, FirewallError> {
        // Chains only: rules and elements are not read.
        let chains = self.dump("list", Kind::GetChain, Attrs::new()).await?;
        let ids: BTreeSet<String> = chains
            .iter()
            .filter(|c| {
                nfnl::find_attr(c, attr::CHAIN_TABLE)
                    .map(nfnl::attr_str)
                    .as_deref()
                    == Some(TABLE)
            })
            .filter_map(|c| nfnl::find_attr(c, attr::CHAIN_NAME).map(nfnl::attr_str))
            .filter_map(|n| vm_chain_short_id(&n))
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
    // Only the short id matters to an empty plan (removal by short id).
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
    let comment = comment(rules);
    if rules.vm_id.is_empty()
        || comment.len() > COMMENT_MAX
        || !rules
            .vm_id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"')
    {
        return invalid(
            "VM id",
            format!(
                "{:?}: must be printable ASCII without quotes, at most {} bytes",
                rules.vm_id,
                COMMENT_MAX - COMMENT_PREFIX.len()
            ),
        );
    }
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

/// The plan of an orphan known only by its short id: no rules, so only
/// the short id is used (and validated). Shared with the fake.
pub(crate) fn orphan(short_id: &str) -> VmRules {
    VmRules {
        short_id: short_id.to_owned(),
        vm_id: format!("orphan-{short_id}"),
        tap: String::new(),
        guest_ip: Ipv4Addr::UNSPECIFIED,
        nat_uplink: None,
        port_forwards: Vec::new(),
    }
}

/// The ownership mark of per-VM rules and elements: `hearth:vm:<id>`.
const COMMENT_PREFIX: &str = "hearth:vm:";

/// `hearth:vm:<id>`.
fn comment(rules: &VmRules) -> String {
    format!("{COMMENT_PREFIX}{}", rules.vm_id)
}

/// `vm-<short_id>-<kind>`.
fn vm_chain(short_id: &str, kind: &str) -> String {
    format!("vm-{short_id}-{kind}")
}

/// The short id in a per-VM chain's name, if it is one.
fn vm_chain_short_id(name: &str) -> Option<String> {
    let rest = name.strip_prefix("vm-")?;
    let id = VM_CHAIN_KINDS
        .iter()
        .find_map(|k| rest.strip_suffix(k)?.strip_suffix('-'))
        .unwrap_or(rest);
    (!id.is_empty()).then(|| id.to_owned())
}

/// One rule: its chain, its nft text (for descriptions) and expressions.
#[derive(Debug)]
struct PlannedRule {
    chain: String,
    text: String,
    exprs: Vec<Expr>,
}

/// One map element: `map[key] = jump chain`.
#[derive(Debug, Clone)]
struct Elem {
    map: &'static str,
    /// The key as the kernel stores it.
    key: Vec<u8>,
    key_text: String,
    chain: String,
}

/// What one VM puts into the table, derived from its plan alone.
#[derive(Debug)]
struct VmPlan {
    comment: String,
    chains: Vec<String>,
    rules: Vec<PlannedRule>,
    elems: Vec<Elem>,
}

impl VmPlan {
    fn new(r: &VmRules) -> Self {
        let mut plan = VmPlan {
            comment: comment(r),
            chains: Vec::new(),
            rules: Vec::new(),
            elems: Vec::new(),
        };
        if r.is_empty() {
            return plan;
        }
        let fwd = vm_chain(&r.short_id, "fwd");
        let post = vm_chain(&r.short_id, "post");
        let dnat = vm_chain(&r.short_id, "dnat");
        let (tap, ip) = (r.tap.as_str(), r.guest_ip);
        let mut rule = |chain: &str, text: String, exprs: Vec<Expr>| {
            plan.rules.push(PlannedRule {
                chain: chain.to_owned(),
                text,
                exprs,
            });
        };

        if let Some(up) = r.nat_uplink.as_deref() {
            rule(
                &post,
                format!("oifname {up} masquerade"),
                [Expr::ifname(META_OIFNAME, up), vec![Expr::Masq]].concat(),
            );
            rule(
                &fwd,
                format!("iifname {tap} oifname {up} accept"),
                [
                    Expr::ifname(META_IIFNAME, tap),
                    Expr::ifname(META_OIFNAME, up),
                    vec![Expr::Accept],
                ]
                .concat(),
            );
            rule(
                &fwd,
                format!("iifname {up} oifname {tap} ct state established,related accept"),
                [
                    Expr::ifname(META_IIFNAME, up),
                    Expr::ifname(META_OIFNAME, tap),
                    Expr::ct_any(CT_STATE, CT_ESTABLISHED | CT_RELATED),
                    vec![Expr::Accept],
                ]
                .concat(),
            );
        }
        for pf in &r.port_forwards {
            let (p, h, g) = (pf.proto, pf.host_port, pf.guest_port);
            let ps = p.as_str();
            rule(
                &dnat,
                format!("meta l4proto {ps} th dport {h} dnat to {ip}:{g}"),
                [
                    Expr::l4proto(p),
                    Expr::dport(h),
                    vec![
                        Expr::Imm {
                            dreg: REG_1,
                            data: ip.octets().to_vec(),
                        },
                        Expr::Imm {
                            dreg: REG_2,
                            data: g.to_be_bytes().to_vec(),
                        },
                        Expr::Dnat {
                            addr_reg: REG_1,
                            port_reg: REG_2,
                        },
                    ],
                ]
                .concat(),
            );
            rule(
                &fwd,
                format!(
                    "oifname {tap} ip daddr {ip} meta l4proto {ps} th dport {g} ct status dnat accept"
                ),
                [
                    Expr::ifname(META_OIFNAME, tap),
                    vec![
                        Expr::Payload {
                            base: BASE_NETWORK,
                            offset: 16,
                            len: 4,
                            dreg: REG_1,
                        },
                        Expr::Cmp {
                            op: CMP_EQ,
                            data: ip.octets().to_vec(),
                        },
                    ],
                    Expr::l4proto(p),
                    Expr::dport(g),
                    Expr::ct_any(CT_STATUS, IPS_DST_NAT),
                    vec![Expr::Accept],
                ]
                .concat(),
            );
        }
        if !r.port_forwards.is_empty() {
            rule(
                &fwd,
                format!("iifname {tap} ct status dnat accept"),
                [
                    Expr::ifname(META_IIFNAME, tap),
                    Expr::ct_any(CT_STATUS, IPS_DST_NAT),
                    vec![Expr::Accept],
                ]
                .concat(),
            );
        }

        plan.chains.push(fwd.clone());
        for map in [FWD_IIF, FWD_OIF] {
            plan.elems.push(Elem {
                map,
                key: ifname_bytes(tap),
                key_text: tap.to_owned(),
                chain: fwd.clone(),
            });
        }
        if r.nat_uplink.is_some() {
            plan.chains.push(post.clone());
            plan.elems.push(Elem {
                map: NAT_SADDR,
                key: ip.octets().to_vec(),
                key_text: ip.to_string(),
                chain: post,
            });
        }
        if !r.port_forwards.is_empty() {
            plan.chains.push(dnat.clone());
        }
        for pf in &r.port_forwards {
            let key = port_key(pf.proto, pf.host_port);
            plan.elems.push(Elem {
                map: DNAT_PORTS,
                key_text: key_text(DNAT_PORTS, &key),
                key,
                chain: dnat.clone(),
            });
        }
        plan
    }

    /// Chains (added and flushed, so a re-apply replaces), rules (echoed,
    /// for their handles), elements.
    fn apply_msgs(&self) -> Vec<Msg> {
        let mut msgs = Vec::new();
        for chain in &self.chains {
            msgs.push(add_chain(chain));
            msgs.push(flush_chain(chain));
        }
        for r in &self.rules {
            msgs.push(add_rule(&r.chain, &r.exprs, Some(&self.comment)).echo());
        }
        for e in &self.elems {
            msgs.push(e.add(Some(&self.comment)));
        }
        msgs
    }

    /// `chain …`, `rule [handle N] in …: …`, `element map[key]: jump …`.
    fn describe(&self, handles: Option<&[u64]>) -> Vec<String> {
        let chains = self.chains.iter().map(|c| format!("chain {c}"));
        let rules =
            self.rules
                .iter()
                .enumerate()
                .map(|(i, r)| match handles.and_then(|h| h.get(i)) {
                    Some(h) => format!("rule handle {h} in {}: {}", r.chain, r.text),
                    None => format!("rule in {}: {}", r.chain, r.text),
                });
        let elems = self
            .elems
            .iter()
            .map(|e| format!("element {}[{}]: jump {}", e.map, e.key_text, e.chain));
        chains.chain(rules).chain(elems).collect()
    }
}

impl Elem {
    /// `add element map { key [comment …] : jump chain }`.
    fn add(&self, comment: Option<&str>) -> Msg {
        let chain = self.chain.clone();
        let comment = comment.map(udata_comment);
        let attrs = self.elem_attrs(|a| {
            a.nest(attr::SET_ELEM_DATA, |d| {
                d.nest(attr::DATA_VERDICT, |v| {
                    v.be32(attr::VERDICT_CODE, NFT_JUMP as u32)
                        .str(attr::VERDICT_CHAIN, &chain);
                });
            });
            if let Some(c) = &comment {
                a.bytes(attr::SET_ELEM_USERDATA, c);
            }
        });
        Msg::add(
            Kind::NewSetElem,
            format!("add element {}[{}]", self.map, self.key_text),
            attrs,
        )
    }

    /// `delete element map { key }`.
    fn delete(&self) -> Msg {
        Msg::del(
            Kind::DelSetElem,
            format!("delete element {}[{}]", self.map, self.key_text),
            self.elem_attrs(|_| {}),
        )
    }

    fn elem_attrs(&self, more: impl FnOnce(&mut Attrs)) -> Attrs {
        let mut a = Attrs::new();
        a.str(attr::SET_ELEM_LIST_TABLE, TABLE)
            .str(attr::SET_ELEM_LIST_SET, self.map)
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

/// The removal transaction for VM `short_id`: add-then-delete of `elems`
/// and of all its chains (module doc).
fn removal(short_id: &str, elems: &[Elem]) -> Vec<Msg> {
    let chains: Vec<String> = VM_CHAIN_KINDS
        .iter()
        .map(|k| vm_chain(short_id, k))
        .collect();
    let mut msgs: Vec<Msg> = chains.iter().map(|c| add_chain(c)).collect();
    msgs.extend(elems.iter().map(|e| e.add(None)));
    msgs.extend(elems.iter().map(Elem::delete));
    for chain in &chains {
        msgs.push(flush_chain(chain));
        msgs.push(Msg::del(
            Kind::DelChain,
            format!("delete chain {chain}"),
            chain_attrs(chain),
        ));
    }
    msgs
}

/// The base transaction: table, base chains and maps (`add` is a no-op
/// when they exist), then each base chain flushed and its dispatch rules
/// added again (module doc, "Base objects").
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
    // Key types and nft's userdata (key byte order, and for the
    // concatenation its fields) exactly as nft 1.0.6 writes them for
    // `type ifname : verdict` etc., so `nft list` prints these maps as its
    // own.
    const UD_HOST: &[u8] = &[0, 4, 1, 0, 0, 0, 1, 4, 0, 0, 0, 0, 6, 4, 0, 0, 0, 0];
    const UD_BIG: &[u8] = &[0, 4, 2, 0, 0, 0, 1, 4, 0, 0, 0, 0, 6, 4, 0, 0, 0, 0];
    const UD_CONCAT: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0,
    ];
    for (id, (name, key_type, key_len, udata)) in [
        (FWD_IIF, TYPE_IFNAME, IFNAMSIZ as u32, UD_HOST),
        (FWD_OIF, TYPE_IFNAME, IFNAMSIZ as u32, UD_HOST),
        (NAT_SADDR, TYPE_IPADDR, 4, UD_BIG),
        (
            DNAT_PORTS,
            (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE,
            8,
            UD_CONCAT,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut a = Attrs::new();
        a.str(attr::SET_TABLE, TABLE)
            .str(attr::SET_NAME, name)
            .be32(attr::SET_FLAGS, SET_MAP)
            .be32(attr::SET_KEY_TYPE, key_type)
            .be32(attr::SET_KEY_LEN, key_len)
            .be32(attr::SET_DATA_TYPE, DATA_VERDICT)
            .be32(attr::SET_DATA_LEN, 0)
            .be32(attr::SET_ID, id as u32 + 1)
            .bytes(attr::SET_USERDATA, udata);
        msgs.push(Msg::add(Kind::NewSet, format!("add map {name}"), a));
    }
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
            Expr::Meta {
                key: META_L4PROTO,
                dreg: REG_1,
            },
            Expr::Payload {
                base: BASE_TRANSPORT,
                offset: 2,
                len: 2,
                dreg: REG32_01,
            },
            Expr::Vmap { map: DNAT_PORTS },
        ]
    };
    let base_rules: [(&str, Vec<Vec<Expr>>); 4] = [
        (
            FORWARD,
            vec![
                vec![
                    Expr::Meta {
                        key: META_IIFNAME,
                        dreg: REG_1,
                    },
                    Expr::Vmap { map: FWD_IIF },
                ],
                vec![
                    Expr::Meta {
                        key: META_OIFNAME,
                        dreg: REG_1,
                    },
                    Expr::Vmap { map: FWD_OIF },
                ],
            ],
        ),
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
                    Expr::Vmap { map: NAT_SADDR },
                ],
            ],
        ),
        (PREROUTING, vec![dnat_dispatch()]),
        (OUTPUT, vec![dnat_dispatch()]),
    ];
    for (chain, rules) in base_rules {
        msgs.push(flush_chain(chain));
        for exprs in rules {
            msgs.push(add_rule(chain, &exprs, None));
        }
    }
    msgs
}

fn chain_attrs(name: &str) -> Attrs {
    let mut a = Attrs::new();
    a.str(attr::CHAIN_TABLE, TABLE).str(attr::CHAIN_NAME, name);
    a
}

fn add_chain(name: &str) -> Msg {
    Msg::add(
        Kind::NewChain,
        format!("add chain {name}"),
        chain_attrs(name),
    )
}

/// `flush chain`: a rule delete naming the chain and no rule.
fn flush_chain(name: &str) -> Msg {
    let mut a = Attrs::new();
    a.str(attr::RULE_TABLE, TABLE).str(attr::RULE_CHAIN, name);
    Msg::del(Kind::DelRule, format!("flush chain {name}"), a)
}

fn add_rule(chain: &str, exprs: &[Expr], comment: Option<&str>) -> Msg {
    let mut a = Attrs::new();
    a.str(attr::RULE_TABLE, TABLE)
        .str(attr::RULE_CHAIN, chain)
        .nest(attr::RULE_EXPRESSIONS, |l| {
            for e in exprs {
                e.encode(l);
            }
        });
    if let Some(c) = comment {
        a.bytes(attr::RULE_USERDATA, &udata_comment(c));
    }
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

/// `proto . port` as a concatenated key: each field in its own 4-byte
/// register, the port big-endian.
fn port_key(p: Proto, port: u16) -> Vec<u8> {
    let [hi, lo] = port.to_be_bytes();
    vec![proto_number(p), 0, 0, 0, hi, lo, 0, 0]
}

/// A map key as nft would print it.
fn key_text(map: &str, key: &[u8]) -> String {
    match (map, key) {
        (FWD_IIF | FWD_OIF, _) => nfnl::attr_str(key),
        (NAT_SADDR, &[a, b, c, d]) => Ipv4Addr::new(a, b, c, d).to_string(),
        (DNAT_PORTS, &[p, _, _, _, hi, lo, _, _]) => {
            let proto = match p {
                6 => "tcp".to_owned(),
                17 => "udp".to_owned(),
                n => n.to_string(),
            };
            format!("{proto} . {}", u16::from_be_bytes([hi, lo]))
        }
        _ => format!("{key:02x?}"),
    }
}

// Kernel constants (linux/netfilter.h, linux/netfilter/nf_tables.h, nft's
// datatype numbers).
const NF_ACCEPT: u32 = 1;
const NFT_JUMP: i32 = -3;
const HOOK_PRE_ROUTING: u32 = 0;
const HOOK_FORWARD: u32 = 2;
const HOOK_LOCAL_OUT: u32 = 3;
const HOOK_POST_ROUTING: u32 = 4;
const SET_MAP: u32 = 0x8;
const DATA_VERDICT: u32 = 0xffff_ff00;
const TYPE_IPADDR: u32 = 7;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_IFNAME: u32 = 41;
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;
/// The second 32-bit register: a concatenation's second field.
const REG32_01: u32 = 9;
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

/// The nf_tables expressions hearth's rules use, registers fixed where
/// the rules need nothing else (compare and bitwise work on register 1).
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
    /// Lookup of register 1 in a verdict map.
    Vmap {
        map: &'static str,
    },
    Imm {
        dreg: u32,
        data: Vec<u8>,
    },
    Accept,
    Dnat {
        addr_reg: u32,
        port_reg: u32,
    },
    Masq,
}

impl Expr {
    /// `iifname`/`oifname` equals `name`.
    fn ifname(key: u32, name: &str) -> Vec<Expr> {
        vec![
            Expr::Meta { key, dreg: REG_1 },
            Expr::Cmp {
                op: CMP_EQ,
                data: ifname_bytes(name),
            },
        ]
    }

    /// `meta l4proto p`.
    fn l4proto(p: Proto) -> Vec<Expr> {
        vec![
            Expr::Meta {
                key: META_L4PROTO,
                dreg: REG_1,
            },
            Expr::Cmp {
                op: CMP_EQ,
                data: vec![proto_number(p)],
            },
        ]
    }

    /// `th dport port`.
    fn dport(port: u16) -> Vec<Expr> {
        vec![
            Expr::Payload {
                base: BASE_TRANSPORT,
                offset: 2,
                len: 2,
                dreg: REG_1,
            },
            Expr::Cmp {
                op: CMP_EQ,
                data: port.to_be_bytes().to_vec(),
            },
        ]
    }

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
            Expr::Vmap { .. } => "lookup",
            Expr::Imm { .. } | Expr::Accept => "immediate",
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
            Expr::Vmap { map } => {
                a.str(1, map).be32(2, REG_1).be32(3, REG_VERDICT);
            }
            Expr::Imm { dreg, data } => {
                a.be32(1, *dreg).nest(2, |d| {
                    d.bytes(attr::DATA_VALUE, data);
                });
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
    use std::net::Ipv4Addr;
    use std::process::Command as StdCommand;

    use serde_json::Value;

    use super::*;
    use crate::host::firewall::PortForward;
    use crate::host::testns::in_netns;

    /// Runs `f` on a current-thread runtime inside a fresh network
    /// namespace; the `nft` children inherit that thread's namespace.
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

    /// What `nft -j list table ip hearth` shows, in a comparable form.
    #[derive(Debug, Default)]
    struct Table {
        /// name → (type, hook, prio, policy) for base chains, None otherwise.
        chains: BTreeMap<String, Option<(String, String, i64, String)>>,
        /// (chain, comment, expression) of every rule.
        rules: Vec<(String, Option<String>, Value)>,
        /// (map, key as JSON, target chain) of every element.
        elems: BTreeSet<(String, String, String)>,
    }

    fn table() -> Option<Table> {
        let out = StdCommand::new("nft")
            .args(["-j", "list", "table", "ip", "hearth"])
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        let mut t = Table::default();
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        for o in doc["nftables"].as_array().unwrap() {
            if let Some(c) = o.get("chain") {
                let base = c.get("hook").map(|h| {
                    (
                        c["type"].as_str().unwrap().to_owned(),
                        h.as_str().unwrap().to_owned(),
                        c["prio"].as_i64().unwrap(),
                        c["policy"].as_str().unwrap().to_owned(),
                    )
                });
                t.chains
                    .insert(c["name"].as_str().unwrap().to_owned(), base);
            } else if let Some(r) = o.get("rule") {
                t.rules.push((
                    r["chain"].as_str().unwrap().to_owned(),
                    r.get("comment").map(|c| c.as_str().unwrap().to_owned()),
                    r["expr"].clone(),
                ));
            } else if let Some(m) = o.get("map") {
                for pair in m
                    .get("elem")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let key = pair[0].get("elem").map(|e| &e["val"]).unwrap_or(&pair[0]);
                    t.elems.insert((
                        m["name"].as_str().unwrap().to_owned(),
                        key.to_string(),
                        pair[1]["jump"]["target"].as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
        Some(t)
    }

    impl Table {
        fn vm_chains(&self) -> Vec<&str> {
            self.chains
                .keys()
                .filter(|c| c.starts_with("vm-"))
                .map(String::as_str)
                .collect()
        }

        fn rules_in(&self, chain: &str) -> usize {
            self.rules.iter().filter(|r| r.0 == chain).count()
        }

        fn elems_of(&self, short_id: &str) -> Vec<(String, String)> {
            let prefix = format!("vm-{short_id}-");
            self.elems
                .iter()
                .filter(|e| e.2.starts_with(&prefix))
                .map(|e| (e.0.clone(), e.1.clone()))
                .collect()
        }

        /// The base chains, each hooked, with their dispatch rules once.
        fn assert_base(&self) {
            let base = |t: &str, h: &str, p: i64| Some((t.into(), h.into(), p, "accept".into()));
            assert_eq!(self.chains["prerouting"], base("nat", "prerouting", -100));
            assert_eq!(self.chains["output"], base("nat", "output", -100));
            assert_eq!(self.chains["postrouting"], base("nat", "postrouting", 100));
            assert_eq!(self.chains["forward"], base("filter", "forward", 0));
            assert_eq!(self.rules_in("prerouting"), 1);
            assert_eq!(self.rules_in("output"), 1);
            assert_eq!(self.rules_in("postrouting"), 2);
            assert_eq!(self.rules_in("forward"), 2);
        }
    }

    #[test]
    fn apply_installs_exactly_the_vms_chains_rules_and_elements() {
        in_ns("fw-apply", || async {
            let fw = Nft::new();
            let a = vm("ab12", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]);
            let installed = fw.apply(&a).await.unwrap();
            // Handles are the kernel's (apply_reports_rule_handles).
            let installed: Vec<String> = installed
                .iter()
                .map(|d| match d.strip_prefix("rule handle ") {
                    Some(rest) => format!("rule {}", rest.split_once(' ').unwrap().1),
                    None => d.clone(),
                })
                .collect();
            assert_eq!(
                installed,
                [
                    "chain vm-ab12-fwd",
                    "chain vm-ab12-post",
                    "chain vm-ab12-dnat",
                    "rule in vm-ab12-post: oifname eth0 masquerade",
                    "rule in vm-ab12-fwd: iifname hth1 oifname eth0 accept",
                    "rule in vm-ab12-fwd: iifname eth0 oifname hth1 ct state established,related accept",
                    "rule in vm-ab12-dnat: meta l4proto tcp th dport 8080 dnat to 172.16.0.2:80",
                    "rule in vm-ab12-fwd: oifname hth1 ip daddr 172.16.0.2 meta l4proto tcp th dport 80 ct status dnat accept",
                    "rule in vm-ab12-fwd: iifname hth1 ct status dnat accept",
                    "element fwd_iif[hth1]: jump vm-ab12-fwd",
                    "element fwd_oif[hth1]: jump vm-ab12-fwd",
                    "element nat_saddr[172.16.0.2]: jump vm-ab12-post",
                    "element dnat_ports[tcp . 8080]: jump vm-ab12-dnat",
                ]
            );
            eprintln!("{}", nft(&["list", "table", "ip", "hearth"]));
            let t = table().unwrap();
            t.assert_base();
            assert_eq!(
                t.vm_chains(),
                ["vm-ab12-dnat", "vm-ab12-fwd", "vm-ab12-post"]
            );
            assert_eq!(t.rules_in("vm-ab12-fwd"), 4);
            assert_eq!(t.rules_in("vm-ab12-post"), 1);
            assert_eq!(t.rules_in("vm-ab12-dnat"), 1);
            for (chain, comment, _) in &t.rules {
                let want = chain
                    .starts_with("vm-")
                    .then(|| "hearth:vm:0190-ab12".to_owned());
                assert_eq!(*comment, want, "rule in {chain}");
            }
            assert_eq!(
                t.elems_of("ab12"),
                [
                    ("dnat_ports".into(), r#"{"concat":["tcp",8080]}"#.into()),
                    ("fwd_iif".into(), r#""hth1""#.into()),
                    ("fwd_oif".into(), r#""hth1""#.into()),
                    ("nat_saddr".into(), r#""172.16.0.2""#.into()),
                ]
            );
            assert_eq!(t.elems.len(), 4);
            // Element comments carry the mark too.
            let text = nft(&["list", "map", "ip", "hearth", "fwd_iif"]);
            assert!(
                text.contains(r#""hth1" comment "hearth:vm:0190-ab12""#),
                "{text}"
            );
            assert_eq!(fw.list_vm_chains().await.unwrap(), ["ab12"]);
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
            assert_eq!(fw.list_vm_chains().await.unwrap(), Vec::<String>::new());

            fw.apply(&a).await.unwrap();
            let only_a = table().unwrap();
            fw.apply(&b).await.unwrap();
            fw.apply(&c).await.unwrap();
            let t = table().unwrap();
            t.assert_base();
            assert_eq!(t.elems_of("aaa"), only_a.elems_of("aaa"));
            assert_eq!(t.rules_in("vm-aaa-fwd"), only_a.rules_in("vm-aaa-fwd"));
            assert_eq!(t.vm_chains().len(), 3 + 3 + 2, "{:?}", t.vm_chains());
            assert_eq!(fw.list_vm_chains().await.unwrap(), ["aaa", "bbb", "ccc"]);

            fw.remove(&b).await.unwrap();
            let t = table().unwrap();
            t.assert_base();
            assert!(t.elems_of("bbb").is_empty());
            assert_eq!(t.elems_of("aaa"), only_a.elems_of("aaa"));
            assert_eq!(t.elems_of("ccc").len(), 3);
            assert_eq!(fw.list_vm_chains().await.unwrap(), ["aaa", "ccc"]);

            fw.remove(&b).await.unwrap();
            fw.remove(&vm("never", "hth9", 99, true, &[(1, Proto::Tcp, 1)]))
                .await
                .unwrap();
            fw.remove(&a).await.unwrap();
            fw.remove(&c).await.unwrap();
            fw.remove(&c).await.unwrap();
            let t = table().unwrap();
            t.assert_base();
            assert!(t.vm_chains().is_empty(), "{:?}", t.vm_chains());
            assert!(t.elems.is_empty(), "{:?}", t.elems);
            assert!(!nft(&["list", "ruleset"]).contains("hearth:vm:"));
        });
    }

    #[test]
    fn base_objects_are_made_once_and_a_reapply_replaces() {
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
            assert_eq!(t.rules_in("vm-v0-fwd"), 2, "a re-apply doubled the rules");
            assert_eq!(t.rules_in("vm-v0-post"), 1);
            assert_eq!(t.elems.len(), 5 * 3);

            // Deleted behind our back: the next transaction rebuilds it.
            nft(&["delete", "table", "ip", "hearth"]);
            assert_eq!(fw.list_vm_chains().await.unwrap(), Vec::<String>::new());
            fw.remove(&vms[0]).await.unwrap();
            fw.apply(&vms[1]).await.unwrap();
            let t = table().unwrap();
            t.assert_base();
            assert_eq!(t.vm_chains(), ["vm-v1-fwd", "vm-v1-post"]);

            // A VM with no rules gets nothing (and no nft call).
            let mut empty = vm("e", "hth7", 30, false, &[]);
            empty.port_forwards.clear();
            assert!(fw.apply(&empty).await.unwrap().is_empty());
            fw.remove(&empty).await.unwrap();
            assert_eq!(fw.list_vm_chains().await.unwrap(), ["v1"]);
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
            // The first transactions race to create the table.
            let applied = futures_util::future::join_all(vms.iter().map(|v| fw.apply(v))).await;
            assert!(applied.iter().all(Result::is_ok), "{applied:?}");
            let t = table().unwrap();
            t.assert_base();
            assert_eq!(t.vm_chains().len(), 16 * 3);
            assert_eq!(t.elems.len(), 16 * 4);
            let removed = futures_util::future::join_all(vms.iter().map(|v| fw.remove(v))).await;
            assert!(removed.iter().all(Result::is_ok), "{removed:?}");
            assert_eq!(fw.list_vm_chains().await.unwrap(), Vec::<String>::new());
        });
    }

    #[test]
    fn a_refusal_in_a_combined_batch_fails_only_its_own_vm() {
        in_ns("fw-group", || async {
            let fw = Nft::new();
            fw.apply(&vm("own", "hth0", 2, false, &[(8080, Proto::Tcp, 80)]))
                .await
                .unwrap();
            // Queued together, so sent as one batch first; one of them
            // clashes on 8080/tcp.
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
            let applied = futures_util::future::join_all(vms.iter().map(|v| fw.apply(v))).await;
            for (v, r) in vms.iter().zip(&applied) {
                assert_eq!(r.is_err(), v.short_id == "g4", "{}: {r:?}", v.short_id);
            }
            let mut want: Vec<String> = (1..9)
                .filter(|&i| i != 4)
                .map(|i| format!("g{i}"))
                .collect();
            want.push("own".into());
            assert_eq!(fw.list_vm_chains().await.unwrap(), want);
            let t = table().unwrap();
            t.assert_base();
            assert!(t.elems_of("g4").is_empty());
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
            // and with it the chains, rules and other elements of `b`.
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
                        ("apply", "add element dnat_ports[tcp . 8080]")
                    );
                    assert!(
                        matches!(source.raw_os_error(), Some(libc::EEXIST | libc::EBUSY)),
                        "{source}"
                    );
                    assert!(err.to_string().contains("held by another VM"), "{err}");
                }
                other => panic!("{other:?}"),
            }
            let after = table().unwrap();
            assert_eq!(after.vm_chains(), before.vm_chains());
            assert_eq!(after.elems, before.elems);
            assert_eq!(after.rules.len(), before.rules.len());
            assert_eq!(fw.list_vm_chains().await.unwrap(), ["aaa"]);

            // A name hearth refuses fails before any kernel call.
            let mut c = vm("ccc", "hth3", 10, true, &[]);
            c.nat_uplink = Some("a\"b".into());
            let err = fw.apply(&c).await.unwrap_err();
            assert!(matches!(err, FirewallError::Invalid { .. }), "{err:?}");
            assert_eq!(fw.list_vm_chains().await.unwrap(), ["aaa"]);
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
            // A late retry of a's removal must succeed and leave b alone.
            fw.remove(&a).await.unwrap();
            let after = table().unwrap();
            assert_eq!(after.elems, before.elems);
            assert_eq!(after.vm_chains(), before.vm_chains());
            assert_eq!(after.rules.len(), before.rules.len());
            // A plan that names b's port (tcp) but not its own (udp): b's
            // element stays, a2's goes with its chains.
            let a2 = vm("aa2", "hth5", 20, true, &[(8080, Proto::Udp, 80)]);
            fw.apply(&a2).await.unwrap();
            let mut a2_then = a2.clone();
            a2_then.port_forwards[0].proto = Proto::Tcp;
            fw.remove(&a2_then).await.unwrap();
            let t = table().unwrap();
            assert_eq!(t.elems_of("bbb"), before.elems_of("bbb"));
            assert!(t.elems_of("aa2").is_empty());
            assert_eq!(fw.list_vm_chains().await.unwrap(), ["bbb"]);
        });
    }

    #[test]
    fn an_orphan_is_removed_by_its_short_id_alone() {
        in_ns("fw-orphan", || async {
            let fw = Nft::new();
            let x = vm("xxx", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]);
            let y = vm("yyy", "hth2", 6, true, &[(8081, Proto::Tcp, 80)]);
            fw.apply(&x).await.unwrap();
            fw.apply(&y).await.unwrap();
            // All a sweep knows is the chain name.
            fw.remove_orphan("xxx").await.unwrap();
            fw.remove_orphan("xxx").await.unwrap();
            fw.remove_orphan("never").await.unwrap();
            let err = fw.remove_orphan("a b").await.unwrap_err();
            assert!(matches!(err, FirewallError::Invalid { .. }), "{err:?}");
            let t = table().unwrap();
            assert!(t.elems_of("xxx").is_empty());
            assert_eq!(t.elems_of("yyy").len(), 4);
            assert_eq!(fw.list_vm_chains().await.unwrap(), ["yyy"]);
        });
    }

    #[test]
    fn apply_reports_rule_handles() {
        in_ns("fw-echo", || async {
            let fw = Nft::new();
            let a = vm("aaa", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]);
            let installed = fw.apply(&a).await.unwrap();
            let rules: Vec<&String> = installed.iter().filter(|d| d.starts_with("rule")).collect();
            assert_eq!(rules.len(), 6);
            for r in rules {
                assert!(r.starts_with("rule handle "), "{r}");
            }
            // The handles are the kernel's.
            let listed = nft(&["-a", "list", "chain", "ip", "hearth", "vm-aaa-post"]);
            let handle = installed[3]
                .strip_prefix("rule handle ")
                .and_then(|r| r.split(' ').next())
                .unwrap();
            assert!(listed.contains(&format!("# handle {handle}")), "{listed}");
        });
    }

    #[test]
    fn chain_names_give_short_ids() {
        assert_eq!(vm_chain_short_id("vm-ab12-fwd").as_deref(), Some("ab12"));
        assert_eq!(vm_chain_short_id("vm-a-b-post").as_deref(), Some("a-b"));
        assert_eq!(vm_chain_short_id("vm-ab12").as_deref(), Some("ab12"));
        assert_eq!(vm_chain_short_id("forward"), None);
        assert_eq!(vm_chain_short_id("vm-"), None);
    }

    /// `nft list table ip hearth` without handles, in the current namespace.
    fn listing() -> String {
        nft(&["list", "table", "ip", "hearth"])
    }

    #[test]
    fn the_ruleset_reads_back_as_nft_itself_would_write_it() {
        // What hearth sends over netlink, listed by nft...
        let ours = in_ns("fw-same-a", || async {
            let fw = Nft::new();
            fw.apply(&vm("ab12", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]))
                .await
                .unwrap();
            fw.apply(&vm("cd34", "hth2", 6, false, &[(5353, Proto::Udp, 53)]))
                .await
                .unwrap();
            listing()
        })
        .unwrap();
        // ...is what nft makes of the same ruleset written in its language.
        let theirs = in_ns("fw-same-b", || async {
            let script = r#"
add table ip hearth
add chain ip hearth prerouting { type nat hook prerouting priority -100; policy accept; }
add chain ip hearth output { type nat hook output priority -100; policy accept; }
add chain ip hearth postrouting { type nat hook postrouting priority 100; policy accept; }
add chain ip hearth forward { type filter hook forward priority 0; policy accept; }
add map ip hearth fwd_iif { type ifname : verdict; }
add map ip hearth fwd_oif { type ifname : verdict; }
add map ip hearth nat_saddr { type ipv4_addr : verdict; }
add map ip hearth dnat_ports { type inet_proto . inet_service : verdict; }
add rule ip hearth forward iifname vmap @fwd_iif
add rule ip hearth forward oifname vmap @fwd_oif
add rule ip hearth postrouting ip saddr 127.0.0.0/8 ct status dnat masquerade
add rule ip hearth postrouting ip saddr vmap @nat_saddr
add rule ip hearth prerouting fib daddr type local meta l4proto . th dport vmap @dnat_ports
add rule ip hearth output fib daddr type local meta l4proto . th dport vmap @dnat_ports
add chain ip hearth vm-ab12-fwd
add chain ip hearth vm-ab12-post
add chain ip hearth vm-ab12-dnat
add rule ip hearth vm-ab12-post oifname "eth0" masquerade comment "hearth:vm:0190-ab12"
add rule ip hearth vm-ab12-fwd iifname "hth1" oifname "eth0" accept comment "hearth:vm:0190-ab12"
add rule ip hearth vm-ab12-fwd iifname "eth0" oifname "hth1" ct state established,related accept comment "hearth:vm:0190-ab12"
add rule ip hearth vm-ab12-dnat meta l4proto tcp th dport 8080 dnat to 172.16.0.2:80 comment "hearth:vm:0190-ab12"
add rule ip hearth vm-ab12-fwd oifname "hth1" ip daddr 172.16.0.2 meta l4proto tcp th dport 80 ct status dnat accept comment "hearth:vm:0190-ab12"
add rule ip hearth vm-ab12-fwd iifname "hth1" ct status dnat accept comment "hearth:vm:0190-ab12"
add element ip hearth fwd_iif { "hth1" comment "hearth:vm:0190-ab12" : jump vm-ab12-fwd }
add element ip hearth fwd_oif { "hth1" comment "hearth:vm:0190-ab12" : jump vm-ab12-fwd }
add element ip hearth nat_saddr { 172.16.0.2 comment "hearth:vm:0190-ab12" : jump vm-ab12-post }
add element ip hearth dnat_ports { tcp . 8080 comment "hearth:vm:0190-ab12" : jump vm-ab12-dnat }
add chain ip hearth vm-cd34-fwd
add chain ip hearth vm-cd34-dnat
add rule ip hearth vm-cd34-dnat meta l4proto udp th dport 5353 dnat to 172.16.0.6:53 comment "hearth:vm:0190-cd34"
add rule ip hearth vm-cd34-fwd oifname "hth2" ip daddr 172.16.0.6 meta l4proto udp th dport 53 ct status dnat accept comment "hearth:vm:0190-cd34"
add rule ip hearth vm-cd34-fwd iifname "hth2" ct status dnat accept comment "hearth:vm:0190-cd34"
add element ip hearth fwd_iif { "hth2" comment "hearth:vm:0190-cd34" : jump vm-cd34-fwd }
add element ip hearth fwd_oif { "hth2" comment "hearth:vm:0190-cd34" : jump vm-cd34-fwd }
add element ip hearth dnat_ports { udp . 5353 comment "hearth:vm:0190-cd34" : jump vm-cd34-dnat }
"#;
            let mut child = StdCommand::new("nft")
                .args(["-f", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write as _;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success());
            listing()
        })
        .unwrap();
        assert_eq!(ours, theirs);
        // And nft's debug view of the expressions (registers, lengths) is
        // the same too, not just its pretty-printing.
        let debug = |tag: &'static str, ours: bool| {
            in_ns(tag, move || async move {
                if ours {
                    Nft::new()
                        .apply(&vm("ab12", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]))
                        .await
                        .unwrap();
                } else {
                    let fw = Nft::new();
                    fw.apply(&vm("ab12", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]))
                        .await
                        .unwrap();
                    // Re-add the VM's rules through nft: same text, nft's encoding.
                    let rules = nft(&["-s", "list", "table", "ip", "hearth"]);
                    nft(&["flush", "ruleset"]);
                    let mut child = StdCommand::new("nft")
                        .args(["-f", "-"])
                        .stdin(std::process::Stdio::piped())
                        .spawn()
                        .unwrap();
                    use std::io::Write as _;
                    child
                        .stdin
                        .take()
                        .unwrap()
                        .write_all(rules.as_bytes())
                        .unwrap();
                    assert!(child.wait().unwrap().success());
                }
                nft(&["--debug=netlink", "list", "table", "ip", "hearth"])
            })
            .unwrap()
        };
        // Rule handles (after the chain name) differ: the order of creation did.
        let strip = |text: String| -> String {
            text.lines()
                .map(|l| match l.strip_prefix("ip hearth ") {
                    Some(rest) => rest.split(' ').next().unwrap().to_owned(),
                    None => l.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            strip(debug("fw-same-c", true)),
            strip(debug("fw-same-d", false))
        );
    }

    #[test]
    fn removal_adds_before_it_deletes() {
        let plan = VmPlan::new(&vm("aaa", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]));
        let ops: Vec<String> = removal("aaa", &plan.elems)
            .iter()
            .map(|m| m.what.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        let mut want = vec!["add chain"; 3];
        want.extend(["add element"; 4]);
        want.extend(["delete element"; 4]);
        want.extend(["flush chain", "delete chain"].repeat(3));
        assert_eq!(ops, want);
    }
}
