//! Process lifecycle: the pid file, tracefs, leftovers of a killed run, and shutdown signals.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use tokio::sync::watch;
use tracing::{info, warn};

/// The pid file, removed again on a clean exit (drop).
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes our pid to `path`. Refuses to start when the file names another live
    /// `datakit-ebpf`; a stale file (dead pid, or a pid reused by another program) is replaced.
    pub fn acquire(path: &Path) -> anyhow::Result<Self> {
        if let Ok(text) = fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse::<u32>()
            && pid != std::process::id()
            && process_name(pid).is_some_and(|name| name.starts_with("datakit-ebpf"))
        {
            bail!(
                "another datakit-ebpf is running as pid {pid} (pid file {})",
                path.display()
            );
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = fs::File::create(path)
            .with_context(|| format!("writing pid file {}", path.display()))?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// `comm` of a live process, None when it does not exist.
pub fn process_name(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const DEBUGFS: &str = "/sys/kernel/debug";

fn is_populated(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

/// The tracefs directory, mounting tracefs (and debugfs) when they are not mounted yet, as
/// DataKit's own deployments do. Tracepoint and probe attachment needs it.
pub fn ensure_tracefs() -> Option<PathBuf> {
    let tracefs = Path::new(TRACEFS);
    if !is_populated(tracefs) {
        match nix::mount::mount(
            Some("tracefs"),
            tracefs,
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) => info!("mounted tracefs at {TRACEFS}"),
            Err(err) => warn!("tracefs is not mounted at {TRACEFS} and mounting it failed: {err}"),
        }
    }
    let debugfs = Path::new(DEBUGFS);
    if !is_populated(debugfs)
        && nix::mount::mount(
            Some("debugfs"),
            debugfs,
            Some("debugfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .is_ok()
    {
        info!("mounted debugfs at {DEBUGFS}");
    }
    [tracefs.to_path_buf(), debugfs.join("tracing")]
        .into_iter()
        .find(|p| p.join("events").is_dir())
}

/// Removes probe events that a SIGKILLed run left in tracefs. aya names them
/// `aya_<pid>_<kind>_…`, our own kretprobes `dke_<pid>_r_…` (`kernel::kretprobe`); an entry
/// whose pid is gone is stale.
pub fn remove_stale_probe_events(tracefs: &Path) {
    for kind in ["kprobe", "uprobe"] {
        let events = tracefs.join(format!("{kind}_events"));
        let Ok(text) = fs::read_to_string(&events) else {
            continue;
        };
        for line in text.lines() {
            // "p:uprobes/aya_1234_r_readline_0x0_0 /bin/bash:0x..." → group/event
            let Some(event) = line
                .split_whitespace()
                .next()
                .and_then(|def| def.split_once(':'))
                .map(|(_, event)| event)
            else {
                continue;
            };
            let ours = format!("/{}", crate::kernel::kretprobe::EVENT_PREFIX);
            let Some(pid) = ["/aya_", ours.as_str()]
                .iter()
                .find_map(|prefix| event.split_once(prefix))
                .and_then(|(_, rest)| rest.split('_').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let removed = fs::OpenOptions::new()
                .append(true)
                .open(&events)
                .and_then(|mut f| f.write_all(format!("-:{event}\n").as_bytes()));
            match removed {
                Ok(()) => info!("removed stale probe event {event} left by a killed run"),
                Err(err) => warn!("could not remove stale probe event {event}: {err}"),
            }
        }
    }
}

/// A shutdown flag flipped by SIGTERM or SIGINT (DataKit stops its child with SIGKILL, a user or
/// systemd with SIGTERM). SIGHUP is ignored so a closing terminal does not stop the daemon.
pub fn shutdown_signal() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { info!("SIGINT: shutting down"); break; }
                _ = hup.recv() => info!("SIGHUP ignored"),
            }
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Gives the heap's free memory back to the system. glibc keeps what a burst freed (the kernel's
/// BTF at start, an interval's rows over thousands of connections) as RSS otherwise.
pub fn return_free_memory() {
    // SAFETY: glibc's malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}
