//! nf_tables over netlink: the few messages hearth's firewall needs,
//! encoded by hand and sent on one long-lived `NETLINK_NETFILTER` socket.
//!
//! Why not the `nft` binary: a process per transaction cost ~20 ms (spawn,
//! a fetch of every chain and set into nft's cache, which grows with the
//! number of VMs, and a wait for an RCU grace period when nft closes its
//! socket), two-thirds of a VM start. Here a transaction is one `sendmsg`
//! of a batch and one non-blocking drain of the answers.
//!
//! Why not a crate: `rustables` is GPL-3.0 (hearth is Apache-2.0), `nftnl`
//! binds the GPL libnftnl, and the pure-Rust alternatives are early-stage.
//! The wire format is small and stable (`linux/netfilter/nf_tables.h`);
//! the encodings here were checked against what `nft --debug=netlink,mnl`
//! 1.0.6 sends for the same rules, and the tests of [`super::nft`] read
//! every object back through `nft list` and `nft --debug=netlink list`.
//!
//! # Batches and errors
//!
//! A batch is `NFNL_MSG_BATCH_BEGIN`, the messages, `NFNL_MSG_BATCH_END`, in
//! one datagram; the kernel applies it as one transaction, all or nothing.
//! It processes the batch synchronously inside `sendmsg`, so by the time
//! that returns every answer is queued on the socket. Messages are sent
//! without `NLM_F_ACK`: a message that succeeds says nothing and one that
//! fails is answered with an error carrying its sequence number, which
//! names the message (and `NETLINK_EXT_ACK` adds the kernel's reason). A
//! failed commit is answered the same way. No answer means committed.

use std::io;

use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};

/// `NFNL_SUBSYS_NFTABLES`.
const SUBSYS: u16 = 10;
/// `NFNL_MSG_BATCH_BEGIN`, `NFNL_MSG_BATCH_END`.
const BATCH_BEGIN: u16 = 0x10;
const BATCH_END: u16 = 0x11;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
/// `NLMSGERR_ATTR_MSG`: the extended ack's text.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// `NLM_F_ACK_TLVS` on an error message: extended ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;

/// `NFPROTO_IPV4`: hearth's table is in the `ip` family.
pub const FAMILY_IP: u8 = 2;

/// `enum nf_tables_msg_types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    NewTable = 0,
    NewChain = 3,
    GetChain = 4,
    NewRule = 6,
    DelRule = 8,
    NewSet = 9,
    NewSetElem = 12,
    GetSetElem = 13,
    DelSetElem = 14,
}

/// Attribute numbers, by object (`linux/netfilter/nf_tables.h`).
pub mod attr {
    pub const TABLE_NAME: u16 = 1;
    pub const TABLE_FLAGS: u16 = 2;

    pub const CHAIN_TABLE: u16 = 1;
    pub const CHAIN_NAME: u16 = 3;
    pub const CHAIN_HOOK: u16 = 4;
    pub const CHAIN_POLICY: u16 = 5;
    pub const CHAIN_TYPE: u16 = 7;
    pub const HOOK_HOOKNUM: u16 = 1;
    pub const HOOK_PRIORITY: u16 = 2;

    pub const RULE_TABLE: u16 = 1;
    pub const RULE_CHAIN: u16 = 2;
    pub const RULE_EXPRESSIONS: u16 = 4;

    pub const SET_TABLE: u16 = 1;
    pub const SET_NAME: u16 = 2;
    pub const SET_FLAGS: u16 = 3;
    pub const SET_KEY_TYPE: u16 = 4;
    pub const SET_KEY_LEN: u16 = 5;
    pub const SET_DATA_TYPE: u16 = 6;
    pub const SET_DATA_LEN: u16 = 7;
    pub const SET_ID: u16 = 10;
    pub const SET_USERDATA: u16 = 13;

    pub const SET_ELEM_LIST_TABLE: u16 = 1;
    pub const SET_ELEM_LIST_SET: u16 = 2;
    pub const SET_ELEM_LIST_ELEMENTS: u16 = 3;
    pub const SET_ELEM_KEY: u16 = 1;
    pub const SET_ELEM_DATA: u16 = 2;
    pub const SET_ELEM_USERDATA: u16 = 6;

    pub const LIST_ELEM: u16 = 1;
    pub const EXPR_NAME: u16 = 1;
    pub const EXPR_DATA: u16 = 2;
    pub const DATA_VALUE: u16 = 1;
    pub const DATA_VERDICT: u16 = 2;
    pub const VERDICT_CODE: u16 = 1;
}

/// A netlink attribute stream under construction.
#[derive(Debug, Default, Clone)]
pub struct Attrs(Vec<u8>);

impl Attrs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends attribute `ty` with `value`, padded to 4 bytes.
    pub fn bytes(&mut self, ty: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        // Attribute lengths are u16; every value here is a few bytes.
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.pad();
        self
    }

    /// A NUL-terminated string, as the kernel's `NLA_STRING`/`NLA_NUL_STRING`.
    pub fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.bytes(ty, &v)
    }

    /// A big-endian u32, as nf_tables wants its numbers.
    pub fn be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    /// A nested attribute built by `f`.
    pub fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let start = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        f(self);
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.0[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
}

/// One nf_tables message of a batch.
#[derive(Debug, Clone)]
pub struct Msg {
    pub kind: Kind,
    /// `NLM_F_*` beyond `NLM_F_REQUEST`.
    pub flags: u16,
    pub attrs: Attrs,
    /// What the message does, for errors: `add chain vm-ab12-fwd`.
    pub what: String,
}

impl Msg {
    /// A create message (`NLM_F_CREATE`, and `NLM_F_APPEND` for rules): an
    /// existing table, chain, set or identical element is not an error.
    pub fn add(kind: Kind, what: String, attrs: Attrs) -> Self {
        let append = if kind == Kind::NewRule {
            NLM_F_APPEND
        } else {
            0
        };
        Self {
            kind,
            flags: NLM_F_CREATE | append,
            attrs,
            what,
        }
    }

    /// A delete (or flush) message.
    pub fn del(kind: Kind, what: String, attrs: Attrs) -> Self {
        Self {
            kind,
            flags: 0,
            attrs,
            what,
        }
    }
}

/// Why a batch failed: the first message the kernel refused.
#[derive(Debug)]
pub struct Refused {
    /// The refused message's `what`, or `commit`.
    pub what: String,
    pub error: io::Error,
    /// The kernel's extended-ack text, when it gave one.
    pub detail: Option<String>,
}

impl Refused {
    pub fn errno(&self) -> Option<i32> {
        self.error.raw_os_error()
    }
}

/// One netlink message received: type, flags, sequence, payload after
/// the `nfgenmsg` header (or the raw payload for errors).
struct Received<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits a datagram into netlink messages.
fn messages(buf: &[u8]) -> impl Iterator<Item = Received<'_>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < 16 || len > rest.len() {
            return None;
        }
        let msg = Received {
            ty: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: u32::from_ne_bytes(rest[8..12].try_into().ok()?),
            payload: &rest[16..len],
        };
        let aligned = (len + 3) & !3;
        rest = &rest[aligned.min(rest.len())..];
        Some(msg)
    })
}

/// Iterates the attributes of `buf`: (type without flags, value).
pub fn parse_attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        let value = &rest[4..len];
        let aligned = (len + 3) & !3;
        rest = &rest[aligned.min(rest.len())..];
        Some((ty, value))
    })
}

/// The first attribute `ty` of `buf`.
pub fn find_attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    parse_attrs(buf).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// A NUL-terminated string attribute's text.
pub fn attr_str(value: &[u8]) -> String {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

/// The long-lived socket. Not shared between threads: its owner sends a
/// batch and reads the answers before anything else is sent.
pub struct NfSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for NfSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfSocket").field("seq", &self.seq).finish()
    }
}

impl NfSocket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.set_ext_ack(true)?;
        sock.set_cap_ack(true)?;
        // Room for large batches (concurrent starts sent as one) and dumps.
        set_buffer(&sock, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 8 << 20);
        set_buffer(&sock, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 8 << 20);
        Ok(Self {
            sock,
            seq: 1,
            buf: vec![0; 64 << 10],
        })
    }

    fn next_seq(&mut self, n: u32) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(n).max(1);
        s
    }

    /// Sends `msgs` as one transaction.
    pub fn batch(&mut self, msgs: &[Msg]) -> Result<(), Refused> {
        if msgs.is_empty() {
            return Ok(());
        }
        let count = u32::try_from(msgs.len()).unwrap_or(u32::MAX);
        let base = self.next_seq(count + 2);
        let mut out = Vec::with_capacity(64 * msgs.len());
        push_msg(&mut out, BATCH_BEGIN, NLM_F_REQUEST, base, 0, SUBSYS, &[]);
        for (i, m) in msgs.iter().enumerate() {
            push_msg(
                &mut out,
                (SUBSYS << 8) | m.kind as u16,
                NLM_F_REQUEST | m.flags,
                base.wrapping_add(1 + i as u32),
                FAMILY_IP,
                0,
                &m.attrs.0,
            );
        }
        push_msg(
            &mut out,
            BATCH_END,
            NLM_F_REQUEST,
            base.wrapping_add(count + 1),
            0,
            SUBSYS,
            &[],
        );
        let refused = |what: String, error: io::Error| Refused {
            what,
            error,
            detail: None,
        };
        self.drain_stale();
        self.sock
            .send(&out, 0)
            .map_err(|e| refused("send batch".into(), e))?;

        // Everything was answered inside sendmsg: drain without blocking.
        let mut first_error: Option<Refused> = None;
        loop {
            let n = match self.recv(libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    first_error.get_or_insert(refused("read answers".into(), e));
                    break;
                }
            };
            for m in messages(&self.buf[..n]) {
                let index = m.seq.wrapping_sub(base);
                if index > count + 1 {
                    continue; // not this batch's
                }
                let what = || match index.checked_sub(1).and_then(|i| msgs.get(i as usize)) {
                    Some(msg) => msg.what.clone(),
                    None => "commit".into(),
                };
                if m.ty == NLMSG_ERROR
                    && first_error.is_none()
                    && let Some(r) = parse_error(m.payload, m.flags, what())
                {
                    first_error = Some(r);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Dumps objects of `kind` (`GET*` with `NLM_F_DUMP`), filtered by
    /// `attrs`; returns each answer's attributes. Retries when the ruleset
    /// changed during the dump (`NLM_F_DUMP_INTR`).
    pub fn dump(&mut self, kind: Kind, attrs: &Attrs) -> Result<Vec<Vec<u8>>, Refused> {
        let what = format!("dump {kind:?}");
        let fail = |error| Refused {
            what: what.clone(),
            error,
            detail: None,
        };
        for _ in 0..10 {
            let seq = self.request(kind, NLM_F_DUMP, attrs).map_err(fail)?;
            let mut objects = Vec::new();
            let mut interrupted = false;
            'recv: loop {
                let n = self.recv(0).map_err(fail)?;
                for m in messages(&self.buf[..n]) {
                    if m.seq != seq {
                        continue;
                    }
                    interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
                    match m.ty {
                        NLMSG_DONE => break 'recv,
                        NLMSG_ERROR => {
                            if let Some(r) = parse_error(m.payload, m.flags, what.clone()) {
                                // The table or set is not there: nothing to list.
                                if r.errno() == Some(libc::ENOENT) {
                                    return Ok(Vec::new());
                                }
                                return Err(r);
                            }
                            break 'recv;
                        }
                        _ if m.payload.len() >= 4 => objects.push(m.payload[4..].to_vec()),
                        _ => {}
                    }
                    if m.flags & NLM_F_MULTI == 0 {
                        break 'recv;
                    }
                }
            }
            if !interrupted {
                return Ok(objects);
            }
        }
        Err(Refused {
            what,
            error: io::Error::from_raw_os_error(libc::EINTR),
            detail: Some("the ruleset kept changing during the dump".into()),
        })
    }

    /// Asks for specific objects (`GET*` without `NLM_F_DUMP`, with an
    /// ack); returns each answer's attributes. Absent objects are refused
    /// with ENOENT.
    pub fn get(&mut self, kind: Kind, attrs: &Attrs) -> Result<Vec<Vec<u8>>, Refused> {
        const NLM_F_ACK: u16 = 0x4;
        let fail = |error| Refused {
            what: format!("get {kind:?}"),
            error,
            detail: None,
        };
        let seq = self.request(kind, NLM_F_ACK, attrs).map_err(fail)?;
        let mut objects = Vec::new();
        loop {
            let n = self.recv(0).map_err(fail)?;
            for m in messages(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                if m.ty == NLMSG_ERROR {
                    // The ack (or the error) comes last.
                    return match parse_error(m.payload, m.flags, format!("get {kind:?}")) {
                        Some(r) => Err(r),
                        None => Ok(objects),
                    };
                }
                if m.payload.len() >= 4 {
                    objects.push(m.payload[4..].to_vec());
                }
            }
        }
    }

    /// Sends one `GET*` request of `kind` with `flags`; returns its
    /// sequence number.
    fn request(&mut self, kind: Kind, flags: u16, attrs: &Attrs) -> io::Result<u32> {
        let seq = self.next_seq(1);
        let mut out = Vec::new();
        push_msg(
            &mut out,
            (SUBSYS << 8) | kind as u16,
            NLM_F_REQUEST | flags,
            seq,
            FAMILY_IP,
            0,
            &attrs.0,
        );
        self.drain_stale();
        self.sock.send(&out, 0)?;
        Ok(seq)
    }

    /// One datagram into `buf` (`recv` with `flags`), retried when a
    /// signal interrupts it; its length.
    fn recv(&mut self, flags: libc::c_int) -> io::Result<usize> {
        loop {
            match self.sock.recv(&mut &mut self.buf[..], flags) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Discards anything left on the socket (answers to an earlier batch
    /// that arrived late cannot happen, but a stray one must not be read
    /// as this batch's).
    fn drain_stale(&mut self) {
        while let Ok(n) = self.recv(libc::MSG_DONTWAIT) {
            if n == 0 {
                break;
            }
        }
    }
}

/// An `NLMSG_ERROR` payload: `None` for an ack (error 0).
fn parse_error(payload: &[u8], flags: u16, what: String) -> Option<Refused> {
    let code = i32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?);
    if code == 0 {
        return None;
    }
    // With NETLINK_CAP_ACK the original header (16 bytes) follows, then
    // the extended-ack attributes.
    let detail = (flags & NLM_F_ACK_TLVS != 0)
        .then(|| payload.get(20..))
        .flatten()
        .and_then(|tlvs| find_attr(tlvs, NLMSGERR_ATTR_MSG))
        .map(attr_str);
    Some(Refused {
        what,
        error: io::Error::from_raw_os_error(-code),
        detail,
    })
}

/// Appends one netlink message with an `nfgenmsg` header.
fn push_msg(
    out: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = 16 + 4 + attrs.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, resource id (big-endian).
    out.push(family);
    out.push(0);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(attrs);
}

/// Raises a socket buffer: the privileged option first (past the sysctl
/// limit), else the plain one. Best effort: the default still works for
/// batches of a few VMs.
fn set_buffer(sock: &Socket, force: libc::c_int, plain: libc::c_int, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    for opt in [force, plain] {
        // SAFETY: setsockopt with a valid fd, level, option and an int.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn attributes_are_padded_and_nested() {
        let mut a = Attrs::new();
        a.str(1, "hearth").nest(4, |n| {
            n.be32(1, 2).be32(2, 0);
        });
        let bytes = &a.0;
        // "hearth\0" is 7 bytes: 11 with the header, padded to 12.
        assert_eq!(&bytes[0..4], &[11, 0, 1, 0]);
        assert_eq!(&bytes[4..11], b"hearth\0");
        assert_eq!(bytes[11], 0);
        assert_eq!(&bytes[12..16], &[20, 0, 4, 0x80]);
        let parsed: Vec<_> = parse_attrs(bytes).collect();
        assert_eq!(parsed.len(), 2);
        assert_eq!(attr_str(parsed[0].1), "hearth");
        let inner: Vec<_> = parse_attrs(parsed[1].1).collect();
        assert_eq!(inner, [(1, &[0, 0, 0, 2][..]), (2, &[0, 0, 0, 0][..])]);
    }

    #[test]
    fn an_error_names_its_message() {
        // errno -17, the original header, then NLMSGERR_ATTR_MSG.
        let mut payload = (-17i32).to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; 16]);
        let mut tlv = Attrs::new();
        tlv.str(NLMSGERR_ATTR_MSG, "element exists");
        payload.extend_from_slice(&tlv.0);
        let r = parse_error(&payload, NLM_F_ACK_TLVS, "add element".into()).unwrap();
        assert_eq!(r.errno(), Some(libc::EEXIST));
        assert_eq!(r.detail.as_deref(), Some("element exists"));
        assert!(parse_error(&0i32.to_ne_bytes(), 0, String::new()).is_none());
    }
}
