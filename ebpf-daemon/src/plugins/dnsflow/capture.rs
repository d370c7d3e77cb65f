//! The packet socket: AF_PACKET, SOCK_DGRAM (the kernel strips the link-layer header, so every
//! packet starts at its IP header whatever the link: Ethernet, loopback, tun, WireGuard), all
//! interfaces of the daemon's network namespace, with the eBPF filter attached *before* the
//! socket is bound: no unfiltered packet is ever queued. Kernel receive timestamps
//! (SO_TIMESTAMPNS) time the queries.

use std::{
    io,
    io::IoSliceMut,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use aya::programs::SocketFilter;
use nix::sys::socket::{ControlMessageOwned, LinkAddr, MsgFlags, recvmsg};

/// ARPHRD_LOOPBACK: traffic on `lo` is left out, as the reference does.
const ARPHRD_LOOPBACK: u16 = 772;
/// Receive buffer: room for bursts between two reads (drops are counted by the kernel).
const RCVBUF: libc::c_int = 4 * 1024 * 1024;

pub struct Capture {
    fd: OwnedFd,
}

/// One packet read into the caller's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Captured {
    /// Bytes of the packet in the buffer.
    pub len: usize,
    /// Kernel receive time, ns since the Unix epoch.
    pub ts_ns: u64,
    /// Captured on a loopback interface.
    pub loopback: bool,
}

impl Capture {
    pub fn open(filter: &mut SocketFilter) -> anyhow::Result<Self> {
        // SAFETY: plain syscall; protocol 0 receives nothing until bind().
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            anyhow::bail!("packet socket: {}", io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        filter
            .attach(fd.as_fd())
            .map_err(|e| anyhow::anyhow!("attaching the dnsflow socket filter: {e}"))?;
        setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
        // Best effort: the default buffer works too, with more drops under bursts.
        let _ = setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF);
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = 0; // every interface
        // SAFETY: valid address of the right length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            anyhow::bail!("binding the packet socket: {}", io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Reads one packet; `None` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Captured>> {
        let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<LinkAddr>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let mut ts_ns = 0;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmTimestampns(ts) = c {
                    ts_ns = (ts.tv_sec() as u64)
                        .saturating_mul(1_000_000_000)
                        .saturating_add(ts.tv_nsec() as u64);
                }
            }
        }
        if ts_ns == 0 {
            ts_ns = crate::clock::now_unix_ns().max(0) as u64;
        }
        let loopback = msg.address.is_some_and(|a| a.hatype() == ARPHRD_LOOPBACK);
        Ok(Some(Captured {
            len: msg.bytes,
            ts_ns,
            loopback,
        }))
    }

    /// Packets the kernel dropped for want of room in the socket's queue since the last call.
    pub fn take_drops(&self) -> u64 {
        // SAFETY: zeroed tpacket_stats is valid; the kernel fills it.
        let mut stats: libc::tpacket_stats = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: valid pointers and length.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&raw mut stats).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            u64::from(stats.tp_drops)
        } else {
            0
        }
    }
}

impl AsRawFd for Capture {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Capture {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: libc::c_int) -> anyhow::Result<()> {
    // SAFETY: valid pointer and length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "setsockopt({level}, {name}): {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}
