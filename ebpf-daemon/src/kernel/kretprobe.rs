//! kretprobes with room for many threads inside the probed function at once.
//!
//! A kretprobe keeps one "instance" per thread between a function's entry and its return;
//! when all are taken, returns are missed (and counted by the kernel only). aya attaches
//! through the kprobe PMU, where the kernel's default applies: max(10, 2 × CPUs) instances, so
//! eleven threads blocked in `inet_sendmsg` on a 4-CPU host already lose sends. tracefs's
//! `kprobe_events` takes the number (`r<MAXACTIVE>:…`, up to 4096, kernel 4.12+): the event is
//! created there and the loaded program attached to it through a tracepoint perf event, as aya
//! itself does where the PMU is missing. The kernel's miss count of the event is read back
//! from `kprobe_profile`.

use std::{
    fs,
    io::{self, Write as _},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::programs::KProbe;

/// The most the kernel allows (`KRETPROBE_MAXACTIVE_MAX`).
pub const MAX_ACTIVE: u32 = 4096;

/// Prefix of the events made here: `dke_<pid>_r_<function>` in the `kprobes` group.
/// `lifecycle::remove_stale_probe_events` removes those of runs that were killed.
pub const EVENT_PREFIX: &str = "dke_";

/// A kretprobe event in tracefs with a loaded program attached; removed on drop.
pub struct Kretprobe {
    tracefs: PathBuf,
    /// `kprobes/dke_<pid>_r_<function>`.
    event: String,
    /// The perf event holding the program; closed before the event is removed.
    perf: Option<OwnedFd>,
}

impl Kretprobe {
    /// Creates `r<max_active>:kprobes/dke_<pid>_r_<function> <function>` and attaches `program`
    /// (loaded, of kprobe type) to it.
    pub fn attach(
        tracefs: &Path,
        program: &KProbe,
        function: &str,
        max_active: u32,
    ) -> anyhow::Result<Kretprobe> {
        let name = format!("{EVENT_PREFIX}{}_r_{function}", std::process::id());
        let event = format!("kprobes/{name}");
        write_events(tracefs, &format!("r{max_active}:{event} {function}"))
            .with_context(|| format!("creating kretprobe {event} in kprobe_events"))?;
        // From here on, dropping `probe` removes the event.
        let mut probe = Kretprobe {
            tracefs: tracefs.to_path_buf(),
            event,
            perf: None,
        };
        let id: u64 = fs::read_to_string(tracefs.join("events").join(&probe.event).join("id"))
            .context("reading the event's id")?
            .trim()
            .parse()
            .context("parsing the event's id")?;
        let perf = open_tracepoint_event(id).context("perf_event_open")?;
        let prog = program.fd().context("the program is not loaded")?;
        // SAFETY: ioctls on our own perf event fd with a program fd argument.
        unsafe {
            if libc::ioctl(
                perf.as_raw_fd(),
                PERF_EVENT_IOC_SET_BPF,
                prog.as_fd().as_raw_fd(),
            ) != 0
            {
                bail!("PERF_EVENT_IOC_SET_BPF: {}", io::Error::last_os_error());
            }
            if libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) != 0 {
                bail!("PERF_EVENT_IOC_ENABLE: {}", io::Error::last_os_error());
            }
        }
        probe.perf = Some(perf);
        Ok(probe)
    }

    /// Returns the kernel missed (no free instance) since the event was made, from
    /// `kprobe_profile` (`<event> <hits> <misses>`).
    pub fn missed(&self) -> Option<u64> {
        let name = self.event.rsplit('/').next()?;
        let profile = fs::read_to_string(self.tracefs.join("kprobe_profile")).ok()?;
        profile.lines().find_map(|line| {
            let mut cols = line.split_whitespace();
            (cols.next()? == name).then(|| cols.nth(1)?.parse().ok())?
        })
    }
}

impl Drop for Kretprobe {
    fn drop(&mut self) {
        // The event cannot be removed while a perf event holds it.
        self.perf.take();
        if let Err(err) = write_events(&self.tracefs, &format!("-:{}", self.event)) {
            tracing::warn!("could not remove kretprobe {}: {err}", self.event);
        }
    }
}

fn write_events(tracefs: &Path, line: &str) -> io::Result<()> {
    fs::OpenOptions::new()
        .append(true)
        .open(tracefs.join("kprobe_events"))?
        .write_all(format!("{line}\n").as_bytes())
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `_IOW('$', 8, __u32)` and `_IO('$', 0)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;

/// `perf_event_open` for trace event `id` on CPU 0, all tasks: a program attached to it runs
/// on every CPU (as for aya's own tracepoint and kprobe attachments). The attribute is the
/// first version's 64 bytes, which every kernel accepts.
fn open_tracepoint_event(id: u64) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 8];
    attr[0] = u64::from(PERF_TYPE_TRACEPOINT) | (64u64 << 32); // type, size
    attr[1] = id; // config
    attr[2] = 1; // sample_period
    attr[3] = PERF_SAMPLE_RAW; // sample_type
    attr[6] = 1; // wakeup_events (low half)
    // SAFETY: a valid perf_event_attr of `size` bytes; the result is a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            -1 as libc::pid_t,
            0 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attribute_layout_is_the_first_version() {
        // type at 0, size at 4 (little-endian u64 view on the hosts this runs on).
        let word = u64::from(PERF_TYPE_TRACEPOINT) | (64u64 << 32);
        assert_eq!(word.to_le_bytes()[..4], 2u32.to_le_bytes());
        assert_eq!(word.to_le_bytes()[4..], 64u32.to_le_bytes());
    }
}
