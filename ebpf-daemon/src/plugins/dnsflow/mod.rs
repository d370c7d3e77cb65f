//! ebpf-net's `dnsflow`: DNS latency and response codes over UDP and TCP, from the packets of
//! port 53 on every interface of the daemon's network namespace (contract §1.4, §2.4), and the
//! answers' addresses for netflow's `dst_domain`.
//!
//! capture.rs (socket) → parse.rs (IP/UDP/TCP, DNS) → tcp.rs (streams) → matcher.rs (query ↔
//! response, timeouts) → aggregate.rs (rows); domains.rs is the address → name cache.

pub mod aggregate;
pub mod capture;
pub mod domains;
#[cfg(test)]
mod fuzz;
pub mod matcher;
pub mod parse;
pub mod tcp;

use std::{collections::HashSet, net::IpAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
    programs::SocketFilter,
};
use ebpf_common::dnsflow::{
    DNSFLOW_PROGRAM, DNSFLOW_SNAPLEN, DNSFLOW_STAT_CUT, DNSFLOW_STAT_FRAGMENT,
    DNSFLOW_STAT_IPV6_EXT, DNSFLOW_STAT_PASSED, DNSFLOW_STATS_MAP,
};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use self::{
    aggregate::Aggregator,
    capture::Capture,
    domains::DomainCache,
    matcher::{Exchange, Matcher},
    parse::{PacketError, Transport},
    tcp::TcpStreams,
};
use crate::{
    clock,
    config::Config,
    lineproto::Point,
    plugins::{GlobalTags, PluginContext},
    sender::{Category, Destination},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dnsflow"));

pub const DESTINATION: Destination = Destination {
    category: Category::Network,
    input: "ebpf-net/dnsflow",
};

/// Outstanding queries tracked at once (about 100 bytes each).
pub const MAX_PENDING: usize = 16_384;
/// TCP streams reassembled at once.
pub const MAX_TCP_STREAMS: usize = 1_024;
/// Addresses in the domain cache (about 100 bytes each plus the name).
pub const MAX_DOMAINS: usize = 65_536;

/// How dnsflow would run, or why it cannot. A socket filter on a packet socket needs nothing a
/// supported kernel lacks (no BTF, no tracing hooks).
pub fn availability() -> Result<String, String> {
    if OBJECT.is_empty() {
        return Err(
            "this binary was built without eBPF programs (run `cargo xtask bootstrap` and rebuild)"
                .into(),
        );
    }
    Ok("by a socket filter on a packet socket".into())
}

/// Counters of what userspace could not use; logged when they grow.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    /// Packets whose IP/UDP/TCP headers did not decode.
    pub malformed_packets: u64,
    /// DNS messages that did not decode.
    pub malformed_dns: u64,
    pub loopback: u64,
}

/// Everything after the socket: packets in, rows out. No I/O, so tests feed it directly.
pub struct Pipeline {
    tcp: TcpStreams,
    matcher: Matcher,
    rows: Aggregator,
    domains: Arc<DomainCache>,
    /// This host's addresses: a query to one of them means the host is the server.
    local: HashSet<IpAddr>,
    pub counters: Counters,
}

impl Pipeline {
    pub fn new(timeout: Duration, domains: Arc<DomainCache>) -> Self {
        Self {
            tcp: TcpStreams::new(MAX_TCP_STREAMS),
            matcher: Matcher::new(MAX_PENDING, timeout.as_nanos() as u64),
            rows: Aggregator::default(),
            domains,
            local: HashSet::new(),
            counters: Counters::default(),
        }
    }

    pub fn set_local_addresses(&mut self, local: HashSet<IpAddr>) {
        self.local = local;
    }

    /// One captured packet (from its IP header on), received at `ts_ns` (Unix ns).
    pub fn packet(&mut self, data: &[u8], ts_ns: u64) {
        self.counters.packets += 1;
        let packet = match parse::ip_packet(data) {
            Ok(p) => p,
            Err(PacketError::NotUdpTcp) => return,
            Err(PacketError::Malformed) => {
                // A packet cut at the capture length is counted by the kernel already.
                if data.len() < DNSFLOW_SNAPLEN as usize {
                    self.counters.malformed_packets += 1;
                }
                return;
            }
        };
        if packet.src.to_canonical().is_loopback() || packet.dst.to_canonical().is_loopback() {
            self.counters.loopback += 1;
            return;
        }
        match packet.tcp {
            None => {
                self.message(
                    packet.payload,
                    Transport::Udp,
                    (packet.src, packet.sport),
                    (packet.dst, packet.dport),
                    ts_ns,
                );
            }
            Some(seg) => {
                let key = (packet.src, packet.sport, packet.dst, packet.dport);
                for msg in self.tcp.segment(key, seg, packet.payload) {
                    if !self.message(
                        &msg,
                        Transport::Tcp,
                        (packet.src, packet.sport),
                        (packet.dst, packet.dport),
                        ts_ns,
                    ) {
                        // Lost framing: start over at the next segment.
                        self.tcp.reset(&key);
                        break;
                    }
                }
            }
        }
    }

    /// One DNS message from `src` to `dst`; false when it did not decode.
    fn message(
        &mut self,
        bytes: &[u8],
        transport: Transport,
        src: (IpAddr, u16),
        dst: (IpAddr, u16),
        ts_ns: u64,
    ) -> bool {
        let Ok(msg) = parse::dns_message(bytes) else {
            self.counters.malformed_dns += 1;
            return false;
        };
        if !msg.response {
            let exchange = Exchange {
                transport,
                client: src,
                server: dst,
            };
            self.matcher.query(msg.id, exchange, ts_ns);
            return true;
        }
        let exchange = Exchange {
            transport,
            client: dst,
            server: src,
        };
        if let Some(name) = &msg.question {
            let now = clock::monotonic_ns();
            for &(ip, ttl) in &msg.addresses {
                self.domains.insert(ip, name, ttl, now);
            }
        }
        if let Some(sample) = self.matcher.response(msg.id, exchange, msg.rcode, ts_ns) {
            let incoming = self.local.contains(&src.0.to_canonical());
            self.rows.add(&sample, incoming);
        }
        true
    }

    /// The interval's rows, with the queries timed out by `now_ns` (Unix ns).
    pub fn interval(&mut self, now_ns: u64, tags: &GlobalTags, timestamp_ns: i64) -> Vec<Point> {
        for sample in self.matcher.expire(now_ns) {
            let incoming = self
                .local
                .contains(&sample.exchange.server.0.to_canonical());
            self.rows.add(&sample, incoming);
        }
        self.domains.purge(clock::monotonic_ns());
        self.rows.flush(tags, timestamp_ns)
    }
}

/// This host's addresses (all interfaces of the daemon's network namespace).
fn local_addresses() -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for ifa in addrs {
            let Some(addr) = ifa.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                out.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                out.insert(IpAddr::V6(v6.ip()).to_canonical());
            }
        }
    }
    out
}

/// The loaded filter and its socket. Dropping it closes the socket (and so detaches the filter).
pub struct DnsflowCollector {
    _ebpf: Ebpf,
    capture: AsyncFd<Capture>,
    kernel_stats: PerCpuArray<MapData, u64>,
    pipeline: Pipeline,
    interval: Duration,
    reported: Reported,
}

/// Totals already logged, so each interval logs the growth.
#[derive(Default)]
struct Reported {
    counters: Counters,
    matcher: matcher::MatchStats,
    tcp: tcp::TcpStats,
    domains_evicted: u64,
    kernel_cut: u64,
}

impl DnsflowCollector {
    pub fn load(config: &Config, domains: Arc<DomainCache>) -> anyhow::Result<Self> {
        if OBJECT.is_empty() {
            anyhow::bail!(
                "this binary was built without eBPF programs (run `cargo xtask bootstrap` and rebuild)"
            );
        }
        // No kernel BTF: a socket filter needs none (see the bash plugin).
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .load(OBJECT)
            .context("loading the dnsflow object")?;
        let filter: &mut SocketFilter = ebpf
            .program_mut(DNSFLOW_PROGRAM)
            .context("program dnsflow missing from the object")?
            .try_into()?;
        filter.load().context("loading the dnsflow socket filter")?;
        let capture = Capture::open(filter)?;
        // SAFETY: the Capture owns its fd for as long as the AsyncFd holds it.
        let capture = unsafe { AsyncFd::register(capture) }.context("polling the packet socket")?;
        let kernel_stats = PerCpuArray::try_from(
            ebpf.take_map(DNSFLOW_STATS_MAP)
                .context("dnsflow stats map")?,
        )?;
        let mut pipeline = Pipeline::new(config.dnsflow_timeout, domains);
        pipeline.set_local_addresses(local_addresses());
        info!(
            "dnsflow: capturing DNS on all interfaces (timeout {:?}, interval {:?})",
            config.dnsflow_timeout, config.dnsflow_interval
        );
        Ok(Self {
            _ebpf: ebpf,
            capture,
            kernel_stats,
            pipeline,
            interval: config.dnsflow_interval,
            reported: Reported::default(),
        })
    }

    pub async fn run(mut self, mut ctx: PluginContext) -> anyhow::Result<()> {
        let mut buf = vec![0u8; DNSFLOW_SNAPLEN as usize];
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                ready = self.capture.readable() => {
                    let mut guard = ready?;
                    // A bounded batch, so the flush tick is never starved.
                    for _ in 0..256 {
                        match guard.get_inner().recv(&mut buf) {
                            Ok(Some(c)) if c.loopback => self.pipeline.counters.loopback += 1,
                            Ok(Some(c)) => self.pipeline.packet(&buf[..c.len], c.ts_ns),
                            Ok(None) => {
                                guard.clear_ready();
                                break;
                            }
                            Err(err) => {
                                warn!("dnsflow: reading the packet socket: {err}");
                                guard.clear_ready();
                                break;
                            }
                        }
                    }
                }
                _ = tick.tick() => self.report(&ctx),
                _ = ctx.shutdown.changed() => break,
            }
        }
        self.report(&ctx);
        Ok(())
    }

    fn report(&mut self, ctx: &PluginContext) {
        let now = clock::now_unix_ns();
        let points = self.pipeline.interval(now.max(0) as u64, &ctx.tags, now);
        self.pipeline.set_local_addresses(local_addresses());
        self.log_counters();
        debug!(
            "dnsflow: {} rows, {} pending, {} tcp streams, {} domains",
            points.len(),
            self.pipeline.matcher.pending(),
            self.pipeline.tcp.len(),
            self.pipeline.domains.len()
        );
        if !points.is_empty() {
            ctx.sender.submit(DESTINATION, points);
        }
    }

    fn log_counters(&mut self) {
        let drops = self.capture.get_ref().take_drops();
        if drops > 0 {
            warn!("dnsflow: {drops} DNS packets dropped: socket receive queue full");
        }
        let p = &self.pipeline;
        let r = &mut self.reported;
        let grew = |now: u64, was: &mut u64, what: &str| {
            if now > *was {
                warn!("dnsflow: {} {what} (total {now})", now - *was);
                *was = now;
            }
        };
        grew(
            p.counters.malformed_packets,
            &mut r.counters.malformed_packets,
            "packets skipped: malformed IP/UDP/TCP headers",
        );
        grew(
            p.counters.malformed_dns,
            &mut r.counters.malformed_dns,
            "DNS messages skipped: malformed",
        );
        grew(
            p.matcher.stats.evicted,
            &mut r.matcher.evicted,
            "outstanding queries evicted: table full",
        );
        grew(
            p.tcp.stats.evicted,
            &mut r.tcp.evicted,
            "TCP streams evicted: table full",
        );
        grew(
            p.tcp.stats.gaps,
            &mut r.tcp.gaps,
            "partial TCP DNS messages dropped: missed segment",
        );
        grew(
            p.domains.evicted(),
            &mut r.domains_evicted,
            "domain cache entries evicted: cache full",
        );
        let stats = &self.kernel_stats;
        let kernel = |index: u32| -> u64 {
            stats
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        grew(
            kernel(DNSFLOW_STAT_CUT),
            &mut r.kernel_cut,
            "DNS packets longer than the capture length, cut (TCP streams resynchronise)",
        );
        debug!(
            "dnsflow: {} packets passed by the filter ({} IPv6 with extension headers and {} \
             IPv4 fragments not inspected), {} read, {} on loopback, {} unmatched responses, \
             {} repeated queries",
            kernel(DNSFLOW_STAT_PASSED),
            kernel(DNSFLOW_STAT_IPV6_EXT),
            kernel(DNSFLOW_STAT_FRAGMENT),
            p.counters.packets,
            p.counters.loopback,
            p.matcher.stats.unmatched,
            p.matcher.stats.repeated
        );
    }
}
