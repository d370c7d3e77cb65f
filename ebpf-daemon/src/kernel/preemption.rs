//! The running kernel's preemption model. Under full, lazy or RT preemption a BPF trampoline
//! (fentry/fexit) or tp_btf program runs with only migration disabled: a task preempted inside
//! one holds it on that CPU, and the kernel skips every other run of that program there until
//! the task resumes (`recursion_misses`), losing those calls. kprobes and classic tracepoints
//! run with preemption off. Dynamic kernels (PREEMPT_DYNAMIC) pick the model at boot, so the
//! build alone does not say; the sources are tried from the most direct.

use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _, path::Path};

use super::Probe;

/// A preemption model as the kernel names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    None,
    Voluntary,
    Full,
    Lazy,
    Rt,
}

impl Mode {
    fn parse(word: &str) -> Option<Self> {
        match word.trim() {
            "none" => Some(Self::None),
            "voluntary" => Some(Self::Voluntary),
            "full" => Some(Self::Full),
            "lazy" => Some(Self::Lazy),
            "rt" => Some(Self::Rt),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Voluntary => "voluntary",
            Self::Full => "full",
            Self::Lazy => "lazy",
            Self::Rt => "rt",
        }
    }

    /// Whether a BPF program may be preempted mid-run.
    pub fn preempts_programs(self) -> bool {
        matches!(self, Self::Full | Self::Lazy | Self::Rt)
    }
}

/// The preemption model, as a probe: yes when programs may be preempted (also when the model
/// cannot be told: assuming it costs a little speed, the opposite would lose calls).
pub fn probe() -> Probe {
    let release = nix::sys::utsname::uname().ok();
    let (release, version) = match &release {
        Some(u) => (
            u.release().to_string_lossy().into_owned(),
            u.version().to_string_lossy().into_owned(),
        ),
        None => (String::new(), String::new()),
    };
    let config = kernel_config(&release);
    let sources = Sources {
        sched_preempt: std::fs::read_to_string("/sys/kernel/debug/sched/preempt").ok(),
        boot_log: boot_log_mode(),
        cmdline: std::fs::read_to_string("/proc/cmdline").ok(),
        config,
        version,
    };
    match sources.mode() {
        Some((mode, from)) if mode.preempts_programs() => Probe {
            available: true,
            detail: format!(
                "{} (from {from}): trampoline and tp_btf programs can be preempted mid-run",
                mode.name()
            ),
        },
        Some((mode, from)) => Probe {
            available: false,
            detail: format!("{} (from {from})", mode.name()),
        },
        None => Probe {
            available: true,
            detail: "unknown (no debugfs sched/preempt, boot log, kernel config or uname marker): assumed preemptible".into(),
        },
    }
}

/// What the kernel tells about its preemption model, each possibly unavailable.
#[derive(Debug, Default)]
struct Sources {
    /// `/sys/kernel/debug/sched/preempt`: `none voluntary full (lazy)`, the current in brackets.
    sched_preempt: Option<String>,
    /// `Dynamic Preempt: lazy` from the boot log.
    boot_log: Option<Mode>,
    cmdline: Option<String>,
    /// The kernel's config (`/proc/config.gz` or `/boot/config-RELEASE`).
    config: Option<String>,
    /// `uname -v`: `#1 SMP PREEMPT_DYNAMIC ...`, `PREEMPT_RT`, `PREEMPT` or none of these.
    version: String,
}

impl Sources {
    fn mode(&self) -> Option<(Mode, &'static str)> {
        if let Some(mode) = self.sched_preempt.as_deref().and_then(current_of_list) {
            return Some((mode, "debugfs sched/preempt"));
        }
        if let Some(mode) = self.boot_log {
            return Some((mode, "the boot log"));
        }
        let config = |key: &str| {
            self.config
                .as_deref()
                .is_some_and(|c| c.lines().any(|l| l.trim() == format!("{key}=y")))
        };
        let words: Vec<&str> = self.version.split_whitespace().collect();
        if words.contains(&"PREEMPT_RT") || config("CONFIG_PREEMPT_RT") {
            return Some((Mode::Rt, "the kernel build"));
        }
        let dynamic = words.contains(&"PREEMPT_DYNAMIC") || config("CONFIG_PREEMPT_DYNAMIC");
        if dynamic {
            let chosen = self.cmdline.as_deref().and_then(|cmdline| {
                cmdline
                    .split_whitespace()
                    .find_map(|arg| arg.strip_prefix("preempt="))
                    .and_then(Mode::parse)
            });
            if let Some(mode) = chosen {
                return Some((mode, "the kernel command line"));
            }
        }
        // The build's choice: the model of a static build, the boot default of a dynamic one.
        let built = [
            ("CONFIG_PREEMPT_NONE", Mode::None),
            ("CONFIG_PREEMPT_VOLUNTARY", Mode::Voluntary),
            ("CONFIG_PREEMPT", Mode::Full),
            ("CONFIG_PREEMPT_LAZY", Mode::Lazy),
        ]
        .into_iter()
        .find(|(key, _)| config(key));
        if let Some((_, mode)) = built {
            return Some((mode, "the kernel config"));
        }
        if dynamic {
            return None;
        }
        if words.contains(&"PREEMPT") {
            return Some((Mode::Full, "uname -v"));
        }
        // A static build without a marker is none or voluntary: neither preempts programs.
        if !words.is_empty() {
            return Some((
                Mode::Voluntary,
                "uname -v: no PREEMPT marker, none or voluntary",
            ));
        }
        None
    }
}

/// The bracketed entry of a `none voluntary (full) lazy` list.
fn current_of_list(list: &str) -> Option<Mode> {
    list.split_whitespace()
        .find_map(|w| w.strip_prefix('(')?.strip_suffix(')'))
        .and_then(Mode::parse)
}

/// `Dynamic Preempt: MODE` from `/dev/kmsg` (records `PRI,SEQ,TS,FLAGS;TEXT`, one per read),
/// printed early at boot; the log may have been overwritten since.
fn boot_log_mode() -> Option<Mode> {
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut record = vec![0u8; 8192];
    for _ in 0..4096 {
        match kmsg.read(&mut record) {
            Ok(0) => return None,
            Ok(n) => {
                let text = String::from_utf8_lossy(&record[..n]);
                if let Some(mode) = dynamic_preempt_record(&text) {
                    return Some(mode);
                }
            }
            // EPIPE: records overwritten while reading; the next read goes on.
            Err(err) if err.raw_os_error() == Some(nix::libc::EPIPE) => continue,
            Err(_) => return None,
        }
    }
    None
}

fn dynamic_preempt_record(record: &str) -> Option<Mode> {
    let (_, text) = record.split_once(';')?;
    Mode::parse(text.lines().next()?.strip_prefix("Dynamic Preempt:")?)
}

/// The kernel's build config, if it is published.
fn kernel_config(release: &str) -> Option<String> {
    if let Ok(file) = std::fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .is_ok()
        {
            return Some(text);
        }
    }
    let boot = Path::new("/boot").join(format!("config-{release}"));
    std::fs::read_to_string(boot).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Sources {
        Sources::default()
    }

    #[test]
    fn debugfs_list_names_the_current_mode() {
        assert_eq!(
            current_of_list("none voluntary full (lazy)\n"),
            Some(Mode::Lazy)
        );
        assert_eq!(current_of_list("(none) voluntary full"), Some(Mode::None));
        assert_eq!(current_of_list("none voluntary full"), None);
    }

    #[test]
    fn boot_log_record() {
        assert_eq!(
            dynamic_preempt_record("6,112,248638,-;Dynamic Preempt: lazy\n"),
            Some(Mode::Lazy)
        );
        assert_eq!(
            dynamic_preempt_record("6,112,248638,-;Dynamic Preempt: none\n SUBSYSTEM=x"),
            Some(Mode::None)
        );
        assert_eq!(dynamic_preempt_record("6,1,2,-;rcu: Preemptible"), None);
    }

    #[test]
    fn debugfs_wins_over_everything() {
        let s = Sources {
            sched_preempt: Some("none (voluntary) full lazy".into()),
            boot_log: Some(Mode::Full),
            version: "#1 SMP PREEMPT_RT".into(),
            ..sources()
        };
        assert_eq!(s.mode(), Some((Mode::Voluntary, "debugfs sched/preempt")));
    }

    #[test]
    fn dynamic_build_uses_the_command_line_then_the_config_default() {
        let dynamic = Sources {
            version: "#1 SMP PREEMPT_DYNAMIC Debian 7.2.1-1".into(),
            config: Some("CONFIG_PREEMPT_DYNAMIC=y\nCONFIG_PREEMPT_LAZY=y\n".into()),
            ..sources()
        };
        assert_eq!(dynamic.mode(), Some((Mode::Lazy, "the kernel config")));
        let chosen = Sources {
            cmdline: Some("root=/dev/vda preempt=none quiet".into()),
            ..dynamic
        };
        assert_eq!(chosen.mode(), Some((Mode::None, "the kernel command line")));
        // A dynamic build with nothing else to go by is unknown (probe() assumes preemptible).
        let bare = Sources {
            version: "#1 SMP PREEMPT_DYNAMIC".into(),
            ..sources()
        };
        assert_eq!(bare.mode(), None);
    }

    #[test]
    fn static_builds_by_marker() {
        let full = Sources {
            version: "#1 SMP PREEMPT Tue".into(),
            ..sources()
        };
        assert_eq!(full.mode(), Some((Mode::Full, "uname -v")));
        let rt = Sources {
            version: "#1 SMP PREEMPT_RT Tue".into(),
            ..sources()
        };
        assert_eq!(rt.mode().map(|m| m.0), Some(Mode::Rt));
        let plain = Sources {
            version: "#1 SMP Tue".into(),
            ..sources()
        };
        assert!(!plain.mode().unwrap().0.preempts_programs());
    }

    #[test]
    fn only_full_lazy_and_rt_preempt_programs() {
        assert!(!Mode::None.preempts_programs());
        assert!(!Mode::Voluntary.preempts_programs());
        assert!(Mode::Full.preempts_programs());
        assert!(Mode::Lazy.preempts_programs());
        assert!(Mode::Rt.preempts_programs());
    }
}
