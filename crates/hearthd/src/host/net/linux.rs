//! The real [`NetHost`]: taps through `/dev/net/tun`, everything else
//! through a few rtnetlink sockets, sysctls through `/proc/sys`.
//!
//! Why this shape:
//!
//! - **No `ip` subprocesses.** Starting a VM must cost milliseconds; a fork
//!   and exec of `ip` per step costs more than the whole netlink exchange.
//!   [`LinuxNet::new`] opens `CONNECTIONS` (4) netlink connections and keeps
//!   them for the life of the value.
//! - **A few connections, one exchange at a time on each.** Concurrent
//!   dumps on one socket make the kernel answer EBUSY or drop replies
//!   (ENOBUFS), so each connection carries one request at a time. A tap's
//!   configure or reset is five exchanges or so; with one connection,
//!   eight concurrent starts and stops queued behind each other for it (5
//!   ms a step under the throughput bench). Each tap's requests go to one
//!   of four connections by its name, so different taps proceed side by
//!   side (the kernel's own rtnl lock still orders the changes).
//! - **Kernel-side filtering.** The socket is opened with
//!   `NETLINK_GET_STRICT_CHK`, so dumps of addresses, routes and neighbours
//!   are filtered by interface in the kernel: configuring one tap costs the
//!   same with ten VMs or ten thousand. (Every dump is also filtered here,
//!   which keeps the code correct on a kernel without strict checking.)
//! - **Idempotence by error mapping.** Every call may be repeated, after a
//!   crash or on another cleanup path (DESIGN.md, invariant 2). "Already
//!   there" on an add of the very object we asked for, and "no such
//!   device / entry / route / address" on a delete, are success.
//! - **Network namespace.** A netlink socket and a `/dev/net/tun` open act
//!   in the network namespace of the *thread* that makes them: the netlink
//!   socket in the one of the thread that called [`LinuxNet::new`], the tap
//!   and sysctl calls in the one of the thread that runs them. The daemon
//!   never switches namespaces, so these are the same; tests that enter a
//!   namespace do so on a thread that then runs everything, connection task
//!   included, on a current-thread runtime.
//! - **Deletes are group-committed.** Unregistering a net device waits for
//!   an RCU grace period (~16–20 ms here), once per `RTM_DELLINK`, under the
//!   kernel's rtnl lock: a recovery tearing down a thousand dead VMs would
//!   spend 20 s deleting taps one by one. Instead [`LinuxNet::delete_link`]
//!   queues its name and whoever next holds the socket takes everything
//!   queued so far: it puts those links in [`DELETE_GROUP`] (one cheap
//!   `RTM_SETLINK` each) and deletes the whole group with one `RTM_DELLINK`,
//!   which the kernel unregisters under a single grace period. A lone
//!   delete is a batch of one and is still one `RTM_DELLINK` by name.
//!   All deletes go through the first connection so that they meet in one
//!   batch. A tap a crash left in the group is moved out by the next
//!   configure or reset of it, on its own connection; should a batch
//!   delete it first, that reset finds it gone (success) and a later start
//!   creates it again.
//!
//! `configure_tap` and `reset_tap` first set an up link down: the kernel
//! then drops the link's routes, neighbours and IPv6 addresses itself, so
//! running `configure_tap` twice leaves exactly the same state as running
//! it once. The explicit flushes that follow catch what a down does not
//! remove: IPv4 addresses, and addresses and neighbour entries added while
//! the link was down. Routes need no flush: the kernel refuses a route
//! through a down link ("Nexthop device is not up", IPv4 and IPv6) and
//! drops the link's routes when it goes down. That saves two route dumps
//! per configure and per reset, and a route dump walks the whole table (a
//! /30 per tap), filtering only as it goes.
//!
//! Taps carry IPv4 only (guests get their address from `ip=`; hearth's
//! table is `ip`), so `create_tap` turns IPv6 off on each: no link-local
//! address, no IPv6 routes. Besides being tidier, it keeps the kernel's
//! IPv6 route tree from growing by three routes per tap, and every link
//! up, down or delete walks that tree (perf at 1,000 VMs: `fib6_clean_all`
//! under `addrconf_notify`, a sixth of hearthd's CPU).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::pin::pin;

use async_trait::async_trait;
use futures_util::stream::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{
    InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::packet_core::Nla;
use rtnetlink::{Handle, LinkUnspec};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use super::{NetError, NetHost, Route};

/// The prefix every interface hearth owns carries (DESIGN.md, "Ownership
/// marks").
pub const LINK_PREFIX: &str = "hth";

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// `IFLA_TUN_TYPE` and `IFLA_TUN_PERSIST` inside a tun link's
/// `IFLA_INFO_DATA` (include/uapi/linux/if_link.h); netlink-packet-route
/// leaves them undecoded.
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_PERSIST: u16 = 6;

/// Errnos that mean "the object is already gone" on a delete, or "the link
/// is gone" on a lookup.
const GONE: [i32; 4] = [libc::ENODEV, libc::ENOENT, libc::ESRCH, libc::EADDRNOTAVAIL];

/// The link group (`IFLA_GROUP`) hearth reserves for deleting links in bulk:
/// a batch of `hth*` links a caller asked [`LinuxNet::delete_link`] to
/// delete is put in this group and the group is deleted with one
/// `RTM_DELLINK` (`ip link del group 1752459364`), which costs one RCU grace
/// period instead of one per link. Only hearth's own `hth*` links about to
/// be deleted are ever put in it, and only for the length of one batch.
///
/// The number is 0x68746864, "hthd" in ASCII: far from the small numbers
/// people give groups by hand or in `/etc/iproute2/group`. Anything else
/// that puts a link in it in a namespace hearth runs in will see that link
/// deleted with the next batch.
pub const DELETE_GROUP: u32 = 0x6874_6864;

/// The group every link starts in (`INIT_NETDEV_GROUP`, "default").
const DEFAULT_GROUP: u32 = 0;

/// One queued [`LinuxNet::delete_link`]: the link and where its caller
/// awaits the result.
type PendingDelete = (String, oneshot::Sender<Result<(), NetError>>);

// ---------------------------------------------------------------------------
// Validation, shared with the fake so both refuse the same input.

/// A name hearth may create a tap under: `hth` followed by ASCII letters
/// and digits, at most 15 bytes in all.
pub(super) fn validate_tap_name(name: &str) -> Result<(), NetError> {
    let invalid = |reason: String| NetError::Invalid {
        what: "tap name",
        reason,
    };
    if !name.starts_with(LINK_PREFIX) {
        return Err(invalid(format!(
            "{name:?} does not start with {LINK_PREFIX:?}"
        )));
    }
    if name.len() > IFNAME_MAX {
        return Err(invalid(format!(
            "{name:?} is longer than {IFNAME_MAX} bytes"
        )));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(invalid(format!(
            "{name:?} has a character other than ASCII letters and digits"
        )));
    }
    Ok(())
}

/// A name the kernel would accept for an interface (`dev_valid_name`).
pub(super) fn validate_ifname(name: &str) -> Result<(), NetError> {
    let bad = name.is_empty()
        || name.len() > IFNAME_MAX
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if bad {
        return Err(NetError::Invalid {
            what: "interface name",
            reason: format!("{name:?} is not a valid Linux interface name"),
        });
    }
    Ok(())
}

/// A link hearth may delete: a valid interface name carrying hearth's mark.
/// hearth never deletes an interface it does not own.
pub(super) fn validate_owned_link(name: &str) -> Result<(), NetError> {
    validate_ifname(name)?;
    if !name.starts_with(LINK_PREFIX) {
        return Err(NetError::Invalid {
            what: "link name",
            reason: format!("{name:?} does not start with {LINK_PREFIX:?}; hearth does not own it"),
        });
    }
    Ok(())
}

/// An address and prefix a tap may be given: a unicast IPv4 address and a
/// prefix of 1 to 32 bits (a /0 would make the tap a route to everywhere).
pub(super) fn validate_addr(addr: Ipv4Addr, prefix_len: u8) -> Result<(), NetError> {
    let invalid = |reason: String| NetError::Invalid {
        what: "tap address",
        reason,
    };
    if !(1..=32).contains(&prefix_len) {
        return Err(invalid(format!(
            "prefix length {prefix_len} is not between 1 and 32"
        )));
    }
    if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
        return Err(invalid(format!("{addr} is not a unicast address")));
    }
    Ok(())
}

/// `/proc/sys/<key with dots as slashes>`. A key is dot-separated
/// components of ASCII letters, digits, `_` and `-`. Linux also allows dots
/// in interface names, which would make `net.ipv4.conf.<if>.x` ambiguous;
/// hearth's interface names have none, so the dotted form is unambiguous
/// for every key hearth uses.
pub(super) fn sysctl_path(key: &str) -> Result<PathBuf, NetError> {
    let valid = !key.is_empty()
        && key.split('.').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if !valid {
        return Err(NetError::Invalid {
            what: "sysctl key",
            reason: format!(
                "{key:?} is not dot-separated components of letters, digits, '_' and '-'"
            ),
        });
    }
    Ok(PathBuf::from("/proc/sys").join(key.replace('.', "/")))
}

/// A value that can be written to a sysctl in one line.
pub(super) fn validate_sysctl_value(key: &str, value: &str) -> Result<(), NetError> {
    if value.contains(['\n', '\0']) {
        return Err(NetError::Invalid {
            what: "sysctl value",
            reason: format!("the value for {key} contains a newline or NUL"),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Error mapping.

/// The errno of a NACK from the kernel, if that is what `e` is.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()).filter(|&c| c != 0),
        _ => None,
    }
}

fn is_gone(e: &rtnetlink::Error) -> bool {
    errno(e).is_some_and(|c| GONE.contains(&c))
}

/// A [`NetError::Netlink`]; a kernel NACK becomes its `io::Error`, so the
/// chain reads "netlink add address on hth0: File exists (os error 17)".
fn nl_err(op: &'static str, target: impl Into<String>, e: rtnetlink::Error) -> NetError {
    let source: Box<dyn std::error::Error + Send + Sync> = match e {
        rtnetlink::Error::NetlinkError(m) => Box::new(m.to_io()),
        other => Box::new(other),
    };
    NetError::Netlink {
        op,
        target: target.into(),
        source,
    }
}

/// Whether the link vanished under a flush (a reset then has nothing left
/// to do; a configure has lost its tap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Present,
    Gone,
}

// ---------------------------------------------------------------------------
// Link messages.

fn link_group(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Group(g) => Some(*g),
        _ => None,
    })
}

fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_infos(msg: &LinkMessage) -> impl Iterator<Item = &LinkInfo> {
    msg.attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos.iter()),
            _ => None,
        })
        .flatten()
}

fn link_kind(msg: &LinkMessage) -> Option<&InfoKind> {
    link_infos(msg).find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    })
}

/// One byte-valued `IFLA_TUN_*` attribute of a tun/tap link.
fn tun_attr(msg: &LinkMessage, kind: u16) -> Option<u8> {
    link_infos(msg).find_map(|i| match i {
        LinkInfo::Data(InfoData::Tun(nlas)) => {
            nlas.iter().find(|n| n.kind() == kind).and_then(|n| {
                let mut buf = vec![0; n.value_len()];
                n.emit_value(&mut buf);
                buf.first().copied()
            })
        }
        _ => None,
    })
}

/// What an existing link is, for the error that says why it is not usable
/// as a tap: `None` if it is a tap.
fn not_a_tap(msg: &LinkMessage) -> Option<String> {
    match link_kind(msg) {
        Some(InfoKind::Tun) => match tun_attr(msg, IFLA_TUN_TYPE) {
            // IFF_TAP
            Some(2) => None,
            Some(1) => Some("a tun (layer 3) device".to_owned()),
            _ => Some("a tun device of unknown type".to_owned()),
        },
        Some(kind) => Some(format!("a {kind} link")),
        None => Some("a link of unknown kind".to_owned()),
    }
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// The route's output interface: `RTA_OIF`, or the first next hop's for a
/// multipath route.
fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
        _ => None,
    })
}

// ---------------------------------------------------------------------------
// /dev/net/tun.

/// What TUNSETIFF said, when it refused.
enum TunRefusal {
    /// EINVAL: a link of that name exists and is not a tap of our flags.
    Invalid(io::Error),
    /// EBUSY: the tap exists and another process (a running VMM) has it open.
    Busy(io::Error),
}

fn tap_err(op: &'static str, name: &str, source: io::Error) -> NetError {
    NetError::Tap {
        op,
        name: name.to_owned(),
        source,
    }
}

/// Opens `/dev/net/tun`, attaches to (creating if needed) tap `name`, makes
/// it persistent and closes the descriptor. A few short syscalls, done
/// inline: they act in the calling thread's network namespace, which a
/// hop to a blocking-pool thread could change.
fn tun_create_persistent(name: &str) -> Result<Result<(), TunRefusal>, NetError> {
    use rustix::fs::{Mode, OFlags};

    let fd = rustix::fs::open(
        "/dev/net/tun",
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| tap_err("open /dev/net/tun", name, e.into()))?;

    // SAFETY: `ifreq` is plain old data (a char array and a union of
    // integers, arrays and a pointer), for which all-zero bytes are valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // The name was validated to be at most 15 ASCII bytes, so the 16-byte
    // field keeps its NUL terminator.
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // The flags all fit in the kernel's 16-bit `ifr_flags`.
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;

    // SAFETY: `fd` is an open /dev/net/tun descriptor; TUNSETIFF reads and
    // writes back one `struct ifreq`, and `ifr` is a valid, exclusively
    // borrowed `ifreq` that outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EINVAL) => Ok(Err(TunRefusal::Invalid(err))),
            Some(libc::EBUSY) => Ok(Err(TunRefusal::Busy(err))),
            _ => Err(tap_err("TUNSETIFF", name, err)),
        };
    }
    // SAFETY: `fd` is attached to the tap; TUNSETPERSIST takes its argument
    // by value (non-zero: persist) and touches no memory of ours.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(tap_err("TUNSETPERSIST", name, io::Error::last_os_error()));
    }
    // Dropping `fd` detaches; the persistent tap stays.
    Ok(Ok(()))
}

// ---------------------------------------------------------------------------
// LinuxNet.

/// One rtnetlink connection, bound to the network namespace of the thread
/// that opened it, and everything done over it. [`LinuxNet`] spreads the
/// taps over a few.
#[derive(Debug)]
struct Conn {
    handle: Handle,
    connection: AbortHandle,
    /// Serialises requests on the shared socket (see the trait methods).
    serial: tokio::sync::Mutex<()>,
    /// Deletes waiting for the next holder of `serial` to run them as one
    /// batch ([`LinuxNet::delete_link`]). A std mutex: it is held only to
    /// push or take, never across an await.
    pending_deletes: std::sync::Mutex<Vec<PendingDelete>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Conn {
    /// Opens the rtnetlink connection and spawns its task on the current
    /// tokio runtime, which must exist (an error, not a panic, otherwise).
    /// The socket belongs to the calling thread's network namespace, for
    /// good: every later request acts there, whichever thread sends it.
    fn new() -> Result<Self, NetError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| NetError::Netlink {
            op: "connect (outside a tokio runtime)",
            target: "rtnetlink".into(),
            source: Box::new(e),
        })?;
        let (connection, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(|e| NetError::Netlink {
                op: "connect",
                target: "rtnetlink".into(),
                source: Box::new(e),
            })?;
        let connection = runtime.spawn(connection).abort_handle();
        Ok(Self {
            handle,
            connection,
            serial: tokio::sync::Mutex::new(()),
            pending_deletes: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The link called `name`, or `None` if there is none.
    async fn find_link(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut links = pin!(self.handle.link().get().match_name(name).execute());
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err("get link", name, e)),
        }
    }

    /// Sets link `index` up or down.
    async fn set_up(&self, name: &str, index: u32, up: bool) -> Result<Presence, NetError> {
        let builder = LinkUnspec::new_with_index(index);
        let msg = if up { builder.up() } else { builder.down() }.build();
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(Presence::Present),
            Err(e) if is_gone(&e) => Ok(Presence::Gone),
            Err(e) => Err(nl_err(
                if up { "set link up" } else { "set link down" },
                name,
                e,
            )),
        }
    }

    /// Puts link `name` (looked up by name) in link group `group`.
    async fn set_group(&self, name: &str, group: u32) -> Result<Presence, NetError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes.push(LinkAttribute::Group(group));
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(Presence::Present),
            Err(e) if is_gone(&e) => Ok(Presence::Gone),
            Err(e) => Err(nl_err("set link group", name, e)),
        }
    }

    /// Deletes link `name` on its own, by name, in one request (no lookup
    /// round trip). Gone is success.
    async fn delete_one(&self, name: &str) -> Result<(), NetError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.handle.link().del_with_message(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            Err(e) => Err(nl_err("delete link", name, e)),
        }
    }

    fn take_pending_deletes(&self) -> Vec<PendingDelete> {
        std::mem::take(
            &mut *self
                .pending_deletes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Deletes every link of `batch` and answers each caller. Runs with
    /// `serial` held, so nothing else touches the links or the group
    /// meanwhile.
    ///
    /// Crash safety: if hearthd dies after the links are put in
    /// [`DELETE_GROUP`] and before the group is deleted, they stay, in that
    /// group, and still recorded in the store; the next teardown or sweep
    /// deletes them again (a later batch's group delete may take them
    /// first, which is what was asked). If a teardown instead sends one
    /// back to the idle pool, `reset_tap` and `configure_tap` take it out of
    /// the group ([`Conn::quiesce`]) before it can be used.
    async fn delete_batch(&self, batch: Vec<PendingDelete>) {
        let mut singly = Vec::new();
        let mut grouped = Vec::new();
        if batch.len() == 1 {
            singly = batch;
        } else {
            for (name, tx) in batch {
                match self.set_group(&name, DELETE_GROUP).await {
                    Ok(Presence::Present) => grouped.push((name, tx)),
                    Ok(Presence::Gone) => {
                        // The caller may have stopped waiting: fine.
                        let _ = tx.send(Ok(()));
                    }
                    // The delete by name will say what is wrong, if anything.
                    Err(_) => singly.push((name, tx)),
                }
            }
        }
        if !grouped.is_empty() {
            // ifindex 0 and no name: the kernel deletes the whole group
            // (rtnl_group_dellink), under one grace period.
            let mut msg = LinkMessage::default();
            msg.attributes.push(LinkAttribute::Group(DELETE_GROUP));
            match self.handle.link().del_with_message(msg).execute().await {
                Ok(()) => {
                    for (_, tx) in grouped {
                        let _ = tx.send(Ok(()));
                    }
                }
                // All or nothing (e.g. EOPNOTSUPP if some link in the group
                // has no dellink): one by one, so that each caller gets its
                // own link's answer.
                Err(e) => {
                    tracing::warn!(
                        links = grouped.len(),
                        group = DELETE_GROUP,
                        error = %e,
                        "netlink delete link group failed; deleting the links one by one"
                    );
                    singly.extend(grouped);
                }
            }
        }
        for (name, tx) in singly {
            let _ = tx.send(self.delete_one(&name).await);
        }
    }

    /// Removes every address (IPv4 and IPv6) and every neighbour entry of
    /// link `index`, which must be down (module doc: it then has no routes).
    async fn flush(&self, name: &str, index: u32) -> Result<Presence, NetError> {
        if self.flush_addresses(name, index).await? == Presence::Gone {
            return Ok(Presence::Gone);
        }
        self.flush_neighbours(name, index).await
    }

    async fn flush_addresses(&self, name: &str, index: u32) -> Result<Presence, NetError> {
        let mut req = self.handle.address().get().set_link_index_filter(index);
        // Kernel-side filter (strict checking): only this link's addresses.
        req.message_mut().header.index = index;
        let addrs: Vec<AddressMessage> = match req.execute().try_collect().await {
            Ok(a) => a,
            Err(e) if is_gone(&e) => return Ok(Presence::Gone),
            Err(e) => return Err(nl_err("list addresses", name, e)),
        };
        for addr in addrs {
            // Deleting an IPv4 primary also deletes its secondaries, so a
            // later one may already be gone (EADDRNOTAVAIL): fine.
            match self.handle.address().del(addr).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::ENODEV) => return Ok(Presence::Gone),
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(nl_err("delete address", name, e)),
            }
        }
        Ok(Presence::Present)
    }

    async fn flush_neighbours(&self, name: &str, index: u32) -> Result<Presence, NetError> {
        let mut req = self.handle.neighbours().get();
        // Kernel-side filter: only this link's entries.
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::IfIndex(index));
        let neighbours: Vec<NeighbourMessage> = match req.execute().try_collect().await {
            Ok(n) => n,
            Err(e) if errno(&e) == Some(libc::ENODEV) => return Ok(Presence::Gone),
            Err(e) => return Err(nl_err("list neighbours", name, e)),
        };
        for n in neighbours.into_iter().filter(|n| n.header.ifindex == index) {
            let Some(dst) = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(d) => Some(d.clone()),
                _ => None,
            }) else {
                continue;
            };
            // Only what the kernel needs to find the entry.
            let mut del = NeighbourMessage::default();
            del.header.family = n.header.family;
            del.header.ifindex = index;
            del.header.flags = n.header.flags;
            del.attributes.push(NeighbourAttribute::Destination(dst));
            match self.handle.neighbours().del(del).execute().await {
                Ok(()) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(nl_err("delete neighbour", name, e)),
            }
        }
        Ok(Presence::Present)
    }

    /// Sets the link down if it is up, then flushes it. The first step of
    /// both configure and reset. A tap left in [`DELETE_GROUP`] by a crash
    /// mid-delete goes back to the default group first, or the next batch
    /// of deletes would take it with it.
    async fn quiesce(&self, name: &str, link: &LinkMessage) -> Result<Presence, NetError> {
        let index = link.header.index;
        if link_group(link) == Some(DELETE_GROUP)
            && self.set_group(name, DEFAULT_GROUP).await? == Presence::Gone
        {
            return Ok(Presence::Gone);
        }
        if link.header.flags.contains(LinkFlags::Up)
            && self.set_up(name, index, false).await? == Presence::Gone
        {
            return Ok(Presence::Gone);
        }
        self.flush(name, index).await
    }

    /// Names of all links, by index.
    async fn link_names(&self) -> Result<HashMap<u32, String>, NetError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("list links", "all links", e))?;
        Ok(links
            .iter()
            .filter_map(|l| link_name(l).map(|n| (l.header.index, n.to_owned())))
            .collect())
    }

    /// Why TUNSETIFF refused `name`, as a clear error.
    async fn explain_refusal(&self, name: &str, refusal: TunRefusal) -> Result<(), NetError> {
        let link = self.find_link(name).await?;
        match refusal {
            TunRefusal::Invalid(err) => {
                let source = match link.as_ref().and_then(not_a_tap) {
                    Some(what) => io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("the name is taken by {what}, not a tap"),
                    ),
                    None if link.is_some() => io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("the existing tap has incompatible flags (multi-queue?): {err}"),
                    ),
                    None => err,
                };
                Err(tap_err("TUNSETIFF", name, source))
            }
            TunRefusal::Busy(err) => match link {
                // A running VMM holds it: it exists, persistent, as asked.
                Some(l) if not_a_tap(&l).is_none() && tun_attr(&l, IFLA_TUN_PERSIST) == Some(1) => {
                    Ok(())
                }
                _ => Err(tap_err("TUNSETIFF", name, err)),
            },
        }
    }
}

/// Link `name`'s index, or `None` if there is none: `if_nametoindex`, one
/// ioctl in the calling thread's namespace (as the tap calls), which asks
/// nothing of a netlink connection. Start checks the tap this way right
/// before the VMM opens it.
fn link_index(name: &str) -> Result<Option<u32>, NetError> {
    let c = std::ffi::CString::new(name).map_err(|_| NetError::Invalid {
        what: "link name",
        reason: format!("{name:?} contains a NUL byte"),
    })?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's length.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENODEV) {
                Ok(None)
            } else {
                Err(tap_err("if_nametoindex", name, err))
            }
        }
        index => Ok(Some(index)),
    }
}

/// Writes sysctl `key` (dotted, as `sysctl` names it).
fn write_sysctl(key: &str, value: &str) -> Result<(), NetError> {
    let path = sysctl_path(key)?;
    validate_sysctl_value(key, value)?;
    let sys = |source| NetError::Sysctl {
        key: key.to_owned(),
        source,
    };
    // No O_CREAT or O_TRUNC: a sysctl exists or it does not.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(sys)?;
    io::Write::write_all(&mut file, value.as_bytes()).map_err(sys)
}

/// Turns IPv6 off on tap `name` (module doc): no link-local address, no
/// routes. A kernel without IPv6 has no such sysctl, which is fine.
fn disable_ipv6(name: &str) -> Result<(), NetError> {
    match write_sysctl(&format!("net.ipv6.conf.{name}.disable_ipv6"), "1") {
        Err(NetError::Sysctl { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[async_trait]
impl NetHost for Conn {
    async fn create_tap(&self, name: &str) -> Result<(), NetError> {
        // One netlink exchange at a time: concurrent dumps on the one
        // socket make the kernel answer EBUSY or drop replies (ENOBUFS).
        let _serial = self.serial.lock().await;
        validate_tap_name(name)?;
        match tun_create_persistent(name)? {
            Ok(()) => {}
            Err(refusal) => self.explain_refusal(name, refusal).await?,
        }
        disable_ipv6(name)
    }

    async fn configure_tap(
        &self,
        name: &str,
        host_addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetError> {
        // One netlink exchange at a time: concurrent dumps on the one
        // socket make the kernel answer EBUSY or drop replies (ENOBUFS).
        let _serial = self.serial.lock().await;
        validate_tap_name(name)?;
        validate_addr(host_addr, prefix_len)?;
        let gone = || NetError::Netlink {
            op: "configure",
            target: name.to_owned(),
            source: Box::new(io::Error::from_raw_os_error(libc::ENODEV)),
        };
        let Some(link) = self.find_link(name).await? else {
            return Err(gone());
        };
        let index = link.header.index;
        if self.quiesce(name, &link).await? == Presence::Gone {
            return Err(gone());
        }
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(host_addr), prefix_len)
            .execute()
            .await
        {
            Ok(()) => {}
            // The kernel says EEXIST only for this very address and prefix
            // on this link: what we asked for.
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) if errno(&e) == Some(libc::ENODEV) => return Err(gone()),
            Err(e) => {
                return Err(nl_err(
                    "add address",
                    format!("{host_addr}/{prefix_len} on {name}"),
                    e,
                ));
            }
        }
        if self.set_up(name, index, true).await? == Presence::Gone {
            return Err(gone());
        }
        Ok(())
    }

    async fn reset_tap(&self, name: &str) -> Result<(), NetError> {
        // One netlink exchange at a time: concurrent dumps on the one
        // socket make the kernel answer EBUSY or drop replies (ENOBUFS).
        let _serial = self.serial.lock().await;
        validate_tap_name(name)?;
        let Some(link) = self.find_link(name).await? else {
            return Ok(());
        };
        // Gone half-way is as good as reset.
        self.quiesce(name, &link).await.map(|_| ())
    }

    async fn delete_link(&self, name: &str) -> Result<(), NetError> {
        validate_owned_link(name)?;
        // Group commit (module doc): queue the name, then wait for either
        // our answer or the socket. Whoever gets the socket deletes
        // everything queued by then, so the `serial` lock doubles as the
        // "batch in flight" flag and the names queued while one batch runs
        // make up the next. A caller whose name someone else took leaves
        // as soon as it is answered, without queueing for the socket: were
        // it to take its turn, it would find one newcomer queued and
        // delete it alone. No task of our own to spawn, feed and stop.
        loop {
            let (tx, mut rx) = oneshot::channel();
            self.pending_deletes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((name.to_owned(), tx));
            let answer = tokio::select! {
                biased;
                answer = &mut rx => answer,
                // One netlink exchange at a time: concurrent dumps on the
                // one socket make the kernel answer EBUSY or drop replies
                // (ENOBUFS). The batch holds it from start to end.
                serial = self.serial.lock() => {
                    let batch = self.take_pending_deletes();
                    if !batch.is_empty() {
                        self.delete_batch(batch).await;
                    }
                    drop(serial);
                    // Ours was in that batch or in an earlier one.
                    rx.await
                }
            };
            match answer {
                Ok(result) => return result,
                // The caller running our batch was cancelled half-way:
                // queue again (deleting twice is harmless). If we are
                // cancelled instead, our queued name is still deleted.
                Err(_) => continue,
            }
        }
    }

    async fn link_exists(&self, name: &str) -> Result<bool, NetError> {
        validate_ifname(name)?;
        link_index(name).map(|i| i.is_some())
    }

    async fn list_links(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        // One netlink exchange at a time: concurrent dumps on the one
        // socket make the kernel answer EBUSY or drop replies (ENOBUFS).
        let _serial = self.serial.lock().await;
        let mut names: Vec<String> = self
            .link_names()
            .await?
            .into_values()
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        Ok(names)
    }

    async fn list_taps(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        // One netlink exchange at a time: concurrent dumps on the one
        // socket make the kernel answer EBUSY or drop replies (ENOBUFS).
        let _serial = self.serial.lock().await;
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("list links", "all links", e))?;
        let mut names: Vec<String> = links
            .iter()
            .filter(|l| not_a_tap(l).is_none())
            .filter_map(link_name)
            .filter(|n| n.starts_with(prefix))
            .map(str::to_owned)
            .collect();
        names.sort();
        Ok(names)
    }

    async fn routes(&self) -> Result<Vec<Route>, NetError> {
        // One netlink exchange at a time: concurrent dumps on the one
        // socket make the kernel answer EBUSY or drop replies (ENOBUFS).
        let _serial = self.serial.lock().await;
        let mut query = RouteMessage::default();
        query.header.address_family = AddressFamily::Inet;
        query.header.table = RouteHeader::RT_TABLE_MAIN;
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("list routes", "main table", e))?;
        let msgs: Vec<RouteMessage> = msgs
            .into_iter()
            .filter(|r| {
                r.header.address_family == AddressFamily::Inet
                    && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
            })
            .collect();
        let names = if msgs.iter().any(|r| route_oif(r).is_some()) {
            self.link_names().await?
        } else {
            HashMap::new()
        };
        Ok(msgs
            .iter()
            .map(|r| Route {
                dst: r
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                        _ => None,
                    })
                    .unwrap_or(Ipv4Addr::UNSPECIFIED),
                prefix_len: r.header.destination_prefix_length,
                oif: route_oif(r).and_then(|i| names.get(&i).cloned()),
            })
            .collect())
    }

    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), NetError> {
        write_sysctl(key, value)
    }

    fn get_sysctl(&self, key: &str) -> Result<String, NetError> {
        let path = sysctl_path(key)?;
        let value = std::fs::read_to_string(&path).map_err(|source| NetError::Sysctl {
            key: key.to_owned(),
            source,
        })?;
        Ok(value.trim_end_matches('\n').to_owned())
    }
}

// ---------------------------------------------------------------------------
// LinuxNet: the connections.

/// How many rtnetlink connections [`LinuxNet`] keeps (module doc).
const CONNECTIONS: usize = 4;

/// The real network host: a few rtnetlink connections for its whole life,
/// all bound to the network namespace of the thread that called
/// [`LinuxNet::new`]. Each tap's requests go to one connection, chosen by
/// its name; deletes and whole-host listings go to the first, so that
/// concurrent deletes still meet in one batch.
#[derive(Debug)]
pub struct LinuxNet {
    conns: Box<[Conn]>,
}

impl LinuxNet {
    /// Opens the connections and spawns their tasks on the current tokio
    /// runtime, which must exist (an error, not a panic, otherwise).
    pub fn new() -> Result<Self, NetError> {
        Ok(Self {
            conns: (0..CONNECTIONS)
                .map(|_| Conn::new())
                .collect::<Result<_, _>>()?,
        })
    }

    /// The connection that carries tap `name`'s requests.
    fn conn(&self, name: &str) -> &Conn {
        let hash = name.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        &self.conns[hash % self.conns.len()]
    }

    /// The connection for deletes and listings.
    fn first(&self) -> &Conn {
        &self.conns[0]
    }
}

#[async_trait]
impl NetHost for LinuxNet {
    async fn create_tap(&self, name: &str) -> Result<(), NetError> {
        self.conn(name).create_tap(name).await
    }

    async fn configure_tap(
        &self,
        name: &str,
        host_addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetError> {
        self.conn(name)
            .configure_tap(name, host_addr, prefix_len)
            .await
    }

    async fn reset_tap(&self, name: &str) -> Result<(), NetError> {
        self.conn(name).reset_tap(name).await
    }

    async fn delete_link(&self, name: &str) -> Result<(), NetError> {
        self.first().delete_link(name).await
    }

    async fn link_exists(&self, name: &str) -> Result<bool, NetError> {
        // An ioctl: no connection is used.
        self.first().link_exists(name).await
    }

    async fn list_links(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        self.first().list_links(prefix).await
    }

    async fn list_taps(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        self.first().list_taps(prefix).await
    }

    async fn routes(&self) -> Result<Vec<Route>, NetError> {
        self.first().routes().await
    }

    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), NetError> {
        self.first().set_sysctl(key, value)
    }

    fn get_sysctl(&self, key: &str) -> Result<String, NetError> {
        self.first().get_sysctl(key)
    }
}

#[cfg(test)]
mod tests {
    //! Against the real kernel, each test in its own throw-away network
    //! namespace; `ip` is used only to set up and observe.

    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::process::Command;

    use serde_json::Value;

    use super::*;
    use crate::host::testns::in_netns;

    /// Runs `f` with a `LinuxNet` inside namespace `hearth-u-<tag>-<pid>`,
    /// on a current-thread runtime on the namespace's thread.
    fn with_net<F>(tag: &'static str, f: impl FnOnce(LinuxNet, String) -> F + Send + 'static)
    where
        F: Future<Output = ()>,
    {
        in_netns(tag, move || {
            let ns = format!("hearth-u-{tag}-{}", std::process::id());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let net = LinuxNet::new().unwrap();
                f(net, ns).await;
            });
        });
    }

    fn ip(ns: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(ns)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn ip_json(ns: &str, args: &[&str]) -> Vec<Value> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = ip(ns, &full);
        if out.trim().is_empty() {
            return Vec::new();
        }
        serde_json::from_str(&out).unwrap()
    }

    /// `addr/prefix` of every address (any family) of `dev`.
    fn addrs(ns: &str, dev: &str) -> Vec<String> {
        ip_json(ns, &["addr", "show", "dev", dev])
            .iter()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect()
    }

    fn routes_via(ns: &str, dev: &str) -> Vec<String> {
        let mut all = ip_json(ns, &["-4", "route", "show", "table", "main", "dev", dev]);
        all.extend(ip_json(
            ns,
            &["-6", "route", "show", "table", "main", "dev", dev],
        ));
        all.iter()
            .map(|r| r["dst"].as_str().unwrap().to_owned())
            .collect()
    }

    fn neighbours(ns: &str, dev: &str) -> Vec<String> {
        ip_json(ns, &["neigh", "show", "dev", dev])
            .iter()
            .map(|n| n["dst"].as_str().unwrap().to_owned())
            .collect()
    }

    fn link(ns: &str, dev: &str) -> Value {
        ip_json(ns, &["-d", "link", "show", "dev", dev]).remove(0)
    }

    fn is_up(ns: &str, dev: &str) -> bool {
        link(ns, dev)["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP")
    }

    const A: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 5);

    #[test]
    fn tap_lifecycle_is_idempotent() {
        with_net("tap", |net, ns| async move {
            let tap = "hthlc0";
            net.create_tap(tap).await.unwrap();
            net.create_tap(tap).await.unwrap();
            assert_eq!(net.list_links("hth").await.unwrap(), [tap]);
            assert!(net.link_exists(tap).await.unwrap());

            // A persistent tap with the flags Firecracker opens it with, still
            // there now that our descriptor is closed. (/sys/class/net shows
            // the namespace sysfs was mounted in, not this thread's, so ask
            // netlink through `ip -d`.)
            let l = link(&ns, tap);
            assert_eq!(l["linkinfo"]["info_kind"], "tun", "{l}");
            let info = &l["linkinfo"]["info_data"];
            assert_eq!(info["type"], "tap", "{l}");
            assert_eq!(info["pi"], false, "{l}");
            assert_eq!(info["vnet_hdr"], true, "{l}");
            assert_eq!(info["persist"], true, "{l}");
            assert!(!is_up(&ns, tap));
            // IPv4 only: no IPv6 address or route will ever be on it.
            let v6 = format!("net.ipv6.conf.{tap}.disable_ipv6");
            assert_eq!(net.get_sysctl(&v6).unwrap(), "1");

            net.configure_tap(tap, A, 30).await.unwrap();
            assert_eq!(addrs(&ns, tap), ["172.16.0.1/30"]);
            assert!(is_up(&ns, tap));
            let first = (addrs(&ns, tap), routes_via(&ns, tap), neighbours(&ns, tap));
            net.configure_tap(tap, A, 30).await.unwrap();
            let second = (addrs(&ns, tap), routes_via(&ns, tap), neighbours(&ns, tap));
            assert_eq!(first, second);
            assert!(is_up(&ns, tap));

            // What others leave on the link goes: a stale neighbour, an extra
            // route, an IPv6 address, the old address.
            ip(
                &ns,
                &[
                    "neigh",
                    "add",
                    "172.16.0.2",
                    "lladdr",
                    "02:00:00:00:00:02",
                    "dev",
                    tap,
                    "nud",
                    "permanent",
                ],
            );
            ip(&ns, &["route", "add", "10.99.0.0/24", "dev", tap]);
            // IPv6 is off on the tap: nobody can leave an address there.
            let v6 = Command::new("ip")
                .args([
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    "fd00:99::1/64",
                    "dev",
                    tap,
                    "nodad",
                ])
                .output()
                .unwrap();
            assert!(!v6.status.success(), "an IPv6 address went onto {tap}");
            assert_eq!(neighbours(&ns, tap), ["172.16.0.2"]);
            assert!(routes_via(&ns, tap).contains(&"10.99.0.0/24".to_owned()));
            net.configure_tap(tap, B, 30).await.unwrap();
            assert_eq!(addrs(&ns, tap), ["172.16.0.5/30"]);
            assert_eq!(routes_via(&ns, tap), ["172.16.0.4/30"]);
            assert!(neighbours(&ns, tap).is_empty());
            assert!(is_up(&ns, tap));

            net.reset_tap(tap).await.unwrap();
            assert!(addrs(&ns, tap).is_empty());
            assert!(routes_via(&ns, tap).is_empty());
            assert!(!is_up(&ns, tap));

            // On a link that is already down, the explicit flushes do the
            // work (the kernel removes nothing by itself).
            ip(&ns, &["addr", "add", "10.98.0.1/24", "dev", tap]);
            ip(
                &ns,
                &[
                    "neigh",
                    "add",
                    "10.98.0.2",
                    "lladdr",
                    "02:00:00:00:00:03",
                    "dev",
                    tap,
                    "nud",
                    "permanent",
                ],
            );
            net.reset_tap(tap).await.unwrap();
            assert!(addrs(&ns, tap).is_empty());
            assert!(neighbours(&ns, tap).is_empty());
            ip(&ns, &["addr", "add", "10.98.0.1/24", "dev", tap]);
            ip(
                &ns,
                &[
                    "neigh",
                    "add",
                    "10.98.0.2",
                    "lladdr",
                    "02:00:00:00:00:03",
                    "dev",
                    tap,
                    "nud",
                    "permanent",
                ],
            );
            net.configure_tap(tap, A, 30).await.unwrap();
            assert_eq!(addrs(&ns, tap), ["172.16.0.1/30"]);
            assert!(neighbours(&ns, tap).is_empty());

            net.delete_link(tap).await.unwrap();
            net.delete_link(tap).await.unwrap();
            assert!(!net.link_exists(tap).await.unwrap());
            assert!(net.list_links("hth").await.unwrap().is_empty());
            // Absent is success for a reset, an error for a configure.
            net.reset_tap(tap).await.unwrap();
            let err = net.configure_tap(tap, A, 30).await.unwrap_err();
            assert!(matches!(err, NetError::Netlink { .. }), "{err:?}");
        });
    }

    #[test]
    fn a_name_taken_by_a_non_tap_is_refused_clearly() {
        with_net("veth", |net, ns| async move {
            ip(
                &ns,
                &[
                    "link", "add", "hthva0", "type", "veth", "peer", "name", "hthvb0",
                ],
            );
            let err = net.create_tap("hthva0").await.unwrap_err();
            let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
            assert!(
                chain.contains("not a tap") && chain.contains("veth"),
                "{chain}"
            );
            assert_eq!(link(&ns, "hthva0")["linkinfo"]["info_kind"], "veth");

            // A tun (layer 3) of that name is no tap either.
            ip(&ns, &["tuntap", "add", "dev", "hthtun0", "mode", "tun"]);
            let err = net.create_tap("hthtun0").await.unwrap_err();
            let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
            assert!(chain.contains("tun (layer 3)"), "{chain}");

            net.delete_link("hthva0").await.unwrap();
            net.delete_link("hthtun0").await.unwrap();
            assert!(net.list_links("hth").await.unwrap().is_empty());
        });
    }

    #[test]
    fn a_tap_held_open_by_a_vmm_is_already_created() {
        with_net("busy", |net, ns| async move {
            let tap = "hthbusy0";
            net.create_tap(tap).await.unwrap();
            // Hold the tap open as Firecracker would; creating it again is
            // still success.
            let fd = rustix::fs::open(
                "/dev/net/tun",
                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .unwrap();
            // SAFETY: as in `tun_create_persistent`.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in ifr.ifr_name.iter_mut().zip(tap.bytes()) {
                *d = s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
            // SAFETY: valid descriptor and a valid `ifreq` outliving the call.
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
            net.create_tap(tap).await.unwrap();

            // With a carrier, the kernel gives the tap an IPv6 link-local
            // address when it comes up; configuring twice must still leave
            // the same state (hence the down before the flush).
            net.configure_tap(tap, A, 30).await.unwrap();
            let first = (addrs(&ns, tap), routes_via(&ns, tap));
            assert!(first.0.contains(&"172.16.0.1/30".to_owned()), "{first:?}");
            net.configure_tap(tap, A, 30).await.unwrap();
            assert_eq!((addrs(&ns, tap), routes_via(&ns, tap)), first);
            eprintln!("configured with a carrier: {first:?}");
            drop(fd);
            net.delete_link(tap).await.unwrap();
        });
    }

    #[test]
    fn invalid_input_is_refused_before_the_kernel() {
        with_net("inval", |net, _ns| async move {
            for bad in ["eth0", "hth-0", "hth0.1", "hth0123456789abc", "", "hth0/x"] {
                let err = net.create_tap(bad).await.unwrap_err();
                assert!(matches!(err, NetError::Invalid { .. }), "{bad}: {err:?}");
                let err = net.configure_tap(bad, A, 30).await.unwrap_err();
                assert!(matches!(err, NetError::Invalid { .. }), "{bad}: {err:?}");
                let err = net.reset_tap(bad).await.unwrap_err();
                assert!(matches!(err, NetError::Invalid { .. }), "{bad}: {err:?}");
            }
            for bad in ["lo", "eth0", ""] {
                let err = net.delete_link(bad).await.unwrap_err();
                assert!(matches!(err, NetError::Invalid { .. }), "{bad}: {err:?}");
            }
            for (addr, len) in [
                (A, 0),
                (A, 33),
                (Ipv4Addr::UNSPECIFIED, 24),
                (Ipv4Addr::BROADCAST, 24),
                (Ipv4Addr::new(224, 0, 0, 1), 24),
            ] {
                let err = net.configure_tap("hthx0", addr, len).await.unwrap_err();
                assert!(matches!(err, NetError::Invalid { .. }), "{err:?}");
            }
            for bad in [
                "",
                "net..ipv4",
                "net/ipv4/ip_forward",
                "../etc",
                "net.ipv4.ip forward",
            ] {
                let err = net.get_sysctl(bad).unwrap_err();
                assert!(matches!(err, NetError::Invalid { .. }), "{bad}: {err:?}");
            }
            let err = net.set_sysctl("net.ipv4.ip_forward", "1\n0").unwrap_err();
            assert!(matches!(err, NetError::Invalid { .. }), "{err:?}");
            // Nothing reached the kernel.
            assert!(net.list_links("hth").await.unwrap().is_empty());
            assert!(net.link_exists("lo").await.unwrap());
            assert!(!net.link_exists("hthnone0").await.unwrap());
        });
    }

    #[test]
    fn routes_lists_the_main_table_with_the_default_route() {
        with_net("routes", |net, ns| async move {
            let tap = "hthrt0";
            assert!(net.routes().await.unwrap().is_empty());
            net.create_tap(tap).await.unwrap();
            net.configure_tap(tap, A, 30).await.unwrap();
            ip(
                &ns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    "172.16.0.2",
                    "dev",
                    tap,
                    "onlink",
                ],
            );
            let mut routes = net.routes().await.unwrap();
            routes.sort_by_key(|r| r.prefix_len);
            assert_eq!(
                routes,
                [
                    Route {
                        dst: Ipv4Addr::UNSPECIFIED,
                        prefix_len: 0,
                        oif: Some(tap.into()),
                    },
                    Route {
                        dst: Ipv4Addr::new(172, 16, 0, 0),
                        prefix_len: 30,
                        oif: Some(tap.into()),
                    },
                ]
            );
            // Local-table routes (the tap's own address) are not listed.
            net.reset_tap(tap).await.unwrap();
            assert!(net.routes().await.unwrap().is_empty());
            net.delete_link(tap).await.unwrap();
        });
    }

    #[test]
    fn sysctl_round_trip_is_per_namespace() {
        with_net("sysctl", |net, _ns| async move {
            let key = "net.ipv4.ip_forward";
            assert_eq!(net.get_sysctl(key).unwrap(), "0");
            net.set_sysctl(key, "1").unwrap();
            assert_eq!(net.get_sysctl(key).unwrap(), "1");
            net.set_sysctl(key, "0").unwrap();
            assert_eq!(net.get_sysctl(key).unwrap(), "0");
            let err = net.get_sysctl("net.ipv4.no_such_key").unwrap_err();
            assert!(matches!(err, NetError::Sysctl { .. }), "{err:?}");
        });
    }

    /// The group `dev` is in, as `ip` shows it ("default" or a number).
    fn group(ns: &str, dev: &str) -> String {
        link(ns, dev)["group"].as_str().unwrap().to_owned()
    }

    /// Names of the links in [`DELETE_GROUP`]. (`ip -j` prints an empty
    /// object for each link the group filter leaves out.)
    fn in_delete_group(ns: &str) -> Vec<String> {
        ip_json(ns, &["link", "show", "group", &DELETE_GROUP.to_string()])
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
            .collect()
    }

    /// Polls `f` once, with the calling task's waker.
    async fn poll_once<F: Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
        std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx)))
            .await
    }

    #[test]
    fn concurrent_deletes_take_only_what_was_asked() {
        with_net("batch", |net, ns| async move {
            let keep = "hthkeep0";
            net.create_tap(keep).await.unwrap();
            let names: Vec<String> = (0..40).map(|i| format!("hthb{i}")).collect();
            for n in &names {
                net.create_tap(n).await.unwrap();
            }
            let results =
                futures_util::future::join_all(names.iter().map(|n| net.delete_link(n))).await;
            for (n, r) in names.iter().zip(results) {
                r.unwrap_or_else(|e| panic!("{n}: {e:?}"));
            }
            assert_eq!(net.list_links("hth").await.unwrap(), [keep]);
            assert_eq!(group(&ns, keep), "default");
            assert!(in_delete_group(&ns).is_empty());
            net.delete_link(keep).await.unwrap();
            assert!(net.list_links("hth").await.unwrap().is_empty());
        });
    }

    #[test]
    fn deleting_a_missing_link_in_a_batch_is_success() {
        with_net("batchgone", |net, _ns| async move {
            let real = ["hthr0", "hthr1", "hthr2", "hthr3"];
            for n in real {
                net.create_tap(n).await.unwrap();
            }
            let asked = ["hthnone0", "hthr0", "hthr1", "hthnone1", "hthr2", "hthr3"];
            let results =
                futures_util::future::join_all(asked.iter().map(|n| net.delete_link(n))).await;
            for (n, r) in asked.iter().zip(results) {
                r.unwrap_or_else(|e| panic!("{n}: {e:?}"));
            }
            assert!(net.list_links("hth").await.unwrap().is_empty());
        });
    }

    #[test]
    fn a_failed_group_delete_falls_back_to_one_by_one() {
        with_net("fallback", |net, ns| async move {
            // `lo` has no rtnl_link_ops, so with it in the group the kernel
            // refuses to delete the group at all (EOPNOTSUPP).
            let group_arg = DELETE_GROUP.to_string();
            ip(&ns, &["link", "set", "lo", "group", &group_arg]);
            let names = ["hthf0", "hthf1", "hthf2", "hthf3"];
            for n in names {
                net.create_tap(n).await.unwrap();
            }
            let asked = ["hthf0", "hthf1", "hthnone0", "hthf2", "hthf3"];
            let results =
                futures_util::future::join_all(asked.iter().map(|n| net.delete_link(n))).await;
            for (n, r) in asked.iter().zip(results) {
                r.unwrap_or_else(|e| panic!("{n}: {e:?}"));
            }
            assert!(net.list_links("hth").await.unwrap().is_empty());
            assert_eq!(in_delete_group(&ns), ["lo"]);
            ip(&ns, &["link", "set", "lo", "group", "default"]);
        });
    }

    #[test]
    fn a_lone_delete_works() {
        with_net("lone", |net, _ns| async move {
            net.create_tap("hthl0").await.unwrap();
            net.delete_link("hthl0").await.unwrap();
            assert!(!net.link_exists("hthl0").await.unwrap());
            net.delete_link("hthl0").await.unwrap();
        });
    }

    #[test]
    fn taps_spread_over_the_connections_and_configure_side_by_side() {
        with_net("spread", |net, ns| async move {
            // Pool names land on every connection, and one name always on
            // the same one.
            let names: Vec<String> = (0..8).map(crate::store::tap_name).collect();
            let used: std::collections::HashSet<*const Conn> = names
                .iter()
                .map(|n| std::ptr::from_ref(net.conn(n)))
                .collect();
            assert_eq!(used.len(), CONNECTIONS, "{names:?}");
            assert!(std::ptr::eq(net.conn("hth3"), net.conn("hth3")));
            // Eight taps made, configured and reset at once, across the
            // connections: each ends exactly as asked.
            let ip = |i: u8| Ipv4Addr::new(172, 16, 0, 4 * i + 1);
            let work = names.iter().zip(0u8..).map(|(n, i)| {
                let net = &net;
                async move {
                    net.create_tap(n).await.unwrap();
                    net.configure_tap(n, ip(i), 30).await.unwrap();
                }
            });
            futures_util::future::join_all(work).await;
            for (n, i) in names.iter().zip(0u8..) {
                assert_eq!(addrs(&ns, n), [format!("{}/30", ip(i))], "{n}");
                assert!(is_up(&ns, n), "{n}");
            }
            futures_util::future::join_all(names.iter().map(|n| net.reset_tap(n))).await;
            for n in &names {
                assert!(addrs(&ns, n).is_empty(), "{n}");
                assert!(!is_up(&ns, n), "{n}");
            }
            let deletes = futures_util::future::join_all(names.iter().map(|n| net.delete_link(n)));
            for r in deletes.await {
                r.unwrap();
            }
            assert!(net.list_links("hth").await.unwrap().is_empty());
        });
    }

    #[test]
    fn a_cancelled_batch_leaves_the_other_callers_answered() {
        with_net("cancel", |net, ns| async move {
            let names = ["hthc0", "hthc1", "hthc2"];
            for n in names {
                net.create_tap(n).await.unwrap();
            }
            // All three queue their names while the socket is busy.
            let busy = net.first().serial.lock().await;
            let mut a = net.delete_link(names[0]);
            let mut b = net.delete_link(names[1]);
            let mut c = net.delete_link(names[2]);
            assert!(poll_once(&mut a).await.is_pending());
            assert!(poll_once(&mut b).await.is_pending());
            assert!(poll_once(&mut c).await.is_pending());
            drop(busy);
            // `a` gets the socket, takes all three and starts the batch;
            // then its caller gives up.
            assert!(poll_once(&mut a).await.is_pending());
            drop(a);
            let (rb, rc) = futures_util::future::join(b, c).await;
            rb.unwrap();
            rc.unwrap();
            assert!(!net.link_exists(names[1]).await.unwrap());
            assert!(!net.link_exists(names[2]).await.unwrap());
            // hthc0 may be left in the group, as after a crash; deleting it
            // again finishes the job.
            eprintln!("after the cancelled batch: {:?}", in_delete_group(&ns));
            net.delete_link(names[0]).await.unwrap();
            assert!(net.list_links("hth").await.unwrap().is_empty());
        });
    }

    #[test]
    fn a_tap_left_in_the_delete_group_is_taken_out_on_reuse() {
        with_net("leftover", |net, ns| async move {
            let (left, other) = ("hthleft0", "hthoth0");
            net.create_tap(left).await.unwrap();
            net.create_tap(other).await.unwrap();
            ip(
                &ns,
                &["link", "set", left, "group", &DELETE_GROUP.to_string()],
            );
            net.reset_tap(left).await.unwrap();
            assert_eq!(group(&ns, left), "default");
            ip(
                &ns,
                &["link", "set", left, "group", &DELETE_GROUP.to_string()],
            );
            net.configure_tap(left, A, 30).await.unwrap();
            assert_eq!(group(&ns, left), "default");
            // A later batch of deletes leaves it alone.
            let (r1, r2) =
                futures_util::future::join(net.delete_link(other), net.delete_link("hthnone0"))
                    .await;
            r1.unwrap();
            r2.unwrap();
            assert_eq!(net.list_links("hth").await.unwrap(), [left]);
            net.delete_link(left).await.unwrap();
        });
    }

    #[test]
    fn new_outside_a_runtime_is_an_error() {
        let err = LinuxNet::new().unwrap_err();
        assert!(err.to_string().contains("tokio runtime"), "{err}");
    }
}
