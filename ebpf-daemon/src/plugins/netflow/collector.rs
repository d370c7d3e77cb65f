//! Loads the netflow programs at the chosen tier, and each interval turns the kernel's
//! per-connection counters (and the connections closed meanwhile) into `netflow` rows.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSockAddr, FExit, KProbe, TracePoint},
};
use ebpf_common::netflow::{
    CLASSIC_IO_LAYOUT, CLOSED_MAP, CONN_F_FINAL, CONNS_MAP, ClosedConn, ConnInfo, IPPROTO_TCP,
    NETFLOW_STAT_MAP_FULL, NETFLOW_STAT_NESTED, NETFLOW_STAT_READ_FAILED,
    NETFLOW_STAT_RINGBUF_FULL, NETFLOW_STAT_STALE_LOST, OFFSETS_GLOBAL, RETIRED_MAP, RetiredKey,
    STATS_MAP, TP_OFFSETS_GLOBAL, TracepointOffsets, UDP_FLOWS_MAP, UDP_PEERS_CGROUP,
    UDP_PEERS_OFF, UDP_PEERS_SYSCALLS, UDP_UNCONNECTED_GLOBAL, UdpFlowKey,
};
use tracing::{debug, info, warn};

use super::{
    aggregate::{ConnSample, NetflowOptions, Resolver, Tracker},
    cgroup,
    closed::ClosedReader,
    route::LocalAddresses,
};
use crate::{
    btf::{KernelBtf, VMLINUX_BTF},
    clock,
    config::{ClosedEvents, Config, NetflowTier, UdpPeers},
    kernel::{
        KernelFeatures,
        kretprobe::{self, Kretprobe},
    },
    plugins::PluginContext,
    plugins::dnsflow::domains::DomainCache,
    plugins::losses::KernelLosses,
    plugins::misses::Misses,
    sender::{Category, Destination},
};

/// The programs with the ring buffer for closed connections.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netflow"));
/// The same programs with a perf event array instead (kernels without a ring buffer).
static OBJECT_PERF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netflow_perf"));

pub const DESTINATION: Destination = Destination {
    category: Category::Network,
    input: "ebpf-net/netflow",
};

/// True when this binary was built without the eBPF toolchain.
pub fn object_is_empty() -> bool {
    OBJECT.is_empty() || OBJECT_PERF.is_empty()
}

/// What the kernel-side counters mean.
const LOSSES: &[(u32, &str)] = &[
    (
        NETFLOW_STAT_MAP_FULL,
        "connections not tracked: map full (raise --netflow-max-conns)",
    ),
    (
        NETFLOW_STAT_RINGBUF_FULL,
        "closed connections deferred to the next sweep: ring or perf buffer full",
    ),
    (
        NETFLOW_STAT_READ_FAILED,
        "events skipped: kernel memory read failed",
    ),
    (
        NETFLOW_STAT_NESTED,
        "events skipped: programs nested too deep on one CPU",
    ),
    (
        NETFLOW_STAT_STALE_LOST,
        "entries of freed sockets replaced before their last counts left: ring or perf buffer and retired map full",
    ),
];

/// (program, BTF tracepoint) of the tracepoint tier's sends and receives.
const TP_BTF_IO: [(&str, &str); 2] = [
    ("netflow_send", "sock_send_length"),
    ("netflow_recv", "sock_recv_length"),
];

/// (program, BTF tracepoint) of TCP state changes, retransmits and freed sockets: tracepoint
/// and fentry tiers.
const TP_BTF_TCP: [(&str, &str); 3] = [
    ("netflow_state", "inet_sock_set_state"),
    ("netflow_retransmit", "tcp_retransmit_skb"),
    ("netflow_destroy", "tcp_destroy_sock"),
];

/// (program, kernel function) of the fentry tier: fexit on the INET socket layer. The IPv6
/// functions may be absent (IPv6 built as a module that is not loaded): IPv6 is then not counted.
const FEXIT_IO: [(&str, &str); 4] = [
    ("netflow_fexit_inet_send", "inet_sendmsg"),
    ("netflow_fexit_inet_recv", "inet_recvmsg"),
    ("netflow_fexit_inet6_send", "inet6_sendmsg"),
    ("netflow_fexit_inet6_recv", "inet6_recvmsg"),
];

/// (program, is a kretprobe, kernel functions) of the kprobe tier. Receives are counted where
/// TCP and UDP consume them (plain kprobes: no return slot held while a receive sleeps); the
/// inet_recvmsg entry only marks where one recvmsg call starts.
const KPROBE_IO: [(&str, bool, &[&str]); 5] = [
    (
        "netflow_kprobe_send",
        false,
        &["inet_sendmsg", "inet6_sendmsg"],
    ),
    (
        "netflow_kretprobe_send",
        true,
        &["inet_sendmsg", "inet6_sendmsg"],
    ),
    (
        "netflow_kprobe_recv",
        false,
        &["inet_recvmsg", "inet6_recvmsg"],
    ),
    ("netflow_kprobe_tcp_recv", false, &["tcp_cleanup_rbuf"]),
    ("netflow_kprobe_udp_recv", false, &["skb_consume_udp"]),
];

/// (program, group, event) of the classic-tracepoint tier's sends and receives.
const CLASSIC_IO: [(&str, &str, &str); 2] = [
    ("netflow_tp_send", "sock", "sock_send_length"),
    ("netflow_tp_recv", "sock", "sock_recv_length"),
];

/// (program, group, event) of the classic tracepoints of TCP state changes, retransmits and
/// freed sockets: kprobe and classic-tracepoint tiers.
const CLASSIC_TCP: [(&str, &str, &str); 3] = [
    ("netflow_tp_state", "sock", "inet_sock_set_state"),
    ("netflow_tp_retransmit", "tcp", "tcp_retransmit_skb"),
    ("netflow_tp_destroy", "tcp", "tcp_destroy_sock"),
];

/// The cgroup programs that learn the peers of unconnected UDP sockets, on the cgroup v2 root
/// (their attach types come from their sections: `cgroup/sendmsg4` and so on).
const CGROUP_PROGRAMS: [&str; 4] = [
    "netflow_cg_sendmsg4",
    "netflow_cg_sendmsg6",
    "netflow_cg_recvmsg4",
    "netflow_cg_recvmsg6",
];

/// (program, syscall tracepoints) that learn the peers of unconnected UDP sockets where the
/// cgroup programs cannot (at every tier).
const SYSCALL_PROGRAMS: [(&str, &[&str]); 5] = [
    ("netflow_sendto", &["sys_enter_sendto"]),
    ("netflow_sendmsg", &["sys_enter_sendmsg"]),
    ("netflow_recvfrom", &["sys_enter_recvfrom"]),
    ("netflow_recvmsg", &["sys_enter_recvmsg"]),
    (
        "netflow_recv_exit",
        &["sys_exit_recvfrom", "sys_exit_recvmsg"],
    ),
];

/// Live connections idle this long are dropped from the kernel map (UDP sockets have no close
/// event in the tracepoint tier; a TCP close we missed must not pin an entry forever).
const IDLE_NS: u64 = 6 * 3600 * 1_000_000_000;

/// The tier chosen for this kernel and why.
#[derive(Debug, Clone)]
pub struct TierChoice {
    pub tier: NetflowTier,
    pub reason: String,
}

/// Picks the attach tier: the forced one, or the best one this kernel and build support.
/// Errors say why no (or not the forced) tier can run.
pub fn choose_tier(
    features: &KernelFeatures,
    btf: Result<&KernelBtf, &str>,
    forced: NetflowTier,
) -> Result<TierChoice, String> {
    tier_candidates(features, btf, forced).map(|mut tiers| tiers.remove(0))
}

/// Every tier this kernel and build support, best first (only the forced one when forced):
/// start-up falls back to the next when one fails to load or attach (a kernel may load a
/// trampoline program and still refuse to attach it). Never empty.
pub fn tier_candidates(
    features: &KernelFeatures,
    btf: Result<&KernelBtf, &str>,
    forced: NetflowTier,
) -> Result<Vec<TierChoice>, String> {
    let mut notes = Vec::new();
    let candidates: &[NetflowTier] = match forced {
        // Where the kernel preempts trampoline and tp_btf programs it skips their runs on that
        // CPU meanwhile (recursion_misses: calls lost); kprobes and classic tracepoints run with
        // preemption off, so they come first there.
        NetflowTier::Auto if features.preemption.available => {
            notes.push(format!(
                "fentry and tracepoint last: preemption {}, and the kernel skips such a program on a CPU while a run of it is preempted",
                features.preemption.detail
            ));
            &[
                NetflowTier::ClassicTracepoint,
                NetflowTier::Kprobe,
                NetflowTier::Fentry,
                NetflowTier::Tracepoint,
            ]
        }
        // Cheapest first: one trampoline or tp_btf program per call, then a classic
        // tracepoint (the event record is built first), then a kprobe/kretprobe pair.
        NetflowTier::Auto => &[
            NetflowTier::Fentry,
            NetflowTier::Tracepoint,
            NetflowTier::ClassicTracepoint,
            NetflowTier::Kprobe,
        ],
        NetflowTier::Fentry => &[NetflowTier::Fentry],
        NetflowTier::Kprobe => &[NetflowTier::Kprobe],
        NetflowTier::Tracepoint => &[NetflowTier::Tracepoint],
        NetflowTier::ClassicTracepoint => &[NetflowTier::ClassicTracepoint],
    };
    let mut usable = Vec::new();
    for &tier in candidates {
        match tier_support(tier, features, btf) {
            Ok(why) => {
                notes.push(format!("{}: {why}", tier.name()));
                let reason = if forced == NetflowTier::Auto {
                    notes.join("; ")
                } else {
                    format!("forced by --netflow-tier; {}", notes.join("; "))
                };
                usable.push(TierChoice { tier, reason });
            }
            Err(why) => notes.push(format!("{}: {why}", tier.name())),
        }
    }
    if usable.is_empty() {
        Err(notes.join("; "))
    } else {
        Ok(usable)
    }
}

fn tier_support(
    tier: NetflowTier,
    features: &KernelFeatures,
    btf: Result<&KernelBtf, &str>,
) -> Result<String, String> {
    let missing_tp_btf = |btf: &KernelBtf, wanted: &[(&str, &str)]| -> Vec<String> {
        wanted
            .iter()
            .filter(|(_, tp)| !btf.has_tracepoint(tp))
            .map(|(_, tp)| tp.to_string())
            .collect()
    };
    match tier {
        NetflowTier::Auto => unreachable!("auto is resolved by choose_tier"),
        NetflowTier::Fentry => {
            if !features.fentry.available {
                return Err(format!("no BPF trampolines ({})", features.fentry.detail));
            }
            // fexit on a receive that sleeps: before 5.13 ("bpf: Fix fexit trampoline"),
            // detaching while a thread sleeps there frees the trampoline under it.
            if kernel_version(&features.release).is_some_and(|v| v < (5, 13)) {
                return Err(format!(
                    "kernel {} is older than 5.13, where detaching fexit from a sleeping function is unsafe",
                    features.release
                ));
            }
            if !Path::new(VMLINUX_BTF).exists() {
                return Err(format!(
                    "needs the running kernel's own BTF ({VMLINUX_BTF}) to attach; a --btf file only gives offsets"
                ));
            }
            let btf = btf.map_err(|why| format!("needs kernel BTF: {why}"))?;
            let mut missing: Vec<String> = ["inet_sendmsg", "inet_recvmsg"]
                .into_iter()
                .filter(|f| !btf.has_function(f))
                .map(str::to_string)
                .collect();
            missing.extend(missing_tp_btf(btf, &TP_BTF_TCP));
            if !missing.is_empty() {
                return Err(format!("kernel BTF lacks {}", missing.join(", ")));
            }
            Ok("fexit inet_sendmsg/inet_recvmsg (and inet6_*), tp_btf inet_sock_set_state, tcp_retransmit_skb, tcp_destroy_sock".into())
        }
        NetflowTier::Kprobe => {
            if !features.kprobes.available {
                return Err(format!("no kprobes ({})", features.kprobes.detail));
            }
            btf.map_err(|why| format!("needs BTF for struct offsets: {why}"))?;
            missing_classic(features, &CLASSIC_TCP)?;
            Ok("kprobe+kretprobe inet_sendmsg/inet_recvmsg (and inet6_*), tracepoints sock/inet_sock_set_state, tcp/tcp_retransmit_skb, tcp/tcp_destroy_sock".into())
        }
        NetflowTier::ClassicTracepoint => {
            btf.map_err(|why| format!("needs BTF for struct offsets: {why}"))?;
            let mut wanted = CLASSIC_IO.to_vec();
            wanted.extend(CLASSIC_TCP);
            missing_classic(features, &wanted)
                .map_err(|why| format!("{why} (sock_send_length/sock_recv_length need 6.3+)"))?;
            if let Some(tracefs) = &features.tracefs_path {
                check_classic_io_layout(tracefs).map_err(|err| format!("{err:#}"))?;
            }
            Ok("tracepoints sock/sock_send_length, sock/sock_recv_length, sock/inet_sock_set_state, tcp/tcp_retransmit_skb, tcp/tcp_destroy_sock".into())
        }
        NetflowTier::Tracepoint => {
            let btf = btf.map_err(|why| format!("needs kernel BTF: {why}"))?;
            if !Path::new(VMLINUX_BTF).exists() {
                return Err(format!(
                    "needs the running kernel's own BTF ({VMLINUX_BTF}) to attach; a --btf file only gives offsets"
                ));
            }
            let mut wanted = TP_BTF_IO.to_vec();
            wanted.extend(TP_BTF_TCP);
            let missing = missing_tp_btf(btf, &wanted);
            if !missing.is_empty() {
                return Err(format!(
                    "kernel lacks the BTF tracepoints {} (sock_send_length/sock_recv_length need 6.3+)",
                    missing.join(", ")
                ));
            }
            Ok("tp_btf sock_send_length, sock_recv_length, inet_sock_set_state, tcp_retransmit_skb, tcp_destroy_sock".into())
        }
    }
}

/// Ok when tracefs has every classic tracepoint of `wanted`, else which are missing.
fn missing_classic(features: &KernelFeatures, wanted: &[(&str, &str, &str)]) -> Result<(), String> {
    let Some(tracefs) = &features.tracefs_path else {
        return Err("needs tracefs for its classic tracepoints".into());
    };
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(_, group, event)| !tracefs.join("events").join(group).join(event).exists())
        .map(|(_, group, event)| format!("{group}/{event}"))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "kernel lacks the tracepoints {}",
            missing.join(", ")
        ))
    }
}

/// The loaded and attached programs. Dropping it detaches everything.
pub struct NetflowCollector {
    ebpf: Ebpf,
    conns: HashMap<MapData, u64, ConnInfo>,
    udp_flows: HashMap<MapData, UdpFlowKey, ConnInfo>,
    /// Final entries that made room while the ring or perf buffer was full.
    retired: HashMap<MapData, RetiredKey, ConnInfo>,
    closed: ClosedReader,
    losses: KernelLosses,
    /// Program runs the kernel skipped (`recursion_misses`): calls not counted.
    misses: Misses,
    /// Test hook (`DKE_TEST_NETFLOW_SLOW_DRAIN`): closed records are read only at sweeps.
    slow_drain: bool,
    /// The kprobe tier's kretprobes (removed on drop), and the returns they missed so far.
    kretprobes: Vec<Kretprobe>,
    kretprobe_missed: u64,
    /// Live entries at the last interval (how much room the next walk needs).
    live_hint: usize,
    tracker: Tracker,
    resolver: ProcResolver,
}

impl NetflowCollector {
    pub fn load(
        config: &Config,
        kernel_btf: &KernelBtf,
        tracefs: Option<&Path>,
        tier: &TierChoice,
        closed_events: ClosedEvents,
    ) -> anyhow::Result<Self> {
        if object_is_empty() {
            bail!(
                "this binary was built without eBPF programs (run `cargo xtask bootstrap` and rebuild)"
            );
        }
        let offsets = kernel_btf
            .net_offsets()
            .context("reading struct offsets from kernel BTF")?;
        // The probes read both ports of a UDP socket at once (`skc_portpair`).
        if offsets.skc_num != offsets.skc_dport + 2 {
            bail!("struct sock_common: skc_num is not right after skc_dport ({offsets:?})");
        }
        debug!("netflow: kernel offsets {offsets:?}");
        let tp_offsets = match tier.tier {
            NetflowTier::Kprobe => classic_tracepoint_offsets(tracefs)?,
            NetflowTier::ClassicTracepoint => {
                let tracefs = tracefs.context("this tier needs tracefs for its tracepoints")?;
                check_classic_io_layout(tracefs)?;
                classic_tracepoint_offsets(Some(tracefs))?
            }
            _ => TracepointOffsets::default(),
        };
        // Test hook: a daemon that falls behind, as one starved of CPU in a burst would: a
        // ring buffer of this many bytes (a power of two of pages), read only at sweeps.
        let ring_bytes = std::env::var("DKE_TEST_NETFLOW_SLOW_DRAIN")
            .ok()
            .and_then(|v| v.parse::<u32>().ok());
        let load_object = |udp_peers: u32| {
            let mut loader = EbpfLoader::new();
            if let (Some(bytes), ClosedEvents::RingBuffer) = (ring_bytes, closed_events) {
                loader.map_max_entries(CLOSED_MAP, bytes);
            }
            loader
                .override_global(OFFSETS_GLOBAL, &offsets, true)
                .override_global(TP_OFFSETS_GLOBAL, &tp_offsets, true)
                .override_global(UDP_UNCONNECTED_GLOBAL, &udp_peers, true)
                .map_max_entries(CONNS_MAP, config.netflow_max_conns)
                .map_max_entries(UDP_FLOWS_MAP, config.netflow_max_conns)
                .load(match closed_events {
                    ClosedEvents::PerfEventArray => OBJECT_PERF,
                    _ => OBJECT,
                })
                .context("loading the netflow object")
        };
        let (mut ebpf, udp_peers) = load_udp_peers(config, load_object)?;
        let kretprobes = attach_tier(&mut ebpf, tier.tier, kernel_btf, tracefs)?;
        info!(
            "netflow: attached at the {} tier ({} connections max, closed connections through the {})",
            tier.tier.name(),
            config.netflow_max_conns,
            closed_events.name()
        );
        info!("netflow: unconnected UDP {udp_peers}");
        let conns = HashMap::try_from(ebpf.take_map(CONNS_MAP).context("connection map")?)?;
        let udp_flows = HashMap::try_from(ebpf.take_map(UDP_FLOWS_MAP).context("UDP flow map")?)?;
        let retired = HashMap::try_from(ebpf.take_map(RETIRED_MAP).context("retired map")?)?;
        let closed = ClosedReader::open(&mut ebpf, closed_events)?;
        let stats = PerCpuArray::try_from(ebpf.take_map(STATS_MAP).context("stats map")?)?;
        let misses = Misses::each_program("netflow", &ebpf);
        let options = NetflowOptions {
            ephemeral_port_min: config.ephemeral_port.unwrap_or(0),
            include_loopback: config.netflow_include_loopback,
            ipv6_disabled: config.ipv6_disabled,
            include_udp: !config.netflow_udp_disabled,
        };
        Ok(Self {
            ebpf,
            conns,
            udp_flows,
            retired,
            closed,
            losses: KernelLosses::new("netflow", stats, LOSSES),
            misses,
            kretprobes,
            kretprobe_missed: 0,
            slow_drain: ring_bytes.is_some(),
            live_hint: 0,
            tracker: Tracker::new(options),
            resolver: ProcResolver::new(config.host_proc.clone()),
        })
    }

    /// Names remote addresses from dnsflow's cache (`dst_domain`).
    pub fn with_domains(mut self, domains: Arc<DomainCache>) -> Self {
        self.resolver.domains = Some(domains);
        self
    }

    /// Drains closed connections as they come; every interval, reports the rows.
    pub async fn run(mut self, mut ctx: PluginContext) -> anyhow::Result<()> {
        let mut closed: Vec<ClosedConn> = Vec::new();
        let mut tick = tokio::time::interval(ctx.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate: the first report is one interval in
        loop {
            tokio::select! {
                drained = self.closed.wait_and_drain(&mut closed), if !self.slow_drain => drained?,
                _ = tick.tick() => {
                    self.report(&ctx, &mut closed);
                    self.losses.report();
                    self.misses.report(&self.ebpf);
                    self.report_kretprobe_misses();
                    // An interval over thousands of connections frees megabytes at once.
                    crate::lifecycle::return_free_memory();
                }
                _ = ctx.shutdown.changed() => break,
            }
        }
        // What happened since the last interval is still reported.
        self.report(&ctx, &mut closed);
        self.losses.report();
        self.misses.report(&self.ebpf);
        self.report_kretprobe_misses();
        Ok(())
    }

    /// Sends not counted because every kretprobe instance was taken (the kernel's count).
    fn report_kretprobe_misses(&mut self) {
        let total: u64 = self.kretprobes.iter().filter_map(Kretprobe::missed).sum();
        if total > self.kretprobe_missed {
            warn!(
                "netflow: {} sends not counted: more threads inside a send at once than the \
                 kretprobe's {} instances (total {total})",
                total - self.kretprobe_missed,
                kretprobe::MAX_ACTIVE
            );
            self.kretprobe_missed = total;
        }
    }

    fn report(&mut self, ctx: &PluginContext, closed: &mut Vec<ClosedConn>) {
        // Sized from the last interval: growing by doubling would briefly hold one and a half
        // copies of 128 bytes per connection (several MB with 10,000 connections).
        let mut live: Vec<ConnSample> = Vec::with_capacity(self.live_hint + self.live_hint / 8);
        live.extend(
            self.conns
                .iter()
                .filter_map(Result::ok)
                .map(|(sock, info)| ConnSample { sock, info }),
        );
        // UDP flows get an id of their own; a flow quiet for two intervals has reported its
        // bytes and is retired (UDP has no close), which keeps a busy server's map small.
        let now = clock::monotonic_ns();
        let quiet_ns = 2 * ctx.interval.as_nanos() as u64;
        let mut udp_ids = StdHashMap::new();
        for (key, mut info) in self.udp_flows.iter().filter_map(Result::ok) {
            let id = udp_flow_id(&key);
            if now.saturating_sub(info.last_ns) > quiet_ns {
                info.flags |= CONN_F_FINAL;
            }
            udp_ids.insert(id, key);
            live.push(ConnSample { sock: id, info });
        }
        // Closed records are drained after the map walk, never before: the kernel submits a
        // close record and then deletes the entry, so every connection missing from the walk
        // has its record in the buffer by now, and one closing after the walk was seen live.
        self.closed.drain(closed);
        // Then the entries that made room while the buffer was full (written before their
        // replacement, so also before the walk).
        let retired: Vec<(RetiredKey, ConnInfo)> =
            self.retired.iter().filter_map(Result::ok).collect();
        for (key, info) in retired {
            let _ = self.retired.remove(&key);
            closed.push(key.record(info));
        }
        self.live_hint = live.len();
        let closed_records = closed.len();
        // A UDP flow's final record names the flow by its key: give it the flow's id.
        for record in closed.iter_mut() {
            if let Some(key) = record.udp_flow_key() {
                record.sock = udp_flow_id(&key);
            }
        }
        self.resolver.new_interval();
        let output = self.tracker.interval(
            &live,
            closed,
            &mut self.resolver,
            &ctx.tags,
            clock::now_unix_ns(),
            clock::monotonic_ns(),
            IDLE_NS,
        );
        self.resolver.end_interval();
        closed.clear();
        for sock in &output.delete {
            match udp_ids.get(sock) {
                Some(key) => {
                    let _ = self.udp_flows.remove(key);
                }
                None => {
                    let _ = self.conns.remove(sock);
                }
            }
        }
        debug!(
            "netflow: {} live, {closed_records} closed records, {} rows, {} tracked, {:?}",
            live.len(),
            output.points.len(),
            self.tracker.tracked(),
            output.stats
        );
        if !output.points.is_empty() {
            ctx.sender.submit(DESTINATION, output.points);
        }
    }
}

/// Loads the netflow object (`load_object`, given how unconnected UDP peers are learnt) and
/// attaches the programs that learn them: the cgroup programs where they attach; else the
/// syscall tracepoints, which cost every send and receive call of every socket about 100 ns
/// (measured by `cargo xtask bench`), only when asked for (`--netflow-udp-unconnected`, or
/// `DKE_NETFLOW_UDP_PEERS=syscalls`); else none. Returns how unconnected UDP is counted.
fn load_udp_peers(
    config: &Config,
    load_object: impl Fn(u32) -> anyhow::Result<Ebpf>,
) -> anyhow::Result<(Ebpf, String)> {
    if config.netflow_udp_disabled {
        let ebpf = load_object(UDP_PEERS_OFF)?;
        return Ok((ebpf, "not counted (--netflow-udp-disabled)".into()));
    }
    if config.netflow_udp_unconnected_disabled {
        let ebpf = load_object(UDP_PEERS_OFF)?;
        return Ok((
            ebpf,
            "not counted (--netflow-udp-unconnected-disabled)".into(),
        ));
    }
    let forced = config.netflow_udp_peers;
    let mut cgroup_failed = None;
    if forced != UdpPeers::Syscalls {
        let mut ebpf = load_object(UDP_PEERS_CGROUP)?;
        match attach_cgroup_programs(&mut ebpf, &config.host_proc) {
            Ok(root) => {
                let how = format!(
                    "counted through cgroup programs (sendmsg4/6, recvmsg4/6) on the cgroup v2 root {root}"
                );
                return Ok((ebpf, how));
            }
            Err(err) if forced == UdpPeers::Cgroup => {
                return Err(err.context(
                    "unconnected UDP through cgroup programs (DKE_NETFLOW_UDP_PEERS=cgroup)",
                ));
            }
            // Dropping the object detaches whatever did attach.
            Err(err) => cgroup_failed = Some(format!("{err:#}")),
        }
    }
    let Some(failed) = cgroup_failed else {
        let mut ebpf = load_object(UDP_PEERS_SYSCALLS)?;
        attach_syscall_programs(&mut ebpf)?;
        let how = "counted through syscall tracepoints (forced by DKE_NETFLOW_UDP_PEERS=syscalls; every send and receive call of every socket pays for them)";
        return Ok((ebpf, how.into()));
    };
    if config.netflow_udp_unconnected {
        let mut ebpf = load_object(UDP_PEERS_SYSCALLS)?;
        attach_syscall_programs(&mut ebpf)?;
        let how = format!(
            "counted through syscall tracepoints (asked for by --netflow-udp-unconnected; the cgroup programs cannot attach: {failed}; every send and receive call of every socket pays for the tracepoints)"
        );
        return Ok((ebpf, how));
    }
    let ebpf = load_object(UDP_PEERS_OFF)?;
    let how = format!(
        "not counted: the cgroup programs cannot attach ({failed}); --netflow-udp-unconnected counts it through syscall tracepoints instead, which every send and receive call of every socket pays for"
    );
    Ok((ebpf, how))
}

/// Loads the cgroup programs and attaches them to the cgroup v2 root (mounting one if none
/// is): they then see every socket of the host. Returns where, for the log.
fn attach_cgroup_programs(ebpf: &mut Ebpf, host_proc: &Path) -> anyhow::Result<String> {
    let root = cgroup::find_or_mount(host_proc)?;
    let dir = std::fs::File::open(&root.path)
        .with_context(|| format!("opening {}", root.path.display()))?;
    // Other tools' programs on the root must stay, and run too. From 5.7 aya attaches through
    // a BPF link, which the kernel always adds as one of several (BPF_F_ALLOW_MULTI) and which
    // takes no such flag (EINVAL); before, through BPF_PROG_ATTACH, which needs the flag.
    let links = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 7, 0));
    let mode = if links {
        CgroupAttachMode::Single
    } else {
        CgroupAttachMode::AllowMultiple
    };
    for name in CGROUP_PROGRAMS {
        let program: &mut CgroupSockAddr = program_as(ebpf, name)?;
        program.load().with_context(|| format!("loading {name}"))?;
        program
            .attach(&dir, mode)
            .with_context(|| format!("attaching {name} to {}", root.path.display()))?;
    }
    if let Some(note) = cgroup::namespace_note(host_proc) {
        warn!("netflow: {note}");
    }
    Ok(if root.mounted_now {
        format!("{} (mounted now: no cgroup2 was)", root.path.display())
    } else {
        root.path.display().to_string()
    })
}

fn attach_syscall_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for (name, tracepoints) in SYSCALL_PROGRAMS {
        let program: &mut TracePoint = program_as(ebpf, name)?;
        program.load().with_context(|| format!("loading {name}"))?;
        for tracepoint in tracepoints {
            program
                .attach("syscalls", tracepoint)
                .with_context(|| format!("attaching {name} to syscalls/{tracepoint}"))?;
        }
    }
    Ok(())
}

/// How unconnected UDP would be counted here, for `check` (nothing is mounted or loaded).
pub fn udp_peers_plan(config: &Config) -> String {
    if config.netflow_udp_disabled {
        return "not counted (--netflow-udp-disabled: TCP rows only)".into();
    }
    if config.netflow_udp_unconnected_disabled {
        return "not counted (--netflow-udp-unconnected-disabled)".into();
    }
    if config.netflow_udp_peers == UdpPeers::Syscalls {
        return "through syscall tracepoints (forced by DKE_NETFLOW_UDP_PEERS=syscalls)".into();
    }
    let cgroup = match cgroup::find(&config.host_proc) {
        Ok(Some(root)) => Ok(format!("on the cgroup v2 root {}", root.display())),
        _ if cgroup::kernel_has_cgroup2(&config.host_proc) => Ok(format!(
            "on a cgroup2 mounted at {} (none is mounted)",
            cgroup::PRIVATE_MOUNT
        )),
        _ => Err("the kernel has no cgroup2 file system"),
    };
    let fallback = if config.netflow_udp_peers == UdpPeers::Cgroup {
        "none (forced by DKE_NETFLOW_UDP_PEERS=cgroup)"
    } else if config.netflow_udp_unconnected {
        "syscall tracepoints (--netflow-udp-unconnected)"
    } else {
        "none: not counted (--netflow-udp-unconnected would use syscall tracepoints)"
    };
    match cgroup {
        Ok(root) => format!(
            "through cgroup programs sendmsg4/6, recvmsg4/6 {root} (they need kernel 5.7+; where they cannot attach, {fallback})"
        ),
        Err(why) => format!("{why}: cgroup programs cannot attach; {fallback}"),
    }
}

/// Loads and attaches the programs of `tier` (the programs that learn unconnected UDP peers
/// are attached separately: every tier uses them).
fn attach_tier(
    ebpf: &mut Ebpf,
    tier: NetflowTier,
    kernel_btf: &KernelBtf,
    tracefs: Option<&Path>,
) -> anyhow::Result<Vec<Kretprobe>> {
    let mut tp_btf = Vec::new();
    let mut kretprobes = Vec::new();
    match tier {
        NetflowTier::Auto => unreachable!("auto is resolved by choose_tier"),
        NetflowTier::Tracepoint => {
            tp_btf.extend(TP_BTF_IO);
            tp_btf.extend(TP_BTF_TCP);
        }
        NetflowTier::Fentry => {
            for (name, function) in FEXIT_IO {
                let program: &mut FExit = program_as(ebpf, name)?;
                let attached = kernel_btf
                    .function_id(function)
                    .and_then(|id| Ok(program.load_by_id(id)?))
                    .and_then(|()| Ok(program.attach()?));
                match attached {
                    Ok(_) => {}
                    // inet6_* are missing when IPv6 is a module that is not loaded.
                    Err(err) if function.starts_with("inet6_") => {
                        warn!("netflow: IPv6 not counted: fexit/{function}: {err:#}")
                    }
                    Err(err) => return Err(err.context(format!("fexit/{function} ({name})"))),
                }
            }
            tp_btf.extend(TP_BTF_TCP);
        }
        NetflowTier::ClassicTracepoint => {
            for (name, group, event) in CLASSIC_IO.into_iter().chain(CLASSIC_TCP) {
                attach_classic(ebpf, name, group, event)?;
            }
        }
        NetflowTier::Kprobe => {
            for (name, is_return, functions) in KPROBE_IO {
                let kind = if is_return { "kretprobe" } else { "kprobe" };
                let program: &mut KProbe = program_as(ebpf, name)?;
                program.load().with_context(|| format!("loading {name}"))?;
                for function in functions {
                    let attached = match tracefs {
                        // Room for every thread that may be inside a send at once.
                        Some(tracefs) if is_return => {
                            Kretprobe::attach(tracefs, program, function, kretprobe::MAX_ACTIVE)
                                .map(|probe| kretprobes.push(probe))
                        }
                        _ => program.attach(function, 0).map(drop).map_err(Into::into),
                    };
                    match attached {
                        Ok(()) => {}
                        Err(err) if function.starts_with("inet6_") => {
                            warn!("netflow: IPv6 not counted: {kind}/{function}: {err}")
                        }
                        Err(err) => {
                            return Err(
                                err.context(format!("attaching {name} to {kind}/{function}"))
                            );
                        }
                    }
                }
            }
            for (name, group, event) in CLASSIC_TCP {
                attach_classic(ebpf, name, group, event)?;
            }
        }
    }
    for (name, tracepoint) in tp_btf {
        let program: &mut BtfTracePoint = program_as(ebpf, name)?;
        program
            .load_by_id(kernel_btf.tracepoint_id(tracepoint)?)
            .with_context(|| format!("loading {name} for tp_btf/{tracepoint}"))?;
        program
            .attach()
            .with_context(|| format!("attaching {name} to tp_btf/{tracepoint}"))?;
    }
    Ok(kretprobes)
}

fn attach_classic(ebpf: &mut Ebpf, name: &str, group: &str, event: &str) -> anyhow::Result<()> {
    let program: &mut TracePoint = program_as(ebpf, name)?;
    program.load().with_context(|| format!("loading {name}"))?;
    program
        .attach(group, event)
        .with_context(|| format!("attaching {name} to {group}/{event}"))?;
    Ok(())
}

/// The program `name` of the object, as program type `T`.
fn program_as<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?;
    Ok(program.try_into()?)
}

/// (major, minor) of a kernel release such as `5.10.0-46-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Field offsets of the classic tracepoints of TCP state changes and retransmits (kprobe and
/// classic-tracepoint tiers).
fn classic_tracepoint_offsets(tracefs: Option<&Path>) -> anyhow::Result<TracepointOffsets> {
    let tracefs = tracefs.context("this tier needs tracefs for its tracepoints")?;
    let state = crate::kernel::tracepoint_field_offsets(
        tracefs,
        "sock",
        "inet_sock_set_state",
        &["skaddr", "oldstate", "newstate"],
    )?;
    let retransmit =
        crate::kernel::tracepoint_field_offsets(tracefs, "tcp", "tcp_retransmit_skb", &["skaddr"])?;
    let destroy =
        crate::kernel::tracepoint_field_offsets(tracefs, "tcp", "tcp_destroy_sock", &["skaddr"])?;
    Ok(TracepointOffsets {
        state_skaddr: state[0],
        state_oldstate: state[1],
        state_newstate: state[2],
        retransmit_skaddr: retransmit[0],
        destroy_skaddr: destroy[0],
    })
}

/// The classic-tracepoint tier loads `sk`, `ret` and `flags` of `sock_send_length` and
/// `sock_recv_length` at the constant offsets every kernel has had since they exist
/// (CLASSIC_IO_LAYOUT); a kernel whose tracefs says otherwise does not get the tier (auto then
/// takes the next one) rather than misread records.
fn check_classic_io_layout(tracefs: &Path) -> anyhow::Result<()> {
    for event in ["sock_send_length", "sock_recv_length"] {
        let offsets = crate::kernel::tracepoint_field_offsets(
            tracefs,
            "sock",
            event,
            &["sk", "ret", "flags"],
        )?;
        if offsets != CLASSIC_IO_LAYOUT {
            bail!(
                "sock:{event} has sk/ret/flags at offsets {offsets:?}, not the {CLASSIC_IO_LAYOUT:?} \
                 this tier loads them from"
            );
        }
    }
    Ok(())
}

/// An id for a UDP flow among the socket ids: a hash of socket and peer, with the low bit set to
/// keep it apart from socket addresses (kernel pointers, which are aligned).
fn udp_flow_id(key: &UdpFlowKey) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish() | 1
}

/// Process names and listening ports from /proc (`HOST_PROC`), and the local addresses of
/// unbound UDP sockets from each namespace's routing, cached for one interval.
pub(crate) struct ProcResolver {
    proc_root: PathBuf,
    listening: StdHashMap<(u32, u16), HashSet<u16>>,
    names: StdHashMap<u32, String>,
    domains: Option<Arc<DomainCache>>,
    local_addresses: LocalAddresses,
}

impl ProcResolver {
    pub(crate) fn new(proc_root: PathBuf) -> Self {
        Self {
            local_addresses: LocalAddresses::new(proc_root.clone()),
            proc_root,
            listening: StdHashMap::new(),
            names: StdHashMap::new(),
            domains: None,
        }
    }

    pub(crate) fn new_interval(&mut self) {
        self.listening.clear();
        self.names.clear();
        self.local_addresses.new_interval();
    }

    /// Lets go of what only this interval needed (sockets that hold namespaces alive).
    pub(crate) fn end_interval(&mut self) {
        self.local_addresses.release();
    }

    /// The process name as the reference reports it (gopsutil's `Name()`): the process's own
    /// comm (`/proc/<pid>/comm`, its main thread, not the thread that did the I/O), extended to
    /// argv[0]'s basename when the kernel cut it at 15 bytes. A process that has exited keeps
    /// the comm the kernel recorded.
    fn lookup_name(&self, pid: u32, kernel_comm: &[u8; 16]) -> String {
        let dir = self.proc_root.join(pid.to_string());
        let comm = match std::fs::read_to_string(dir.join("comm")) {
            Ok(comm) => comm.trim_end_matches('\n').to_string(),
            Err(_) => {
                let len = kernel_comm
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(kernel_comm.len());
                return String::from_utf8_lossy(&kernel_comm[..len]).into_owned();
            }
        };
        if comm.len() == 15 {
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
            let base = argv0.rsplit(|&b| b == b'/').next().unwrap_or_default();
            let base = String::from_utf8_lossy(base);
            if base.starts_with(&comm) {
                return base.into_owned();
            }
        }
        comm
    }

    /// Listening TCP ports, or bound-but-unconnected UDP ports, in `pid`'s network namespace.
    fn ports(&self, pid: u32, protocol: u16) -> HashSet<u16> {
        let dir = if pid == 0 {
            "self".to_string()
        } else {
            pid.to_string()
        };
        let Ok(process) = procfs::process::Process::new_with_root(self.proc_root.join(dir)) else {
            return HashSet::new();
        };
        let mut ports = HashSet::new();
        if protocol == IPPROTO_TCP {
            for entry in [process.tcp(), process.tcp6()]
                .into_iter()
                .flatten()
                .flatten()
            {
                if entry.state == procfs::net::TcpState::Listen {
                    ports.insert(entry.local_address.port());
                }
            }
        } else {
            for entry in [process.udp(), process.udp6()]
                .into_iter()
                .flatten()
                .flatten()
            {
                if entry.remote_address.port() == 0 {
                    ports.insert(entry.local_address.port());
                }
            }
        }
        ports
    }
}

impl Resolver for ProcResolver {
    fn process_name(&mut self, pid: u32, comm: &[u8; 16]) -> String {
        if let Some(name) = self.names.get(&pid) {
            return name.clone();
        }
        let name = self.lookup_name(pid, comm);
        self.names.insert(pid, name.clone());
        name
    }

    fn domain(&mut self, ip: IpAddr) -> Option<String> {
        self.domains.as_ref()?.get(ip, clock::monotonic_ns())
    }

    fn is_listening(&mut self, pid: u32, protocol: u16, port: u16) -> bool {
        let key = (pid, protocol);
        if !self.listening.contains_key(&key) {
            let ports = self.ports(pid, protocol);
            self.listening.insert(key, ports);
        }
        self.listening[&key].contains(&port)
    }

    fn local_address(&mut self, netns: u32, pid: u32, peer: IpAddr) -> Option<IpAddr> {
        self.local_addresses.lookup(netns, pid, peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tracefs of our own holding `sock_send_length`/`sock_recv_length` format files with `sk`,
    /// `ret` and `flags` at `offsets`.
    fn fake_tracefs(name: &str, offsets: [u32; 3]) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("dke-tracefs-{name}-{}", std::process::id()));
        for event in ["sock_send_length", "sock_recv_length"] {
            let dir = root.join("events/sock").join(event);
            std::fs::create_dir_all(&dir).unwrap();
            let [sk, ret, flags] = offsets;
            std::fs::write(
                dir.join("format"),
                format!(
                    "name: {event}\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                     \tfield:void * sk;\toffset:{sk};\tsize:8;\tsigned:0;\n\
                     \tfield:int ret;\toffset:{ret};\tsize:4;\tsigned:1;\n\
                     \tfield:int flags;\toffset:{flags};\tsize:4;\tsigned:1;\n"
                ),
            )
            .unwrap();
        }
        root
    }

    #[test]
    fn classic_tier_needs_the_layout_its_programs_load() {
        let good = fake_tracefs("good", CLASSIC_IO_LAYOUT);
        assert!(check_classic_io_layout(&good).is_ok());
        let moved = fake_tracefs("moved", [8, 24, 28]);
        let err = check_classic_io_layout(&moved).unwrap_err().to_string();
        assert!(
            err.contains("sock:sock_send_length has sk/ret/flags at offsets [8, 24, 28]"),
            "{err}"
        );
        for dir in [good, moved] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
