//! Opening a tap the way Firecracker's `Tap::open_named` does
//! (`src/vmm/src/devices/virtio/net/tap.rs`): open `/dev/net/tun`, then
//! `TUNSETIFF` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, then
//! `TUNSETVNETHDRSZ` with the size of `virtio_net_hdr_v1` (12).
//!
//! Like Firecracker, nothing here checks that the tap already exists: with
//! `CAP_NET_ADMIN`, `TUNSETIFF` on an unknown name creates a non-persistent
//! tap that disappears when the last descriptor closes, i.e. when this
//! process exits.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

/// Linux's `IFNAMSIZ`.
const IFACE_NAME_MAX_LEN: usize = 16;
/// `size_of::<virtio_net_hdr_v1>()`.
const VNET_HDR_LEN: libc::c_int = 12;

/// Why a tap could not be opened; messages are Firecracker's `TapError`'s.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    #[error("Couldn't open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    /// Name of 16 bytes or more.
    #[error("Invalid interface name")]
    InvalidIfname,
    /// `TUNSETIFF` failed.
    #[error(
        "Error while creating ifreq structure: {0}. Invalid TUN/TAP Backend provided by {1}. Check our documentation on setting up the network devices."
    )]
    IfreqExecuteError(io::Error, String),
    /// `TUNSETVNETHDRSZ` failed.
    #[error("Error while setting size of the vnet header: {0}")]
    SetSizeOfVnetHdr(io::Error),
}

/// Which of Firecracker's two steps failed (`NetError::TapOpen` or
/// `NetError::TapSetVnetHdrSize`).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Opening the tap failed.
    #[error("Open tap device failed: {0}")]
    TapOpen(TapError),
    /// Setting the vnet header size failed.
    #[error("Setting vnet header size failed: {0}")]
    TapSetVnetHdrSize(TapError),
    /// MTU outside `[68, 65535]`.
    #[error("MTU {0} is out of range [68, 65535]")]
    InvalidMtu(u16),
}

/// Opens (or, with `CAP_NET_ADMIN`, creates) the tap `if_name`; the
/// returned file keeps it attached.
pub fn open_tap(if_name: &str) -> Result<File, NetError> {
    // SAFETY: a constant NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(NetError::TapOpen(TapError::OpenTun(
            io::Error::last_os_error(),
        )));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let tun = unsafe { File::from_raw_fd(fd) };

    let name = if_name.as_bytes();
    if name.len() >= IFACE_NAME_MAX_LEN {
        return Err(NetError::TapOpen(TapError::InvalidIfname));
    }
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // The flags fit in a c_short (0x5002).
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is; the
    // descriptor is open; the result is checked.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(NetError::TapOpen(TapError::IfreqExecuteError(
            io::Error::last_os_error(),
            if_name.to_owned(),
        )));
    }
    let size: libc::c_int = VNET_HDR_LEN;
    // SAFETY: TUNSETVNETHDRSZ reads one c_int, which `size` is; the result
    // is checked.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
        return Err(NetError::TapSetVnetHdrSize(TapError::SetSizeOfVnetHdr(
            io::Error::last_os_error(),
        )));
    }
    Ok(tun)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_refused_before_any_ioctl() {
        // Fails the same way whether or not /dev/net/tun can be opened here,
        // except when it cannot be opened at all.
        match open_tap("hth-name-too-long-for-linux") {
            Err(NetError::TapOpen(TapError::InvalidIfname)) => {}
            Err(NetError::TapOpen(TapError::OpenTun(_))) => {}
            other => panic!("unexpected: {other:?}"),
        }
    }

    #[test]
    fn message_is_firecrackers() {
        let e = NetError::TapOpen(TapError::IfreqExecuteError(
            io::Error::from_raw_os_error(libc::EPERM),
            "tap0".into(),
        ));
        assert_eq!(
            e.to_string(),
            "Open tap device failed: Error while creating ifreq structure: Operation not \
             permitted (os error 1). Invalid TUN/TAP Backend provided by tap0. Check our \
             documentation on setting up the network devices."
        );
    }
}
