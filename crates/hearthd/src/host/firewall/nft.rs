//! [`Firewall`] through the `nft` binary: every call is ONE JSON document fed
//! to ONE `nft -j -f -`, which the kernel commits as one transaction —
//! all of it or none of it.
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
//! # Base objects without a cache
//!
//! Every transaction starts with the same head: `add` table, base chains
//! and maps (no-ops when present), then `flush` each base chain and `add`
//! its few dispatch rules again. `add rule` alone is not idempotent (it
//! appends a duplicate); flush-and-re-add inside one transaction is, and
//! it is atomic (packets see the old or the new chain, never an empty
//! one). No "base exists" flag is cached, so nothing goes stale when the
//! table is deleted behind our back or two VMs create it concurrently
//! (the kernel serialises transactions; each leaves exactly one copy).
//! It costs six rules per transaction, however many VMs there are.
//!
//! # Apply
//!
//! Head, then for each of the VM's chains `add` + `flush` (so applying
//! the same plan again replaces its rules instead of doubling them), its
//! rules, and its map elements. A map key held by another VM (a host port
//! already forwarded) makes the kernel refuse the element (EEXIST), and
//! with it the whole transaction: nothing of the VM is left.
//!
//! # Idempotent removal without reading (nft 1.0.6 has no `destroy`)
//!
//! One transaction: head (creates table and maps if they are gone), then
//! `add chain` for all three of the VM's chains (creates them empty if
//! absent), `add element` for each key the plan uses (a no-op when the
//! same key → same verdict is present; comments are not compared), then
//! `delete element` for each key, `flush chain` and `delete chain` for each
//! chain. Whatever was there or not, the transaction ends with none of it,
//! so removing twice, or removing what was never applied, succeeds.
//!
//! Two cases need more, and only they read the ruleset. A key the VM once
//! had may since have been given to another VM (its port, address or tap
//! reused after an earlier, successful removal): adding it back with our
//! verdict clashes (EEXIST), and deleting it by key would remove the other
//! VM's element. And an element the plan does not name may still point at
//! the VM's chains (a plan edited since its apply): deleting the chain is
//! then refused (EBUSY). So when the removal fails, the maps are read
//! (`nft -j list maps ip`) and it is retried once without the keys that
//! point at other VMs' chains and with every element that points at ours.
//! The retry still adds-then-deletes each key, so a race cannot make it
//! delete a foreign element: it fails instead.
//!
//! [`Firewall::remove_orphan`] (a sweep's removal of chains the store
//! knows nothing about) has no plan at all: it reads the maps first and
//! removes, in the same kind of transaction, every element that points at
//! the VM's chains, then the chains.
//!
//! # Cost
//!
//! Measured on nft 1.0.6 (`bench_flat_cost_with_many_vms`, release build):
//! apply and remove each take about 18 ms with 0 or 100 other VMs and
//! about 30 ms with 1000. The fixed part is the process plus an RCU grace
//! period the kernel waits out when `nft` closes its netlink socket after
//! a transaction that changed anything. The growth is linear: nft 1.0.6
//! fetches a cache before a transaction — for these documents tables,
//! chains and sets, not rules or elements — so 3 chains per VM cost about
//! 10 ms per 1000 VMs in nft, and the kernel's commit itself grows by
//! about 3 ms per 1000 VMs (it revalidates the chains reachable through
//! the jump maps). Talking netlink from a long-lived socket would remove
//! the process, the socket-close wait and nft's cache, not the kernel part.
//! `--echo` (to learn rule handles) makes nft fetch the whole ruleset,
//! rules and elements included: about 180 ms per apply at 1000 VMs, so it
//! is off unless [`Nft::with_handles`] asks for it. `list table` is avoided
//! for the same reason; [`Firewall::list_vm_chains`] uses `list chains`.
//! No nft flag helps: `-c` only checks, `-o` only merges rules of a file.
//!
//! # JSON, built by hand
//!
//! The documents are built with `serde_json` rather than the `nftables`
//! crate: its helper runs `nft` itself (synchronously, with its own error
//! type), which would bypass [`execute`], and nft 1.0.6's JSON dialect has
//! traps that a schema does not catch — a named priority (`"prio":
//! "dstnat"`) is silently ignored and makes a regular chain instead of a
//! base chain — so the dozen object shapes used here are written and tested
//! against the real binary.

use std::collections::BTreeSet;
use std::process::Stdio;

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{Firewall, FirewallError, TABLE, VmRules};

/// hearth's table is in the `ip` family.
const FAMILY: &str = "ip";

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

/// Per-VM chain suffixes: `vm-<s>-fwd`, `vm-<s>-post`, `vm-<s>-dnat`.
const VM_CHAIN_KINDS: [&str; 3] = ["fwd", "post", "dnat"];

/// Linux's IFNAMSIZ less the NUL.
const IFNAME_MAX: usize = 15;

/// nft refuses longer comments.
const COMMENT_MAX: usize = 128;

/// The real firewall: nftables through the `nft` binary.
#[derive(Debug, Clone)]
pub struct Nft {
    program: String,
    echo_handles: bool,
}

impl Default for Nft {
    fn default() -> Self {
        Self::new()
    }
}

impl Nft {
    /// `nft` from `PATH`, without `--echo`.
    pub fn new() -> Self {
        Self::with_program("nft")
    }

    /// Another `nft` binary (tests use one that fails).
    pub fn with_program(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            echo_handles: false,
        }
    }

    /// Runs apply with `--echo --handle` so its description carries rule
    /// handles. Makes nft 1.0.6 read the whole ruleset on every apply,
    /// which costs time linear in the number of VMs (module doc, "Cost").
    pub fn with_handles(mut self, on: bool) -> Self {
        self.echo_handles = on;
        self
    }

    /// Runs one transaction; returns what nft printed.
    async fn transaction(
        &self,
        op: &'static str,
        commands: Vec<Value>,
        echo: bool,
    ) -> Result<String, FirewallError> {
        let doc = json!({ "nftables": commands });
        let input = serde_json::to_vec(&doc).map_err(|e| FirewallError::Output {
            op,
            detail: format!("cannot encode the transaction: {e}"),
        })?;
        let args: &[&str] = if echo {
            &["-j", "-e", "-a", "-f", "-"]
        } else {
            &["-j", "-f", "-"]
        };
        execute(&self.program, args, Some(&input), op).await
    }

    /// Runs an `nft -j list …` and parses what it printed.
    async fn list(&self, op: &'static str, args: &[&str]) -> Result<Vec<Value>, FirewallError> {
        let mut full = vec!["-j", "list"];
        full.extend_from_slice(args);
        let out = execute(&self.program, &full, None, op).await?;
        parse_objects(op, &out)
    }

    /// Every element of hearth's maps, with the chain it jumps to (empty
    /// for any other verdict).
    async fn map_elements(&self) -> Result<Vec<Elem>, FirewallError> {
        const OP: &str = "remove (reading maps)";
        let mut found = Vec::new();
        for obj in self.list(OP, &["maps", FAMILY]).await? {
            let Some(map) = obj.get("map") else { continue };
            if map.get("table").and_then(Value::as_str) != Some(TABLE) {
                continue;
            }
            let name = map.get("name").and_then(Value::as_str);
            let Some(name) = [FWD_IIF, FWD_OIF, NAT_SADDR, DNAT_PORTS]
                .into_iter()
                .find(|m| Some(*m) == name)
            else {
                continue;
            };
            let elems = map.get("elem").and_then(Value::as_array);
            for pair in elems.into_iter().flatten() {
                let (Some(key), Some(data)) = (pair.get(0), pair.get(1)) else {
                    continue;
                };
                // A key with a comment comes as {"elem": {"val": K, …}}.
                let key = key.get("elem").and_then(|e| e.get("val")).unwrap_or(key);
                let target = data
                    .get("jump")
                    .or_else(|| data.get("goto"))
                    .and_then(|j| j.get("target"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                found.push(Elem {
                    map: name,
                    key: key.clone(),
                    key_text: key.to_string(),
                    chain: target.to_owned(),
                });
            }
        }
        Ok(found)
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
        let mut cmds = head();
        plan.apply_into(&mut cmds);
        let out = self.transaction("apply", cmds, self.echo_handles).await?;
        let handles = if self.echo_handles {
            let handles = echoed_rule_handles(&out, &rules.short_id);
            if handles.as_ref().map(Vec::len) != Some(plan.rules.len()) {
                tracing::warn!(
                    vm = %rules.vm_id,
                    "nft --echo did not report one handle per rule; describing without handles"
                );
            }
            handles.filter(|h| h.len() == plan.rules.len())
        } else {
            None
        };
        Ok(plan.describe(handles.as_deref()))
    }

    async fn remove(&self, rules: &VmRules) -> Result<(), FirewallError> {
        validate(rules)?;
        let plan = VmPlan::new(rules);
        let s = &rules.short_id;
        let first = match self
            .transaction("remove", removal(s, &plan.elems), false)
            .await
        {
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
        self.transaction("remove", removal(s, &elems), false)
            .await
            .map(drop)
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
        self.transaction("remove orphan", removal(short_id, &elems), false)
            .await
            .map(drop)
    }

    async fn list_vm_chains(&self) -> Result<Vec<String>, FirewallError> {
        // `list chains` dumps chains only; `list table` would fetch every
        // rule and element too.
        let objects = self.list("list", &["chains", FAMILY]).await?;
        let ids: BTreeSet<String> = objects
            .iter()
            .filter_map(|o| o.get("chain"))
            .filter(|c| c.get("table").and_then(Value::as_str) == Some(TABLE))
            .filter_map(|c| c.get("name").and_then(Value::as_str))
            .filter_map(vm_chain_short_id)
            .collect();
        Ok(ids.into_iter().collect())
    }
}

/// Runs `program args…`, feeding it `stdin`, and returns its standard
/// output. Every external command of this module goes through here; a
/// failure carries the command line, exit status, stdout and stderr.
async fn execute(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    op: &'static str,
) -> Result<String, FirewallError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let spawn_error = |source| FirewallError::Spawn {
        program: program.to_owned(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_error)?;
    let pipe = child.stdin.take();
    // Feed stdin while collecting the output, so neither side can block
    // the other on a full pipe.
    let feed = async move {
        if let (Some(mut pipe), Some(input)) = (pipe, stdin) {
            pipe.write_all(input).await?;
            pipe.shutdown().await?;
        }
        Ok::<(), std::io::Error>(())
    };
    let (fed, output) = tokio::join!(feed, child.wait_with_output());
    let output = output.map_err(spawn_error)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if !output.status.success() {
        return Err(FirewallError::Nft {
            op,
            command,
            status: output.status.code().unwrap_or(-1),
            stdout,
            stderr,
        });
    }
    if let Err(e) = fed {
        return Err(FirewallError::Output {
            op,
            detail: format!("`{command}` succeeded without reading all its input: {e}"),
        });
    }
    Ok(stdout)
}

/// The objects of an `{"nftables": [...]}` document.
fn parse_objects(op: &'static str, out: &str) -> Result<Vec<Value>, FirewallError> {
    let doc: Value = serde_json::from_str(out).map_err(|e| FirewallError::Output {
        op,
        detail: format!("not JSON: {e}"),
    })?;
    match doc {
        Value::Object(mut m) => match m.remove("nftables") {
            Some(Value::Array(objects)) => Ok(objects),
            _ => Err(FirewallError::Output {
                op,
                detail: "no \"nftables\" array".into(),
            }),
        },
        _ => Err(FirewallError::Output {
            op,
            detail: "not a JSON object".into(),
        }),
    }
}

/// Checks a plan before any kernel call. Names go to nft as JSON strings,
/// so nothing can be injected; these checks refuse what nft would accept
/// but read differently (a `*` in an interface name is a wildcard) and give
/// a clear error for what it would refuse. Shared with the fake.
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
            || name.len() > IFNAME_MAX
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
        guest_ip: std::net::Ipv4Addr::UNSPECIFIED,
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

/// One per-VM rule: its chain, its nft text (for descriptions) and its
/// JSON expression.
#[derive(Debug)]
struct PlannedRule {
    chain: String,
    text: String,
    expr: Vec<Value>,
}

/// One map element: `map[key] = jump chain`.
#[derive(Debug)]
struct Elem {
    map: &'static str,
    key: Value,
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
        let (tap, ip) = (r.tap.as_str(), r.guest_ip.to_string());
        let mut rule = |chain: &str, text: String, expr: Vec<Value>| {
            plan.rules.push(PlannedRule {
                chain: chain.to_owned(),
                text,
                expr,
            });
        };

        if let Some(up) = r.nat_uplink.as_deref() {
            rule(
                &post,
                format!("oifname {up} masquerade"),
                vec![eq(meta("oifname"), json!(up)), json!({"masquerade": null})],
            );
            rule(
                &fwd,
                format!("iifname {tap} oifname {up} accept"),
                vec![
                    eq(meta("iifname"), json!(tap)),
                    eq(meta("oifname"), json!(up)),
                    accept(),
                ],
            );
            rule(
                &fwd,
                format!("iifname {up} oifname {tap} ct state established,related accept"),
                vec![
                    eq(meta("iifname"), json!(up)),
                    eq(meta("oifname"), json!(tap)),
                    ct_in("state", json!(["established", "related"])),
                    accept(),
                ],
            );
        }
        for pf in &r.port_forwards {
            let (p, h, g) = (pf.proto.as_str(), pf.host_port, pf.guest_port);
            rule(
                &dnat,
                format!("meta l4proto {p} th dport {h} dnat to {ip}:{g}"),
                vec![
                    eq(meta("l4proto"), json!(p)),
                    eq(payload("th", "dport"), json!(h)),
                    json!({"dnat": {"addr": ip, "port": g}}),
                ],
            );
            rule(
                &fwd,
                format!(
                    "oifname {tap} ip daddr {ip} meta l4proto {p} th dport {g} ct status dnat accept"
                ),
                vec![
                    eq(meta("oifname"), json!(tap)),
                    eq(payload("ip", "daddr"), json!(ip)),
                    eq(meta("l4proto"), json!(p)),
                    eq(payload("th", "dport"), json!(g)),
                    ct_in("status", json!("dnat")),
                    accept(),
                ],
            );
        }
        if !r.port_forwards.is_empty() {
            rule(
                &fwd,
                format!("iifname {tap} ct status dnat accept"),
                vec![
                    eq(meta("iifname"), json!(tap)),
                    ct_in("status", json!("dnat")),
                    accept(),
                ],
            );
        }

        plan.chains.push(fwd.clone());
        for map in [FWD_IIF, FWD_OIF] {
            plan.elems.push(Elem {
                map,
                key: json!(tap),
                key_text: tap.to_owned(),
                chain: fwd.clone(),
            });
        }
        if r.nat_uplink.is_some() {
            plan.chains.push(post.clone());
            plan.elems.push(Elem {
                map: NAT_SADDR,
                key: json!(ip),
                key_text: ip.clone(),
                chain: post,
            });
        }
        if !r.port_forwards.is_empty() {
            plan.chains.push(dnat.clone());
        }
        for pf in &r.port_forwards {
            let p = pf.proto.as_str();
            plan.elems.push(Elem {
                map: DNAT_PORTS,
                key: json!({"concat": [p, pf.host_port]}),
                key_text: format!("{p} . {}", pf.host_port),
                chain: dnat.clone(),
            });
        }
        plan
    }

    /// Chains (added and flushed, so a re-apply replaces), rules, elements.
    fn apply_into(&self, cmds: &mut Vec<Value>) {
        for chain in &self.chains {
            cmds.push(json!({"add": {"chain": chain_ref(chain)}}));
            cmds.push(json!({"flush": {"chain": chain_ref(chain)}}));
        }
        for r in &self.rules {
            cmds.push(add_rule(&r.chain, &r.expr, Some(&self.comment)));
        }
        for e in &self.elems {
            let elem = e.with_verdict(Some(&self.comment));
            cmds.push(json!({"add": {"element": element(e.map, vec![elem])}}));
        }
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
    /// `[key, {"jump": {"target": chain}}]`, the key wrapped as
    /// `{"elem": {"val": key, "comment": …}}` when it has a comment.
    fn with_verdict(&self, comment: Option<&str>) -> Value {
        let key = match comment {
            Some(c) => json!({"elem": {"val": self.key, "comment": c}}),
            None => self.key.clone(),
        };
        json!([key, {"jump": {"target": self.chain}}])
    }
}

/// The removal transaction for VM `short_id`: head, then add-then-delete
/// of `elems` and of all its chains (module doc).
fn removal(short_id: &str, elems: &[Elem]) -> Vec<Value> {
    let mut cmds = head();
    let chains: Vec<String> = VM_CHAIN_KINDS
        .iter()
        .map(|k| vm_chain(short_id, k))
        .collect();
    for chain in &chains {
        cmds.push(json!({"add": {"chain": chain_ref(chain)}}));
    }
    for e in elems {
        let elem = e.with_verdict(None);
        cmds.push(json!({"add": {"element": element(e.map, vec![elem])}}));
    }
    for e in elems {
        cmds.push(json!({"delete": {"element": element(e.map, vec![e.key.clone()])}}));
    }
    for chain in &chains {
        cmds.push(json!({"flush": {"chain": chain_ref(chain)}}));
        cmds.push(json!({"delete": {"chain": chain_ref(chain)}}));
    }
    cmds
}

/// The head of every transaction: table, base chains and maps (`add` is a
/// no-op when they exist), then each base chain flushed and its dispatch
/// rules added again (module doc, "Base objects without a cache").
fn head() -> Vec<Value> {
    // nft 1.0.6's JSON parser ignores named priorities ("dstnat") and then
    // makes a regular chain: numbers only.
    const DSTNAT: i32 = -100;
    const SRCNAT: i32 = 100;
    const FILTER: i32 = 0;
    const NAT_OUTPUT: i32 = -100;

    let mut cmds = vec![json!({"add": {"table": {"family": FAMILY, "name": TABLE}}})];
    for (name, kind, prio) in [
        (PREROUTING, "nat", DSTNAT),
        (OUTPUT, "nat", NAT_OUTPUT),
        (POSTROUTING, "nat", SRCNAT),
        (FORWARD, "filter", FILTER),
    ] {
        cmds.push(json!({"add": {"chain": {
            "family": FAMILY, "table": TABLE, "name": name,
            "type": kind, "hook": name, "prio": prio, "policy": "accept",
        }}}));
    }
    for (name, key) in [
        (FWD_IIF, json!("ifname")),
        (FWD_OIF, json!("ifname")),
        (NAT_SADDR, json!("ipv4_addr")),
        (DNAT_PORTS, json!(["inet_proto", "inet_service"])),
    ] {
        cmds.push(json!({"add": {"map": {
            "family": FAMILY, "table": TABLE, "name": name, "type": key, "map": "verdict",
        }}}));
    }
    let dnat_dispatch = || {
        vec![
            eq(
                json!({"fib": {"result": "type", "flags": ["daddr"]}}),
                json!("local"),
            ),
            vmap(
                json!({"concat": [meta("l4proto"), payload("th", "dport")]}),
                DNAT_PORTS,
            ),
        ]
    };
    let base_rules: [(&str, Vec<Vec<Value>>); 4] = [
        (
            FORWARD,
            vec![
                vec![vmap(meta("iifname"), FWD_IIF)],
                vec![vmap(meta("oifname"), FWD_OIF)],
            ],
        ),
        (
            POSTROUTING,
            vec![
                vec![
                    eq(
                        payload("ip", "saddr"),
                        json!({"prefix": {"addr": "127.0.0.0", "len": 8}}),
                    ),
                    ct_in("status", json!("dnat")),
                    json!({"masquerade": null}),
                ],
                vec![vmap(payload("ip", "saddr"), NAT_SADDR)],
            ],
        ),
        (PREROUTING, vec![dnat_dispatch()]),
        (OUTPUT, vec![dnat_dispatch()]),
    ];
    for (chain, rules) in base_rules {
        cmds.push(json!({"flush": {"chain": chain_ref(chain)}}));
        for expr in rules {
            cmds.push(add_rule(chain, &expr, None));
        }
    }
    cmds
}

/// Handles of the rules nft echoed into VM `short_id`'s chains, in order.
fn echoed_rule_handles(out: &str, short_id: &str) -> Option<Vec<u64>> {
    let prefix = format!("vm-{short_id}-");
    let objects = parse_objects("apply", out).ok()?;
    objects
        .iter()
        .filter_map(|o| o.get("add")?.get("rule"))
        .filter(|r| {
            r.get("chain")
                .and_then(Value::as_str)
                .is_some_and(|c| c.starts_with(&prefix))
        })
        .map(|r| r.get("handle").and_then(Value::as_u64))
        .collect()
}

fn chain_ref(name: &str) -> Value {
    json!({"family": FAMILY, "table": TABLE, "name": name})
}

fn add_rule(chain: &str, expr: &[Value], comment: Option<&str>) -> Value {
    let mut rule = json!({"family": FAMILY, "table": TABLE, "chain": chain, "expr": expr});
    if let (Some(c), Some(obj)) = (comment, rule.as_object_mut()) {
        obj.insert("comment".into(), json!(c));
    }
    json!({"add": {"rule": rule}})
}

fn element(map: &str, elem: Vec<Value>) -> Value {
    json!({"family": FAMILY, "table": TABLE, "name": map, "elem": elem})
}

fn eq(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn ct_in(key: &str, right: Value) -> Value {
    json!({"match": {"op": "in", "left": {"ct": {"key": key}}, "right": right}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn accept() -> Value {
    json!({"accept": null})
}

fn vmap(key: Value, map: &str) -> Value {
    json!({"vmap": {"key": key, "data": format!("@{map}")}})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;
    use std::process::Command as StdCommand;

    use super::*;
    use crate::host::firewall::{PortForward, Proto};
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
        for o in parse_objects("test", &String::from_utf8(out.stdout).unwrap()).unwrap() {
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
    fn nft_children_run_in_the_threads_namespace() {
        in_ns("fw-ns", || async {
            let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
            // The process's main thread stayed in the host's namespace.
            let host = std::fs::read_link("/proc/self/ns/net").unwrap();
            assert_ne!(
                own, host,
                "the test thread is still in the host's namespace"
            );
            let child = execute("readlink", &["/proc/self/ns/net"], None, "test")
                .await
                .unwrap();
            assert_eq!(child.trim(), own.to_str().unwrap());
        });
    }

    #[test]
    fn apply_installs_exactly_the_vms_chains_rules_and_elements() {
        in_ns("fw-apply", || async {
            let fw = Nft::new();
            let a = vm("ab12", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]);
            let installed = fw.apply(&a).await.unwrap();
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
                FirewallError::Nft {
                    op,
                    command,
                    status,
                    stderr,
                    ..
                } => {
                    assert_eq!(
                        (*op, command.as_str(), *status),
                        ("apply", "nft -j -f -", 1)
                    );
                    assert!(stderr.contains("File exists"), "{stderr}");
                }
                other => panic!("{other:?}"),
            }
            let after = table().unwrap();
            assert_eq!(after.vm_chains(), before.vm_chains());
            assert_eq!(after.elems, before.elems);
            assert_eq!(after.rules.len(), before.rules.len());
            assert_eq!(fw.list_vm_chains().await.unwrap(), ["aaa"]);

            // A name nft refuses fails the same way; one hearth refuses
            // fails before nft runs.
            let mut c = vm("ccc", "hth3", 10, true, &[]);
            c.nat_uplink = Some("a\"b".into());
            let err = fw.apply(&c).await.unwrap_err();
            assert!(matches!(err, FirewallError::Invalid { .. }), "{err:?}");
            assert_eq!(fw.list_vm_chains().await.unwrap(), ["aaa"]);

            // nft missing: a spawn error, nothing changes.
            let missing = Nft::with_program("/nonexistent/nft");
            let err = missing.apply(&b).await.unwrap_err();
            assert!(matches!(err, FirewallError::Spawn { .. }), "{err:?}");
            // nft failing: command, status and output are reported.
            let failing = Nft::with_program("false");
            match failing.remove(&b).await.unwrap_err() {
                FirewallError::Nft {
                    command, status, ..
                } => assert_eq!((command.as_str(), status), ("false -j -f -", 1)),
                other => panic!("{other:?}"),
            }
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
    fn with_handles_reports_rule_handles() {
        in_ns("fw-echo", || async {
            let fw = Nft::new().with_handles(true);
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

    #[test]
    fn removal_document_adds_before_it_deletes() {
        let plan = VmPlan::new(&vm("aaa", "hth1", 2, true, &[(8080, Proto::Tcp, 80)]));
        let cmds = removal("aaa", &plan.elems);
        let ops: Vec<String> = cmds
            .iter()
            .skip(head().len())
            .map(|c| {
                let (op, body) = c.as_object().unwrap().iter().next().unwrap();
                let (kind, _) = body.as_object().unwrap().iter().next().unwrap();
                format!("{op} {kind}")
            })
            .collect();
        let mut want = vec!["add chain"; 3];
        want.extend(["add element"; 4]);
        want.extend(["delete element"; 4]);
        want.extend(["flush chain", "delete chain"].repeat(3));
        assert_eq!(ops, want);
    }
}
