//! ebpf-bash: every command line typed into bash, as `bash` logging points.
//!
//! A uretprobe on bash's `readline_internal_teardown` (or `readline` where bash does not export
//! the former) copies the returned line into a ring buffer. Hooking the teardown rather than
//! `readline` itself means a shell that was already waiting at its prompt when we attached does
//! not lose its first command: its `readline` call began before the probe existed, so a return
//! probe on it would never fire for that line (bcc's bashreadline made the same move).

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{UProbe, uprobe::UProbeScope},
};
use ebpf_common::bash::{
    BASH_EVENTS_MAP, BASH_FLAG_TRUNCATED, BASH_PROGRAM, BASH_STAT_READ_FAILED,
    BASH_STAT_RINGBUF_FULL, BASH_STATS_MAP, BashEvent,
};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use super::{Availability, GlobalTags, PluginContext, losses::KernelLosses};
use crate::{
    clock,
    config::Config,
    kernel::KernelFeatures,
    lineproto::{Field, Point},
    sender::{Category, Destination},
    users::UserNames,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bash"));

pub const DESTINATION: Destination = Destination {
    category: Category::Logging,
    input: "ebpf-bash",
};

/// Lines waiting beyond this many are sent at once instead of at the next interval tick.
const FLUSH_AT_LINES: usize = 128;

/// What the kernel-side counters mean.
const LOSSES: &[(u32, &str)] = &[
    (BASH_STAT_RINGBUF_FULL, "lines lost: ring buffer full"),
    (
        BASH_STAT_READ_FAILED,
        "lines lost: unreadable process memory",
    ),
];

/// Symbols tried in order; see the module comment.
const SYMBOLS: [&str; 2] = ["readline_internal_teardown", "readline"];

pub fn availability(features: &KernelFeatures, config: &Config) -> Availability {
    let mechanism = "uretprobe on bash readline, ring buffer".to_string();
    let mut missing = Vec::new();
    if !features.uprobes.available {
        missing.push(format!("uprobes: {}", features.uprobes.detail));
    }
    if !features.ringbuf.available {
        missing.push(format!("ring buffer: {}", features.ringbuf.detail));
    }
    let binaries: Vec<PathBuf> = config
        .bash_paths
        .iter()
        .map(|p| host_path(&config.host_root, p))
        .collect();
    if !binaries.iter().any(|p| p.is_file()) {
        missing.push(format!("no bash binary at {binaries:?}"));
    }
    if OBJECT.is_empty() {
        missing.push(
            "this binary was built without eBPF programs (run `cargo xtask bootstrap` and rebuild)"
                .into(),
        );
    }
    Availability {
        can_run: missing.is_empty(),
        mechanism,
        reason: missing.join("; "),
    }
}

/// `path` as seen from the daemon: under `HOST_ROOT` when the daemon runs in a container.
fn host_path(host_root: &Path, path: &Path) -> PathBuf {
    host_root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The loaded and attached probe. Dropping it detaches everything.
pub struct BashCollector {
    _ebpf: Ebpf,
    events: AsyncFd<RingBuf<MapData>>,
    losses: KernelLosses,
}

impl BashCollector {
    /// Loads the program and attaches it to every configured bash binary (once per file, so
    /// `/bin/bash` and `/usr/bin/bash` on a merged-/usr system count once).
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        if OBJECT.is_empty() {
            bail!(
                "this binary was built without eBPF programs (run `cargo xtask bootstrap` and rebuild)"
            );
        }
        // No kernel BTF: these programs have no CO-RE relocations (Rust emits none), and parsing
        // it would cost tens of MB at start for nothing.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .load(OBJECT)
            .context("loading the ebpf-bash object")?;
        let program: &mut UProbe = ebpf
            .program_mut(BASH_PROGRAM)
            .context("program missing from the object")?
            .try_into()?;
        program.load().context("loading the bash uretprobe")?;

        let mut seen = HashSet::new();
        let mut attached = 0;
        for path in &config.bash_paths {
            let binary = host_path(&config.host_root, path);
            let meta = match std::fs::metadata(&binary) {
                Ok(meta) => meta,
                Err(err) => {
                    warn!("ebpf-bash: skipping {}: {err}", binary.display());
                    continue;
                }
            };
            if !seen.insert((meta.dev(), meta.ino())) {
                debug!("ebpf-bash: {} is a file already probed", binary.display());
                continue;
            }
            let mut last_err = None;
            for symbol in SYMBOLS {
                match program.attach(symbol, &binary, UProbeScope::AllProcesses) {
                    Ok(_) => {
                        info!(
                            "ebpf-bash: attached uretprobe to {symbol} in {}",
                            binary.display()
                        );
                        attached += 1;
                        last_err = None;
                        break;
                    }
                    Err(err) => last_err = Some(format!("{symbol}: {err}")),
                }
            }
            if let Some(err) = last_err {
                warn!("ebpf-bash: cannot probe {}: {err}", binary.display());
            }
        }
        if attached == 0 {
            bail!(
                "no bash binary could be probed (tried {:?})",
                config.bash_paths
            );
        }

        let events = RingBuf::try_from(ebpf.take_map(BASH_EVENTS_MAP).context("events map")?)?;
        let stats = PerCpuArray::try_from(ebpf.take_map(BASH_STATS_MAP).context("stats map")?)?;
        let losses = KernelLosses::new("ebpf-bash", stats, LOSSES);
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds it.
        let events = unsafe { AsyncFd::register(events) }
            .map_err(|err| anyhow::anyhow!("polling the ring buffer: {err}"))?;
        Ok(Self {
            _ebpf: ebpf,
            events,
            losses,
        })
    }

    /// Drains events until shutdown; sends lines every interval, or at once when many wait.
    pub async fn run(mut self, mut ctx: PluginContext) -> anyhow::Result<()> {
        let mut users = UserNames::new(&ctx.config.host_root);
        let mut pending: Vec<Point> = Vec::new();
        let mut tick = tokio::time::interval(ctx.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ready = self.events.readable_mut() => {
                    let mut guard = ready?;
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        match decode(&item) {
                            Some(event) => pending.push(bash_point(&event, &mut users, &ctx.tags)),
                            None => warn!("ebpf-bash: short event of {} bytes skipped", item.len()),
                        }
                    }
                    guard.clear_ready();
                    if pending.len() >= FLUSH_AT_LINES {
                        ctx.sender.submit(DESTINATION, std::mem::take(&mut pending));
                    }
                }
                _ = tick.tick() => {
                    if !pending.is_empty() {
                        ctx.sender.submit(DESTINATION, std::mem::take(&mut pending));
                    }
                    self.losses.report();
                }
                _ = ctx.shutdown.changed() => break,
            }
        }
        // Lines already in the ring buffer at shutdown are still delivered.
        while let Some(item) = self.events.get_mut().next() {
            if let Some(event) = decode(&item) {
                pending.push(bash_point(&event, &mut users, &ctx.tags));
            }
        }
        if !pending.is_empty() {
            ctx.sender.submit(DESTINATION, pending);
        }
        self.losses.report();
        Ok(())
    }
}

/// A ring-buffer record, checked for length (the kernel side is trusted for layout only).
struct LineEvent {
    boot_ns: u64,
    pid: u32,
    uid: u32,
    truncated: bool,
    line: Vec<u8>,
}

fn decode(bytes: &[u8]) -> Option<LineEvent> {
    if bytes.len() < size_of::<BashEvent>() {
        return None;
    }
    // SAFETY: length checked above; the record may be unaligned, so read it unaligned.
    let raw: BashEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let len = (raw.len as usize).min(raw.line.len());
    Some(LineEvent {
        boot_ns: raw.boot_ns,
        pid: raw.pid,
        uid: raw.uid,
        truncated: raw.flags & BASH_FLAG_TRUNCATED != 0,
        line: raw.line[..len].to_vec(),
    })
}

/// The `bash` point of contract §1.6, plus `truncated` (true when the line was cut at
/// `BASH_LINE_MAX` bytes). Bytes that are not UTF-8 become U+FFFD.
fn bash_point(event: &LineEvent, users: &mut UserNames, tags: &GlobalTags) -> Point {
    let user = users.name(event.uid);
    let timestamp_ns = clock::boot_to_unix_ns(event.boot_ns);
    let offset = local_offset(timestamp_ns.div_euclid(1_000_000_000));
    build_point(event, &user, timestamp_ns, offset, tags)
}

/// `offset`: the local zone's, seconds east of UTC, for the message's time.
fn build_point(
    event: &LineEvent,
    user: &str,
    timestamp_ns: i64,
    offset: i64,
    tags: &GlobalTags,
) -> Point {
    let cmd = String::from_utf8_lossy(&event.line).into_owned();
    let secs = timestamp_ns.div_euclid(1_000_000_000);
    let message = format!(
        "{} pid:`{}` user:`{user}` cmd:`{cmd}`",
        rfc3339(secs, offset),
        event.pid
    );
    let mut point = Point::new("bash", timestamp_ns)
        .field("cmd", Field::Str(cmd))
        .field("user", Field::Str(user.to_string()))
        .field("pid", Field::Str(event.pid.to_string()))
        .field("message", Field::Str(message))
        .field("truncated", Field::Bool(event.truncated));
    tags.apply(&mut point);
    point
}

/// `unix_secs` as Go's `time.RFC3339` writes it in a zone `offset` seconds east of UTC (the
/// reference formats `time.Now()`, local time): `2026-11-25T14:30:05+08:00`, `Z` for UTC.
fn rfc3339(unix_secs: i64, offset: i64) -> String {
    let local = unix_secs + offset;
    let when = UNIX_EPOCH + Duration::from_secs(local.max(0) as u64);
    // humantime writes UTC as `…Z`; the digits are the local time's once shifted.
    let stamp = humantime::format_rfc3339_seconds(when).to_string();
    let digits = stamp.trim_end_matches('Z');
    if offset == 0 {
        return format!("{digits}Z");
    }
    let sign = if offset < 0 { '-' } else { '+' };
    let minutes = offset.abs() / 60;
    format!("{digits}{sign}{:02}:{:02}", minutes / 60, minutes % 60)
}

/// The local zone's offset from UTC at `unix_secs`, in seconds (TZ, else /etc/localtime; 0
/// when neither says).
fn local_offset(unix_secs: i64) -> i64 {
    let t = unix_secs as libc::time_t;
    // SAFETY: a zeroed `struct tm` is valid; localtime_r only writes it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return 0;
    }
    tm.tm_gmtoff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_time_is_local_with_its_offset_as_go_writes_it() {
        let t = 1_795_588_205; // 2026-11-25T06:30:05Z
        assert_eq!(rfc3339(t, 0), "2026-11-25T06:30:05Z");
        assert_eq!(rfc3339(t, 8 * 3600), "2026-11-25T14:30:05+08:00");
        assert_eq!(rfc3339(t, -(3 * 3600 + 1800)), "2026-11-25T03:00:05-03:30");
        assert_eq!(rfc3339(t, 20 * 3600), "2026-11-26T02:30:05+20:00");
    }

    #[test]
    fn point_matches_the_contract() {
        let event = LineEvent {
            boot_ns: 0,
            pid: 4242,
            uid: 0,
            truncated: false,
            line: b"ls -la \xff".to_vec(),
        };
        let tags = GlobalTags::from_pairs(&[("host", "h1"), ("service", "ebpf"), ("env", "prod")]);
        // 2026-11-25T06:30:05Z, in a UTC local zone.
        let point = build_point(&event, "root", 1_795_588_205_000_000_000, 0, &tags);
        let mut line = String::new();
        point.encode(&mut line).unwrap();
        assert_eq!(
            line,
            "bash,env=prod,host=h1,service=ebpf cmd=\"ls -la \u{fffd}\",user=\"root\",pid=\"4242\",\
             message=\"2026-11-25T06:30:05Z pid:`4242` user:`root` cmd:`ls -la \u{fffd}`\",truncated=false \
             1795588205000000000"
        );
    }
}
