//! How closed connections' final counters reach the daemon: the BPF ring buffer (kernel 5.8+,
//! the `netflow` object), or a perf event array with one buffer per CPU (the `netflow_perf`
//! object) where the kernel has no ring buffer or when forced. Either way a record the kernel
//! cannot hand over (buffer full) stays in the connection map flagged closed and is collected by
//! the next sweep, so a full buffer delays a connection's last counters but loses nothing.

use std::{future::poll_fn, io, task::Poll};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{
        MapData, PerfEventArray, RingBuf,
        perf::{PerfEvent, PerfEventArrayBuffer},
    },
    util::online_cpus,
};
use ebpf_common::netflow::{CLOSED_MAP, ClosedConn};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

use crate::{config::ClosedEvents, kernel::Probe};

/// Bytes of perf buffer for all CPUs together, as the ring buffer has (about 2,000 records):
/// split between the CPUs, at least 8 and at most 64 pages each.
const PERF_BYTES: usize = 256 * 1024;

/// The mechanism to use given the kernel's ring-buffer probe, and why; an error when the forced
/// one cannot run.
pub fn choose(ringbuf: &Probe, forced: ClosedEvents) -> Result<(ClosedEvents, String), String> {
    let ring = ringbuf.available;
    match forced {
        ClosedEvents::Auto if ring => Ok((ClosedEvents::RingBuffer, "kernel has it".into())),
        ClosedEvents::Auto => Ok((
            ClosedEvents::PerfEventArray,
            format!("no ring buffer ({})", ringbuf.detail),
        )),
        ClosedEvents::RingBuffer if ring => Ok((ClosedEvents::RingBuffer, "forced".into())),
        ClosedEvents::RingBuffer => Err(format!(
            "the ring buffer was forced, but the kernel has none ({})",
            ringbuf.detail
        )),
        ClosedEvents::PerfEventArray => Ok((ClosedEvents::PerfEventArray, "forced".into())),
    }
}

/// Pages of each CPU's perf buffer: a power of two, as perf requires.
fn perf_pages(cpus: usize) -> usize {
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |size| size as usize);
    (PERF_BYTES / page_size.max(1) / cpus.max(1))
        .next_power_of_two()
        .clamp(8, 64)
}

/// The daemon's end of the closed-connection hand-over.
pub enum ClosedReader {
    Ring(AsyncFd<RingBuf<MapData>>),
    /// One buffer per online CPU.
    Perf(Vec<AsyncFd<PerfEventArrayBuffer<MapData>>>),
}

impl ClosedReader {
    /// Takes the closed-connection map out of the loaded `netflow` (ring buffer) or
    /// `netflow_perf` (perf event array) object.
    pub fn open(ebpf: &mut Ebpf, kind: ClosedEvents) -> anyhow::Result<Self> {
        let map = ebpf.take_map(CLOSED_MAP).context("closed-connection map")?;
        match kind {
            ClosedEvents::PerfEventArray => {
                let mut array = PerfEventArray::try_from(map)?;
                let cpus = online_cpus().map_err(|(what, err)| anyhow::anyhow!("{what}: {err}"))?;
                let pages = perf_pages(cpus.len());
                let mut buffers = Vec::with_capacity(cpus.len());
                for cpu in cpus {
                    let buffer = array
                        .open(cpu, Some(pages))
                        .with_context(|| format!("opening the perf buffer of CPU {cpu}"))?;
                    // SAFETY: the buffer owns its perf event fd for as long as the AsyncFd
                    // holds it.
                    let buffer =
                        unsafe { AsyncFd::register_with_interest(buffer, Interest::READABLE) }
                            .map_err(|err| {
                                anyhow::anyhow!("polling the perf buffer of CPU {cpu}: {err}")
                            })?;
                    buffers.push(buffer);
                }
                Ok(Self::Perf(buffers))
            }
            _ => {
                let ring = RingBuf::try_from(map)?;
                // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds it.
                let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
                    .map_err(|err| anyhow::anyhow!("polling the ring buffer: {err}"))?;
                Ok(Self::Ring(ring))
            }
        }
    }

    /// Waits until records arrive, and moves them to `out`. Cancel-safe: records read are in
    /// `out` before it returns, and a cancelled wait has read none.
    pub async fn wait_and_drain(&mut self, out: &mut Vec<ClosedConn>) -> io::Result<()> {
        match self {
            Self::Ring(fd) => {
                let mut guard = fd.readable_mut().await?;
                drain_ring(guard.get_inner_mut(), out);
                guard.clear_ready();
                Ok(())
            }
            Self::Perf(buffers) => {
                poll_fn(|cx| {
                    let mut drained = false;
                    for fd in buffers.iter_mut() {
                        if let Poll::Ready(guard) = fd.poll_read_ready_mut(cx) {
                            let mut guard = guard?;
                            drain_perf(guard.get_inner_mut(), out);
                            guard.clear_ready();
                            drained = true;
                        }
                    }
                    // Otherwise every buffer registered this task's waker above.
                    if drained {
                        Poll::Ready(Ok(()))
                    } else {
                        Poll::Pending
                    }
                })
                .await
            }
        }
    }

    /// Moves every record waiting now to `out`.
    pub fn drain(&mut self, out: &mut Vec<ClosedConn>) {
        match self {
            Self::Ring(fd) => drain_ring(fd.get_mut(), out),
            Self::Perf(buffers) => {
                for fd in buffers.iter_mut() {
                    drain_perf(fd.get_mut(), out);
                }
            }
        }
    }
}

fn drain_ring(ring: &mut RingBuf<MapData>, out: &mut Vec<ClosedConn>) {
    while let Some(item) = ring.next() {
        push_record(&item, &[], out);
    }
}

/// Drains one CPU's perf buffer. The kernel's "lost" records are not losses here: it counts one
/// exactly when `bpf_perf_event_output` fails, and then the program has kept the connection in
/// the map for the next sweep and counted it (`NETFLOW_STAT_RINGBUF_FULL`, logged each interval).
fn drain_perf(buffer: &mut PerfEventArrayBuffer<MapData>, out: &mut Vec<ClosedConn>) {
    buffer.for_each(|event| {
        if let PerfEvent::Sample { head, tail } = event {
            push_record(head, tail, out);
        }
    });
}

/// Decodes one record, which may come in two pieces (a perf sample across the buffer's end)
/// and be followed by padding.
fn push_record(head: &[u8], tail: &[u8], out: &mut Vec<ClosedConn>) {
    let len = size_of::<ClosedConn>();
    if head.len() + tail.len() < len {
        warn!(
            "netflow: short closed record of {} bytes skipped",
            head.len() + tail.len()
        );
        return;
    }
    let mut bytes = [0u8; size_of::<ClosedConn>()];
    let from_head = head.len().min(len);
    bytes[..from_head].copy_from_slice(&head[..from_head]);
    bytes[from_head..].copy_from_slice(&tail[..len - from_head]);
    // SAFETY: `bytes` holds size_of::<ClosedConn>() bytes of a plain-data record.
    out.push(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(ring: bool) -> Probe {
        Probe {
            available: ring,
            detail: "ring buffer (kernel 5.8+)".into(),
        }
    }

    #[test]
    fn auto_takes_the_ring_buffer_where_the_kernel_has_one() {
        let (kind, _) = choose(&features(true), ClosedEvents::Auto).unwrap();
        assert_eq!(kind, ClosedEvents::RingBuffer);
        let (kind, why) = choose(&features(false), ClosedEvents::Auto).unwrap();
        assert_eq!(kind, ClosedEvents::PerfEventArray);
        assert!(why.contains("no ring buffer"), "{why}");
        assert!(choose(&features(false), ClosedEvents::RingBuffer).is_err());
        let (kind, _) = choose(&features(true), ClosedEvents::PerfEventArray).unwrap();
        assert_eq!(kind, ClosedEvents::PerfEventArray);
    }

    #[test]
    fn a_record_split_across_the_buffer_end_is_joined() {
        let record = ClosedConn {
            sock: 0xffff_8880_1234_5678,
            info: ebpf_common::netflow::ConnInfo {
                bytes_sent: 1_234_567,
                ..Default::default()
            },
            peer_port: 53,
            udp_flow: 1,
            ..Default::default()
        };
        // SAFETY: plain-data record viewed as bytes.
        let bytes: [u8; size_of::<ClosedConn>()] = unsafe { std::mem::transmute(record) };
        let mut padded = bytes.to_vec();
        padded.extend_from_slice(&[0; 4]);
        let mut out = Vec::new();
        for split in [0, 1, 60, size_of::<ClosedConn>()] {
            push_record(&padded[..split], &padded[split..], &mut out);
        }
        push_record(&bytes[..100], &[], &mut out);
        assert_eq!(out, vec![record; 4]);
    }

    #[test]
    fn perf_buffers_are_a_power_of_two_pages() {
        for cpus in [1, 2, 3, 8, 64, 1024] {
            let pages = perf_pages(cpus);
            assert!(
                pages.is_power_of_two() && (8..=64).contains(&pages),
                "{cpus}: {pages}"
            );
        }
    }
}
