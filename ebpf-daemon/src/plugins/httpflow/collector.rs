//! Loads the httpflow programs, drains their ring buffers (exchanges parsed in the kernel, and
//! the calls of connections that fell back to userspace framing, into per-connection streams)
//! and each interval posts the `httpflow` rows. With httpflow-tls, also attaches the OpenSSL
//! uprobes and rescans for new library files.

use std::time::Duration;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{FEntry, FExit, TracePoint},
};
use ebpf_common::httpflow::{
    CAPTURE, DIR_WRITE, EVENTS_MAP, EX_OUTGOING, EX_TRUNCATED, EXCHANGES_MAP, HTTP_STAT_EXCHANGES,
    HTTP_STAT_FALLBACKS, HTTP_STAT_ORPHAN_RESPONSES, HTTP_STAT_READ_FAILED, HTTP_STAT_RINGBUF_FULL,
    HTTP_STAT_TLS_MISMATCH, HTTP_STAT_TLS_NO_SOCKET, HTTP_STAT_UNANSWERED, HttpEvent, HttpExchange,
    ITER_OFFSETS_GLOBAL, IterOffsets, KIND_CLOSE, KIND_SEED, METHODS, OFFSETS_GLOBAL,
    OWN_PID_GLOBAL, PATH_CAPTURE, STATS_MAP, TLS_GLOBAL,
};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use super::{
    aggregate::{Aggregator, HttpOptions},
    stream::{Call, ConnMeta, Exchange, Seed, Streams},
    tier::TierChoice,
    tls::TlsAttacher,
};
use crate::{
    btf::KernelBtf,
    clock,
    config::{Config, HttpflowTier},
    plugins::{
        PluginContext, losses::KernelLosses, misses::Misses, netflow::aggregate::Resolver as _,
        netflow::collector::ProcResolver,
    },
    sender::{Category, Destination},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/httpflow"));

pub const DESTINATION: Destination = Destination {
    category: Category::Network,
    input: "ebpf-net/httpflow",
};

/// Longest `path` reported, in bytes (longer ones are cut): what the kernel keeps.
pub const PATH_MAX: usize = PATH_CAPTURE;
/// Connections followed at once; the least recently active is dropped (counted) beyond.
const MAX_CONNS: usize = 16_384;
/// A connection with no call for this long is closed (its TCP close was not seen).
const IDLE: Duration = Duration::from_secs(180);
/// How often the ring buffers are drained: the kernel wakes the daemon only when they fill up,
/// so that a busy server does not mean a busy daemon.
const DRAIN: Duration = Duration::from_millis(100);
/// How often httpflow-tls looks for newly mapped OpenSSL library files.
const TLS_RESCAN: Duration = Duration::from_secs(5);

const LOSSES: &[(u32, &str)] = &[
    (
        HTTP_STAT_RINGBUF_FULL,
        "calls not captured: ring buffer full",
    ),
    (
        HTTP_STAT_READ_FAILED,
        "calls skipped: kernel or user memory read failed",
    ),
    (
        HTTP_STAT_TLS_NO_SOCKET,
        "OpenSSL calls not captured: their socket was not seen",
    ),
    (
        HTTP_STAT_TLS_MISMATCH,
        "OpenSSL calls not captured: entry and return probes did not match",
    ),
];

/// (program, syscall tracepoints).
const SYSCALL_PROGRAMS: [(&str, &[&str]); 8] = [
    (
        "httpflow_read_enter",
        &["sys_enter_read", "sys_enter_recvfrom"],
    ),
    (
        "httpflow_write_enter",
        &["sys_enter_write", "sys_enter_sendto"],
    ),
    ("httpflow_readv_enter", &["sys_enter_readv"]),
    ("httpflow_writev_enter", &["sys_enter_writev"]),
    ("httpflow_recvmsg_enter", &["sys_enter_recvmsg"]),
    ("httpflow_sendmsg_enter", &["sys_enter_sendmsg"]),
    ("httpflow_sendfile_enter", &["sys_enter_sendfile64"]),
    (
        "httpflow_exit",
        &[
            "sys_exit_read",
            "sys_exit_recvfrom",
            "sys_exit_write",
            "sys_exit_sendto",
            "sys_exit_readv",
            "sys_exit_writev",
            "sys_exit_recvmsg",
            "sys_exit_sendmsg",
            "sys_exit_sendfile64",
        ],
    ),
];

/// (fentry program, fexit program, kernel function) of the fentry tier, each attached twice
/// (the twin's names end in `_b`; see the probe for why).
const FENTRY_PROGRAMS: [(&str, &str, &str); 4] = [
    (
        "httpflow_inet_send",
        "httpflow_inet_send_ret",
        "inet_sendmsg",
    ),
    (
        "httpflow_inet6_send",
        "httpflow_inet6_send_ret",
        "inet6_sendmsg",
    ),
    (
        "httpflow_inet_recv",
        "httpflow_inet_recv_ret",
        "inet_recvmsg",
    ),
    (
        "httpflow_inet6_recv",
        "httpflow_inet6_recv_ret",
        "inet6_recvmsg",
    ),
];
const TWIN_SUFFIX: &str = "_b";

/// sendfile before 6.5 (sendpage): fexit only, when the kernel has it.
const SENDPAGE: (&str, &str) = ("httpflow_inet_sendpage", "inet_sendpage");

/// The fentry tier's programs by the calls they see (twins together).
const FENTRY_MISS_GROUPS: [&[&str]; 9] = [
    &["httpflow_inet_send", "httpflow_inet_send_b"],
    &["httpflow_inet6_send", "httpflow_inet6_send_b"],
    &["httpflow_inet_recv", "httpflow_inet_recv_b"],
    &["httpflow_inet6_recv", "httpflow_inet6_recv_b"],
    &["httpflow_inet_send_ret", "httpflow_inet_send_ret_b"],
    &["httpflow_inet6_send_ret", "httpflow_inet6_send_ret_b"],
    &["httpflow_inet_recv_ret", "httpflow_inet_recv_ret_b"],
    &["httpflow_inet6_recv_ret", "httpflow_inet6_recv_ret_b"],
    &["httpflow_inet_sendpage"],
];

/// Programs whose skipped runs lose calls (the enter and exit halves of each syscall).
const MISS_GROUPS: [&[&str]; 8] = [
    &["httpflow_read_enter"],
    &["httpflow_write_enter"],
    &["httpflow_readv_enter"],
    &["httpflow_writev_enter"],
    &["httpflow_recvmsg_enter"],
    &["httpflow_sendmsg_enter"],
    &["httpflow_sendfile_enter"],
    &["httpflow_exit"],
];

pub fn object_is_empty() -> bool {
    OBJECT.is_empty()
}

pub struct HttpflowCollector {
    ebpf: Ebpf,
    exchanges: AsyncFd<RingBuf<MapData>>,
    events: AsyncFd<RingBuf<MapData>>,
    /// In-kernel counters already logged: (exchanges, fallbacks, unanswered, orphans).
    logged: [u64; 4],
    losses: KernelLosses,
    misses: Misses,
    streams: Streams,
    aggregator: Aggregator,
    resolver: ProcResolver,
    tls: Option<TlsAttacher>,
}

impl HttpflowCollector {
    pub fn load(
        config: &Config,
        kernel_btf: &KernelBtf,
        tier: &TierChoice,
        tls: bool,
    ) -> anyhow::Result<Self> {
        if OBJECT.is_empty() {
            bail!(
                "this binary was built without eBPF programs (run `cargo xtask bootstrap` and rebuild)"
            );
        }
        let offsets = kernel_btf
            .http_offsets()
            .context("reading struct offsets from kernel BTF")?;
        debug!("httpflow: kernel offsets {offsets:?}");
        let iter_offsets = match tier.tier {
            HttpflowTier::Fentry => kernel_btf
                .iter_offsets()
                .context("reading struct iov_iter offsets from kernel BTF")?,
            _ => IterOffsets::default(),
        };
        debug!("httpflow: iov_iter offsets {iter_offsets:?}");
        let own_pid = std::process::id();
        let tls_on = u32::from(tls);
        // No kernel BTF for the loader: the programs have no CO-RE relocations; the fentry tier
        // attaches by the ids our BTF reader found.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .override_global(OFFSETS_GLOBAL, &offsets, true)
            .override_global(ITER_OFFSETS_GLOBAL, &iter_offsets, true)
            .override_global(OWN_PID_GLOBAL, &own_pid, true)
            .override_global(TLS_GLOBAL, &tls_on, true)
            .load(OBJECT)
            .context("loading the httpflow object")?;
        let misses: &'static [&'static [&'static str]] = match tier.tier {
            HttpflowTier::Fentry => {
                attach_fentry(&mut ebpf, kernel_btf)?;
                &FENTRY_MISS_GROUPS
            }
            _ => {
                attach_syscalls(&mut ebpf)?;
                &MISS_GROUPS
            }
        };
        let program: &mut TracePoint = ebpf
            .program_mut("httpflow_state")
            .context("program httpflow_state missing from the object")?
            .try_into()?;
        program.load().context("loading httpflow_state")?;
        program
            .attach("sock", "inet_sock_set_state")
            .context("attaching httpflow_state to sock/inet_sock_set_state")?;
        let tls = if tls {
            let mut attacher = TlsAttacher::new(&mut ebpf, config.host_proc.clone(), own_pid)
                .context("loading the OpenSSL uprobes")?;
            attacher.scan(&mut ebpf);
            Some(attacher)
        } else {
            None
        };
        info!(
            "httpflow: attached at the {} tier ({}){}",
            tier.tier.name(),
            tier.reason,
            if tls.is_some() {
                ", OpenSSL uprobes"
            } else {
                ""
            }
        );
        let ring = |ebpf: &mut Ebpf, name: &str| -> anyhow::Result<AsyncFd<RingBuf<MapData>>> {
            let ring = RingBuf::try_from(ebpf.take_map(name).context("ring buffer")?)?;
            // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds it.
            unsafe { AsyncFd::register(ring) }
                .map_err(|err| anyhow::anyhow!("polling the ring buffer {name}: {err}"))
        };
        let exchanges = ring(&mut ebpf, EXCHANGES_MAP)?;
        let events = ring(&mut ebpf, EVENTS_MAP)?;
        let stats = PerCpuArray::try_from(ebpf.take_map(STATS_MAP).context("stats map")?)?;
        Ok(Self {
            ebpf,
            exchanges,
            events,
            logged: [0; 4],
            losses: KernelLosses::new("httpflow", stats, LOSSES),
            misses: Misses::new("httpflow", misses),
            streams: Streams::new(MAX_CONNS),
            aggregator: Aggregator::new(HttpOptions {
                ephemeral_port_min: config.ephemeral_port.unwrap_or(0),
                include_loopback: config.netflow_include_loopback,
                path_max: PATH_MAX,
                path_normalize: config.httpflow_path_normalize,
            }),
            resolver: ProcResolver::new(config.host_proc.clone()),
            tls,
        })
    }

    pub async fn run(mut self, mut ctx: PluginContext) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(ctx.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut rescan = tokio::time::interval(TLS_RESCAN);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await;
        let mut drain_tick = tokio::time::interval(DRAIN);
        drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut exchanges = Vec::new();
        loop {
            tokio::select! {
                ready = self.exchanges.readable_mut() => {
                    let mut guard = ready?;
                    drain_exchanges(guard.get_inner_mut(), &mut exchanges);
                    guard.clear_ready();
                    self.aggregate(&mut exchanges);
                }
                ready = self.events.readable_mut() => {
                    let mut guard = ready?;
                    drain_events(guard.get_inner_mut(), &mut self.streams, &mut exchanges);
                    guard.clear_ready();
                    self.aggregate(&mut exchanges);
                }
                _ = drain_tick.tick() => {
                    self.drain(&mut exchanges);
                    self.aggregate(&mut exchanges);
                }
                _ = tick.tick() => self.report(&ctx, &mut exchanges),
                _ = rescan.tick(), if self.tls.is_some() => {
                    if let Some(tls) = &mut self.tls {
                        tls.scan(&mut self.ebpf);
                    }
                }
                _ = ctx.shutdown.changed() => break,
            }
        }
        self.report(&ctx, &mut exchanges);
        Ok(())
    }

    fn aggregate(&mut self, exchanges: &mut Vec<Exchange>) {
        for e in exchanges.drain(..) {
            let name = self.resolver.process_name(e.meta.pid, &e.meta.comm);
            self.aggregator.add(&e, &name);
        }
    }

    /// Both ring buffers, exchanges first: a connection's exchanges parsed in the kernel come
    /// before its fallback (which starts with a seed).
    fn drain(&mut self, exchanges: &mut Vec<Exchange>) {
        drain_exchanges(self.exchanges.get_mut(), exchanges);
        drain_events(self.events.get_mut(), &mut self.streams, exchanges);
    }

    fn report(&mut self, ctx: &PluginContext, exchanges: &mut Vec<Exchange>) {
        self.drain(exchanges);
        let idle_before = clock::monotonic_ns().saturating_sub(IDLE.as_nanos() as u64);
        self.streams.expire(idle_before, exchanges);
        self.aggregate(exchanges);
        self.resolver.new_interval();
        let points = self.aggregator.take(&ctx.tags, clock::now_unix_ns());
        debug!(
            "httpflow: {} rows, {} connections followed, {:?}, {} filtered",
            points.len(),
            self.streams.tracked(),
            self.streams.stats,
            self.aggregator.filtered
        );
        if !points.is_empty() {
            ctx.sender.submit(DESTINATION, points);
        }
        self.log_kernel_counters();
        self.losses.report();
        self.misses.report(&self.ebpf);
    }
}

impl HttpflowCollector {
    /// The kernel parser's own counts: exchanges at debug level; connections that fell back
    /// to userspace framing at info level (they cost more, but lose nothing).
    fn log_kernel_counters(&mut self) {
        let now = [
            HTTP_STAT_EXCHANGES,
            HTTP_STAT_FALLBACKS,
            HTTP_STAT_UNANSWERED,
            HTTP_STAT_ORPHAN_RESPONSES,
        ]
        .map(|index| self.losses.total(index));
        let [exchanges, fallbacks, unanswered, orphans] = now;
        debug!(
            "httpflow: in the kernel: {exchanges} exchanges, {fallbacks} connections handed to \
             userspace, {unanswered} requests unanswered, {orphans} responses without a request \
             (totals)"
        );
        if fallbacks > self.logged[1] {
            info!(
                "httpflow: {} connections framed in userspace (pipelined requests; total {fallbacks})",
                fallbacks - self.logged[1]
            );
        }
        self.logged = now;
    }
}

fn attach_syscalls(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for &(name, tracepoints) in &SYSCALL_PROGRAMS {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
        for tracepoint in tracepoints.iter() {
            program
                .attach("syscalls", tracepoint)
                .with_context(|| format!("attaching {name} to syscalls/{tracepoint}"))?;
        }
    }
    Ok(())
}

fn attach_fentry(ebpf: &mut Ebpf, kernel_btf: &KernelBtf) -> anyhow::Result<()> {
    for (entry, exit, function) in FENTRY_PROGRAMS {
        let attached = (|| -> anyhow::Result<()> {
            for suffix in ["", TWIN_SUFFIX] {
                let name = format!("{entry}{suffix}");
                let program: &mut FEntry = ebpf
                    .program_mut(&name)
                    .with_context(|| format!("program {name} missing from the object"))?
                    .try_into()?;
                program.load_by_id(kernel_btf.function_id(function)?)?;
                program.attach()?;
                let name = format!("{exit}{suffix}");
                let program: &mut FExit = ebpf
                    .program_mut(&name)
                    .with_context(|| format!("program {name} missing from the object"))?
                    .try_into()?;
                program.load_by_id(kernel_btf.function_id(function)?)?;
                program.attach()?;
            }
            Ok(())
        })();
        match attached {
            Ok(()) => {}
            // inet6_* are missing when IPv6 is a module that is not loaded.
            Err(err) if function.starts_with("inet6_") => {
                warn!("httpflow: IPv6 not captured: fentry/fexit {function}: {err:#}")
            }
            Err(err) => return Err(err.context(format!("fentry/fexit {function}"))),
        }
    }
    let (name, function) = SENDPAGE;
    if kernel_btf.has_function(function) {
        let program: &mut FExit = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        program.load_by_id(kernel_btf.function_id(function)?)?;
        program
            .attach()
            .with_context(|| format!("fexit/{function} ({name})"))?;
    }
    Ok(())
}

/// The ring's next record, read as a `T` (one of the plain `repr(C)` records of
/// `ebpf_common::httpflow`); short records are skipped with a warning.
fn next_record<T: Copy>(ring: &mut RingBuf<MapData>) -> Option<T> {
    loop {
        let item = ring.next()?;
        if item.len() < size_of::<T>() {
            warn!("httpflow: short record of {} bytes skipped", item.len());
            continue;
        }
        // SAFETY: length checked; `T` is plain data; the record may be unaligned.
        return Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
    }
}

/// Exchanges parsed in the kernel, as rows' input.
fn drain_exchanges(ring: &mut RingBuf<MapData>, out: &mut Vec<Exchange>) {
    while let Some(ex) = next_record::<HttpExchange>(ring) {
        out.push(exchange_of(&ex));
    }
}

fn exchange_of(ex: &HttpExchange) -> Exchange {
    let outgoing = ex.flags & EX_OUTGOING != 0;
    let (bytes_read, bytes_written) = if outgoing {
        (ex.resp_bytes, ex.req_bytes)
    } else {
        (ex.req_bytes, ex.resp_bytes)
    };
    let path = &ex.path[..(ex.path_len as usize).min(PATH_CAPTURE)];
    Exchange {
        meta: ConnMeta {
            ends: ex.ends,
            pid: ex.pid,
            comm: ex.comm,
        },
        outgoing,
        method: method_name(ex.method),
        target: String::from_utf8_lossy(path).into_owned(),
        version: if ex.minor == b'0' { "1.0" } else { "1.1" },
        status: ex.status,
        latency_ns: ex.latency_ns,
        bytes_read,
        bytes_written,
        truncated: ex.flags & EX_TRUNCATED != 0,
    }
}

fn method_name(code: u8) -> String {
    METHODS
        .get((code as usize).wrapping_sub(1))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default()
}

/// Calls of connections that fell back to userspace framing.
fn drain_events(ring: &mut RingBuf<MapData>, streams: &mut Streams, out: &mut Vec<Exchange>) {
    while let Some(ev) = next_record::<HttpEvent>(ring) {
        if ev.kind == KIND_CLOSE {
            streams.on_close(ev.conn, out);
            continue;
        }
        let meta = ConnMeta {
            ends: ev.ends,
            pid: ev.pid,
            comm: ev.comm,
        };
        if ev.kind == KIND_SEED {
            let path = &ev.data[..(ev.captured as usize).min(PATH_CAPTURE)];
            streams.on_seed(
                ev.conn,
                meta,
                Seed {
                    method: method_name((ev.flags >> 8) as u8),
                    target: String::from_utf8_lossy(path).into_owned(),
                    truncated: ev.flags & (1 << 16) != 0,
                    write: ev.direction == DIR_WRITE,
                    bytes: ev.total,
                    ts_ns: ev.ts_ns,
                },
            );
            continue;
        }
        let captured = (ev.captured as usize).min(CAPTURE);
        let call = Call {
            conn: ev.conn,
            ts_ns: ev.ts_ns,
            write: ev.direction == DIR_WRITE,
            total: ev.total,
            data: &ev.data[..captured],
        };
        streams.on_call(&call, || meta, out);
    }
}
