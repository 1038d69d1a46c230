//! The guest's network stack, played by the stand-in on the tap it holds.
//!
//! Why: hearth's integration tests need real traffic through the taps, NAT
//! and port forwards hearth sets up, and no guest can boot where they run.
//! So after InstanceStart, when the kernel command line has an `ip=`
//! argument and a network interface is configured, the stand-in answers on
//! that tap the way a small Linux guest would: a userspace TCP/IP stack
//! ([`smoltcp`]) with the guest's MAC and the static address, netmask and
//! default gateway of `ip=` (read as Linux's `ipconfig` reads it), which
//! - answers ARP and ICMP echo (ping),
//! - echoes TCP and UDP on port 7, and
//! - on a TCP echo connection, takes the line `CONNECT <ip>:<port>\n` as a
//!   command: it opens one outbound TCP connection to `<ip>:<port>`, sends
//!   `hello from <guest-ip>\n`, reads one line, closes, and answers
//!   `OK <line>\n` or `ERR <reason>\n` (3 s timeout), so a test can see
//!   what source address the guest's traffic leaves the host with.
//!
//! The tap was opened with `IFF_VNET_HDR` and a 12-byte header (see
//! [`crate::tap`]), so every frame read carries a `virtio_net_hdr_v1` to
//! strip and every frame written gets a zeroed one (no offloads), exactly
//! what Firecracker's virtio-net device exchanges with the tap.
//!
//! The stack runs as one task on the API server's current-thread runtime:
//! it sleeps until the tap is readable or smoltcp's next timer is due, so a
//! thousand idle stand-ins cost no CPU, and its buffers are a few KiB.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::vmm::Vmm;

/// `size_of::<virtio_net_hdr_v1>()`, the header size set on the tap.
const VNET_HDR_LEN: usize = 12;
/// Ethernet header in front of each IP packet.
const ETH_HDR_LEN: usize = 14;
/// The echo service's port (RFC 862).
pub const ECHO_PORT: u16 = 7;
/// Concurrent TCP echo connections.
const TCP_ECHO_SOCKETS: usize = 4;
/// Each TCP socket's receive and transmit buffer.
const TCP_BUF: usize = 4096;
/// The UDP echo socket's receive and transmit payload buffers.
const UDP_BUF: usize = 4096;
/// Datagrams each UDP buffer can hold.
const UDP_PACKETS: usize = 8;
/// Longest `CONNECT` line, and longest reply line read on its connection.
const MAX_LINE: usize = 256;
/// How long a `CONNECT` may take in all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_PREFIX: &[u8] = b"CONNECT ";

/// The static configuration of Linux's `ip=` kernel argument
/// (`ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// The guest's address.
    pub client: Ipv4Addr,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Netmask as a prefix length.
    pub prefix_len: u8,
    /// Interface name (`eth0`, …); `None` for "the first one".
    pub device: Option<String>,
}

/// Reads the last `ip=` argument of the kernel parameters as Linux does:
/// `None` when there is none (or it is `off`/`none`), an error when it asks
/// for autoconfiguration (not emulated) or does not parse. Fields past the
/// device are ignored, missing ones are empty, an empty netmask is the
/// address's classful one.
pub fn ip_config(params: &str) -> Option<Result<IpConfig, String>> {
    let value = params
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix("ip="))
        .next_back()?;
    match value {
        "off" | "none" => None,
        "on" | "any" | "dhcp" | "bootp" | "rarp" | "both" => Some(Err(format!(
            "ip={value}: autoconfiguration is not emulated; give a static address"
        ))),
        _ => Some(parse_static(value)),
    }
}

fn parse_static(value: &str) -> Result<IpConfig, String> {
    let fields: Vec<&str> = value.split(':').collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or("");
    let addr = |i: usize, what: &str| -> Result<Option<Ipv4Addr>, String> {
        match field(i) {
            "" => Ok(None),
            f => f
                .parse::<Ipv4Addr>()
                .map(|a| (!a.is_unspecified()).then_some(a))
                .map_err(|_| format!("ip=: bad {what} {f:?}")),
        }
    };
    let client = addr(0, "client address")?
        .ok_or_else(|| "ip=: no client address (autoconfiguration is not emulated)".to_owned())?;
    let gateway = addr(2, "gateway")?;
    let prefix_len = match addr(3, "netmask")? {
        Some(mask) => {
            let bits = mask.to_bits();
            if bits.leading_ones() + bits.trailing_zeros() != 32 {
                return Err(format!("ip=: netmask {mask} is not contiguous"));
            }
            bits.leading_ones() as u8
        }
        None => match client.octets()[0] {
            0..=127 => 8,
            128..=191 => 16,
            _ => 24,
        },
    };
    let device = Some(field(5)).filter(|d| !d.is_empty()).map(str::to_owned);
    Ok(IpConfig {
        client,
        gateway,
        prefix_len,
        device,
    })
}

/// What the guest's network is to be: the `ip=` configuration bound to a
/// configured interface and its tap.
#[derive(Debug)]
pub struct GuestNet {
    name: String,
    ip: IpConfig,
    mac: [u8; 6],
    mtu: u16,
    tap: File,
}

/// The guest network a started VM gets: `None` without an `ip=` argument
/// or without network interfaces, an error (for the console) when `ip=`
/// is unusable or names a device that does not exist.
pub fn plan(vmm: &Vmm) -> Option<Result<GuestNet, String>> {
    vmm.net_devices().next()?;
    let ip = match ip_config(vmm.kernel_params())? {
        Ok(ip) => ip,
        Err(e) => return Some(Err(e)),
    };
    let index = match ip.device.as_deref() {
        None => 0,
        Some(d) => match d.strip_prefix("eth").and_then(|n| n.parse::<usize>().ok()) {
            Some(i) => i,
            None => return Some(Err(format!("ip=: no network device {d:?}"))),
        },
    };
    let name = format!("eth{index}");
    let Some((cfg, tap)) = vmm.net_devices().nth(index) else {
        return Some(Err(format!("ip=: no network device {name}")));
    };
    let tap = match tap.try_clone() {
        Ok(t) => t,
        Err(e) => return Some(Err(format!("cannot use tap {}: {e}", cfg.host_dev_name))),
    };
    // Without a configured MAC, Linux's virtio-net picks a random one.
    let mac = cfg.guest_mac.map_or_else(random_mac, |m| m.octets());
    Some(Ok(GuestNet {
        name,
        ip,
        mac,
        mtu: cfg.mtu.unwrap_or(1500),
        tap,
    }))
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// A random locally administered unicast MAC.
fn random_mac() -> [u8; 6] {
    let b = seed().to_le_bytes();
    [(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

impl GuestNet {
    /// The console line announcing the interface.
    pub fn banner(&self) -> String {
        let m = self.mac;
        format!(
            "hearth-testvmm: guest network {} {}/{} gw {} mac \
             {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}: up\n",
            self.name,
            self.ip.client,
            self.ip.prefix_len,
            self.ip
                .gateway
                .map_or_else(|| "none".to_owned(), |g| g.to_string()),
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5],
        )
    }

    /// Builds the stack; must run inside the tokio runtime.
    pub fn into_stack(self) -> io::Result<Stack> {
        // SAFETY: a `File` owns its descriptor, which stays open and is
        // returned by every `as_raw_fd` until the `AsyncFd` drops it; the
        // `File` is never swapped out (only `get_ref` is used).
        let fd = unsafe { AsyncFd::register_with_interest(self.tap, Interest::READABLE) }?;
        let mut dev = Tap {
            fd,
            // Zeroed allocations: pages are only touched as frames fill them.
            rx: vec![0; VNET_HDR_LEN + ETH_HDR_LEN + usize::from(u16::MAX)],
            tx: Vec::new(),
            mtu: usize::from(self.mtu),
        };
        let clock = std::time::Instant::now();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(self.mac)));
        config.random_seed = seed();
        let mut iface = Interface::new(config, &mut dev, Instant::ZERO);
        let cidr = IpCidr::new(self.ip.client.into(), self.ip.prefix_len);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(cidr);
        });
        if let Some(gw) = self.ip.gateway {
            iface
                .routes_mut()
                .add_default_ipv4_route(gw)
                .map_err(|_| io::Error::other("route table full"))?;
        }
        let mut sockets = SocketSet::new(Vec::new());
        let tcp_socket = || {
            tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; TCP_BUF]),
                tcp::SocketBuffer::new(vec![0; TCP_BUF]),
            )
        };
        let mut echo = Vec::with_capacity(TCP_ECHO_SOCKETS);
        for _ in 0..TCP_ECHO_SOCKETS {
            // Listening from the start: a SYN may be queued on the tap already.
            let mut socket = tcp_socket();
            socket
                .listen(ECHO_PORT)
                .map_err(|e| io::Error::other(e.to_string()))?;
            echo.push(EchoConn::new(sockets.add(socket)));
        }
        let udp_buffer = || {
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                vec![0; UDP_BUF],
            )
        };
        let mut udp_socket = udp::Socket::new(udp_buffer(), udp_buffer());
        udp_socket
            .bind(ECHO_PORT)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let udp = sockets.add(udp_socket);
        let connector = Connector {
            handle: sockets.add(tcp_socket()),
            job: None,
            next_port: 49152 + (seed() % 16384) as u16,
        };
        Ok(Stack {
            guest_ip: self.ip.client,
            clock,
            iface,
            dev,
            sockets,
            echo,
            udp,
            udp_scratch: vec![0; UDP_BUF],
            connector,
        })
    }
}

/// The tap as a smoltcp device.
struct Tap {
    fd: AsyncFd<File>,
    rx: Vec<u8>,
    tx: Vec<u8>,
    mtu: usize,
}

struct RxToken<'a>(&'a [u8]);

struct TxToken<'a> {
    file: &'a File,
    buf: &'a mut Vec<u8>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.buf.clear();
        // A zeroed virtio_net_hdr: no checksum or segmentation offload.
        self.buf.resize(VNET_HDR_LEN + len, 0);
        let result = f(&mut self.buf[VNET_HDR_LEN..]);
        // Tap writes never block (the frame goes straight into the host's
        // stack); one that fails (say the tap is down) is lost, as on a wire.
        let _ = (&mut &*self.file).write(self.buf);
        result
    }
}

impl Device for Tap {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let file = self.fd.get_ref();
        loop {
            match (&mut &*file).read(&mut self.rx) {
                Ok(n) if n > VNET_HDR_LEN => {
                    let rx = RxToken(&self.rx[VNET_HDR_LEN..n]);
                    let tx = TxToken {
                        file,
                        buf: &mut self.tx,
                    };
                    return Some((rx, tx));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EAGAIN: drained.
                Err(_) => return None,
            }
        }
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            file: self.fd.get_ref(),
            buf: &mut self.tx,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + ETH_HDR_LEN;
        // Compute checksums, but do not verify them: the host hands over
        // packets it built or already checked, and a header asking for a
        // checksum to be completed (NEEDS_CSUM) would otherwise be dropped.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

/// One TCP echo socket and what its connection is doing.
#[derive(Debug)]
struct EchoConn {
    handle: SocketHandle,
    /// The current line while it may still be a `CONNECT` command.
    line: Vec<u8>,
    /// The current line is not a command: echo up to its end.
    passthrough: bool,
    /// Output not yet accepted by the socket.
    out: Vec<u8>,
    /// A `CONNECT` waiting for, or being served by, the connector; input
    /// is not read meanwhile, so the answer comes in order.
    command: Option<SocketAddrV4>,
}

impl EchoConn {
    fn new(handle: SocketHandle) -> Self {
        EchoConn {
            handle,
            line: Vec::new(),
            passthrough: false,
            out: Vec::new(),
            command: None,
        }
    }

    fn reset(&mut self) {
        self.line.clear();
        self.passthrough = false;
        self.out.clear();
        self.command = None;
    }

    /// Echoes `data` into `out`, holding back a line that may be a
    /// command. Stops after a `CONNECT` line; returns the bytes used.
    fn feed(&mut self, data: &[u8]) -> usize {
        for (i, &b) in data.iter().enumerate() {
            if self.passthrough {
                self.out.push(b);
                self.passthrough = b != b'\n';
                continue;
            }
            self.line.push(b);
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                match line.strip_prefix(CONNECT_PREFIX) {
                    Some(target) => {
                        let target = String::from_utf8_lossy(target);
                        let target = target.trim();
                        match target.parse::<SocketAddrV4>() {
                            Ok(addr) => self.command = Some(addr),
                            Err(_) => self.out.extend_from_slice(
                                format!("ERR bad address {target:?}\n").as_bytes(),
                            ),
                        }
                        return i + 1;
                    }
                    None => self.out.extend_from_slice(&line),
                }
                continue;
            }
            let maybe_command = if self.line.len() <= CONNECT_PREFIX.len() {
                CONNECT_PREFIX.starts_with(&self.line)
            } else {
                self.line.len() < MAX_LINE
            };
            if !maybe_command {
                self.out.append(&mut self.line);
                self.passthrough = true;
            }
        }
        data.len()
    }
}

/// The one outbound connection `CONNECT` makes.
#[derive(Debug)]
struct Connector {
    handle: SocketHandle,
    job: Option<Job>,
    next_port: u16,
}

#[derive(Debug)]
struct Job {
    /// The echo connection to answer; `None` once it has gone.
    owner: Option<usize>,
    target: SocketAddrV4,
    deadline: Instant,
    established: bool,
    sent: bool,
    reply: Vec<u8>,
}

/// The running stack.
pub struct Stack {
    guest_ip: Ipv4Addr,
    clock: std::time::Instant,
    iface: Interface,
    dev: Tap,
    sockets: SocketSet<'static>,
    echo: Vec<EchoConn>,
    udp: SocketHandle,
    udp_scratch: Vec<u8>,
    connector: Connector,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("guest_ip", &self.guest_ip)
            .finish_non_exhaustive()
    }
}

fn to_std(d: smoltcp::time::Duration) -> Duration {
    Duration::from_micros(d.total_micros())
}

impl Stack {
    fn now(&self) -> Instant {
        Instant::from_micros(self.clock.elapsed().as_micros() as i64)
    }

    /// Serves until the tap fails (it does not while the process holds it).
    pub async fn run(mut self) {
        loop {
            let now = self.now();
            loop {
                self.iface.poll(now, &mut self.dev, &mut self.sockets);
                if !self.serve(now) {
                    break;
                }
            }
            let mut wait = self.iface.poll_delay(now, &self.sockets).map(to_std);
            if let Some(job) = &self.connector.job {
                let left = to_std(job.deadline - now.min(job.deadline));
                wait = Some(wait.map_or(left, |w| w.min(left)));
            }
            let sleep = async {
                match wait {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ready = self.dev.fd.readable() => match ready {
                    // Cleared before reading: a frame arriving after the
                    // next read's EAGAIN raises readiness again.
                    Ok(mut guard) => guard.clear_ready(),
                    Err(_) => return,
                },
                () = sleep => {}
            }
        }
    }

    /// Runs the services once; `true` when they did something that the
    /// interface must act on.
    fn serve(&mut self, now: Instant) -> bool {
        let mut busy = self.udp_echo();
        for i in 0..self.echo.len() {
            busy |= self.tcp_echo(i);
        }
        busy |= self.connect(now);
        busy
    }

    fn udp_echo(&mut self) -> bool {
        let socket = self.sockets.get_mut::<udp::Socket>(self.udp);
        let mut busy = false;
        while socket.can_send() {
            let Ok((n, meta)) = socket.recv_slice(&mut self.udp_scratch) else {
                break;
            };
            // Sent back from the address it came to.
            let _ = socket.send_slice(&self.udp_scratch[..n], meta);
            busy = true;
        }
        busy
    }

    fn tcp_echo(&mut self, i: usize) -> bool {
        let conn = &mut self.echo[i];
        let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
        if !socket.is_open() {
            // Closed or in TIME-WAIT: forget the connection, listen again.
            conn.reset();
            if let Some(job) = &mut self.connector.job
                && job.owner == Some(i)
            {
                job.owner = None;
            }
            let _ = socket.listen(ECHO_PORT);
            return false;
        }
        let mut busy = false;
        if !conn.out.is_empty() && socket.can_send() {
            let n = socket.send_slice(&conn.out).unwrap_or(0);
            conn.out.drain(..n);
            busy |= n > 0;
        }
        if conn.out.is_empty() && conn.command.is_none() && socket.can_recv() {
            let room = socket.send_capacity() - socket.send_queue();
            if room > 0 {
                let used = socket
                    .recv(|data| {
                        let used = conn.feed(&data[..data.len().min(room)]);
                        (used, used)
                    })
                    .unwrap_or(0);
                let n = socket.send_slice(&conn.out).unwrap_or(0);
                conn.out.drain(..n);
                busy |= used > 0;
            }
        }
        let input_done = !socket.may_recv() && socket.recv_queue() == 0;
        if input_done && conn.command.is_none() && conn.out.is_empty() && socket.may_send() {
            if conn.line.is_empty() {
                socket.close();
            } else {
                // The peer closed in the middle of what looked like a command.
                conn.out.append(&mut conn.line);
            }
            busy = true;
        }
        busy
    }

    /// Advances the `CONNECT` in progress, or starts the next one.
    fn connect(&mut self, now: Instant) -> bool {
        let socket = self.sockets.get_mut::<tcp::Socket>(self.connector.handle);
        let Some(job) = &mut self.connector.job else {
            let Some(owner) = self.echo.iter().position(|c| c.command.is_some()) else {
                return false;
            };
            let Some(target) = self.echo[owner].command else {
                return false;
            };
            if socket.is_open() {
                // The previous job's connection is still closing.
                socket.abort();
            }
            let c = &mut self.connector;
            let port = c.next_port;
            c.next_port = if port == u16::MAX { 49152 } else { port + 1 };
            let remote = (smoltcp::wire::IpAddress::Ipv4(*target.ip()), target.port());
            if let Err(e) = socket.connect(self.iface.context(), remote, port) {
                let conn = &mut self.echo[owner];
                conn.out
                    .extend_from_slice(format!("ERR cannot connect to {target}: {e}\n").as_bytes());
                conn.command = None;
                return true;
            }
            c.job = Some(Job {
                owner: Some(owner),
                target,
                deadline: now
                    + smoltcp::time::Duration::from_micros(CONNECT_TIMEOUT.as_micros() as u64),
                established: false,
                sent: false,
                reply: Vec::new(),
            });
            return true;
        };

        let mut busy = false;
        job.established |= socket.may_send() || socket.may_recv();
        if job.established && !job.sent && socket.can_send() {
            let hello = format!("hello from {}\n", self.guest_ip);
            // A fresh socket's buffer takes it whole.
            job.sent = socket.send_slice(hello.as_bytes()).unwrap_or(0) == hello.len();
            busy = true;
        }
        if socket.can_recv() {
            let reply = &mut job.reply;
            let _ = socket.recv(|data| {
                let room = MAX_LINE - reply.len();
                let take = data
                    .iter()
                    .take(room)
                    .position(|&b| b == b'\n')
                    .map_or(data.len().min(room), |p| p + 1);
                reply.extend_from_slice(&data[..take]);
                (take, ())
            });
            busy = true;
        }
        let line_done = job.reply.ends_with(b"\n") || job.reply.len() >= MAX_LINE;
        let peer_gone = job.established && !socket.may_recv();
        let result = if line_done || (peer_gone && !job.reply.is_empty()) {
            socket.close();
            let line = String::from_utf8_lossy(&job.reply);
            format!("OK {}\n", line.trim_end_matches(['\r', '\n']))
        } else if peer_gone {
            socket.close();
            format!("ERR {}: connection closed without a reply\n", job.target)
        } else if !job.established && !socket.is_open() {
            format!("ERR {}: connection refused\n", job.target)
        } else if now >= job.deadline {
            socket.abort();
            let what = if job.established {
                "no reply"
            } else {
                "no connection"
            };
            format!(
                "ERR {}: timeout ({what} within {} s)\n",
                job.target,
                CONNECT_TIMEOUT.as_secs()
            )
        } else {
            return busy;
        };
        if let Some(conn) = job.owner.and_then(|i| self.echo.get_mut(i)) {
            conn.out.extend_from_slice(result.as_bytes());
            conn.command = None;
        }
        self.connector.job = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn ip_argument_is_read_like_linux() {
        let params = "console=ttyS0 ip=10.231.0.6::10.231.0.5:255.255.255.252::eth0:off:1.1.1.1 rw";
        assert_eq!(
            ip_config(params),
            Some(Ok(IpConfig {
                client: ip("10.231.0.6"),
                gateway: Some(ip("10.231.0.5")),
                prefix_len: 30,
                device: Some("eth0".into()),
            }))
        );
        // Short forms, classful default netmask, the last argument wins.
        assert_eq!(
            ip_config("ip=1.2.3.4:x ip=192.168.1.2"),
            Some(Ok(IpConfig {
                client: ip("192.168.1.2"),
                gateway: None,
                prefix_len: 24,
                device: None,
            }))
        );
        assert_eq!(
            ip_config("ip=10.0.0.2::0.0.0.0:255.0.0.0")
                .map(|r| r.map(|c| (c.gateway, c.prefix_len))),
            Some(Ok((None, 8)))
        );
        assert_eq!(ip_config("console=ttyS0"), None);
        assert_eq!(ip_config("ip=off"), None);
        assert!(ip_config("ip=dhcp").unwrap().is_err());
        assert!(ip_config("ip=::10.0.0.1").unwrap().is_err());
        assert!(
            ip_config("ip=10.0.0.2::10.0.0.1:255.0.255.0")
                .unwrap()
                .is_err()
        );
        assert!(ip_config("ip=10.0.0.300").unwrap().is_err());
    }

    #[test]
    fn echo_passes_bytes_and_holds_back_commands() {
        let mut c = EchoConn::new(SocketHandle::default());
        assert_eq!(c.feed(b"hello\nCONN"), 10);
        assert_eq!(c.out, b"hello\n");
        assert_eq!(c.feed(b"ECTED\n"), 6);
        assert_eq!(c.out, b"hello\nCONNECTED\n");
        c.out.clear();
        let data = b"CONNECT 10.0.0.1:80\r\nafter";
        assert_eq!(c.feed(data), data.len() - 5, "stops after the command");
        assert_eq!(c.command, Some("10.0.0.1:80".parse().unwrap()));
        assert!(c.out.is_empty());
        c.command = None;
        assert_eq!(c.feed(b"CONNECT nowhere\n"), 16);
        assert_eq!(c.out, b"ERR bad address \"nowhere\"\n");
        c.out.clear();
        // Binary data without newlines flows through.
        assert_eq!(c.feed(&[0, 1, 2]), 3);
        assert_eq!(c.out, [0, 1, 2]);
    }

    #[test]
    fn banner_names_the_interface() {
        let net = GuestNet {
            name: "eth0".into(),
            ip: IpConfig {
                client: ip("10.231.0.6"),
                gateway: Some(ip("10.231.0.5")),
                prefix_len: 30,
                device: None,
            },
            mac: [6, 0, 0xac, 0x10, 0, 2],
            mtu: 1500,
            tap: File::open("/dev/null").unwrap(),
        };
        assert_eq!(
            net.banner(),
            "hearth-testvmm: guest network eth0 10.231.0.6/30 gw 10.231.0.5 mac 06:00:ac:10:00:02: up\n"
        );
    }
}
