//! What the running kernel offers for eBPF, probed at start (and printed by `datakit-ebpf check`).
//! Each probe records a reason, so a refusal to run says why instead of a bare EINVAL.

use std::path::{Path, PathBuf};

pub mod kretprobe;
mod preemption;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported_with_attach_id},
};

/// One capability and why it is (not) there.
#[derive(Debug, Clone)]
pub struct Probe {
    pub available: bool,
    pub detail: String,
}

impl Probe {
    fn yes(detail: impl Into<String>) -> Self {
        Self {
            available: true,
            detail: detail.into(),
        }
    }
    fn no(detail: impl Into<String>) -> Self {
        Self {
            available: false,
            detail: detail.into(),
        }
    }
    fn from_path(path: &Path, what: &str) -> Self {
        if path.exists() {
            Self::yes(format!("{} exists", path.display()))
        } else {
            Self::no(format!("{} missing: {what}", path.display()))
        }
    }
}

#[derive(Debug, Clone)]
pub struct KernelFeatures {
    pub release: String,
    /// Where tracefs is mounted, if it is.
    pub tracefs_path: Option<PathBuf>,
    pub btf: Probe,
    pub tracefs: Probe,
    pub tracepoints: Probe,
    pub kprobes: Probe,
    pub fentry: Probe,
    pub uprobes: Probe,
    pub ringbuf: Probe,
    pub perf_event_array: Probe,
    /// Yes when the kernel may preempt a BPF program mid-run (full, lazy or RT preemption):
    /// it then skips trampoline and tp_btf programs on that CPU until the run resumes.
    pub preemption: Probe,
}

impl KernelFeatures {
    /// `btf_file` is `--btf`, used when the kernel has no `/sys/kernel/btf/vmlinux`;
    /// `trampoline_target`: the BTF id of [`crate::btf::TRAMPOLINE_PROBE`], when known.
    pub fn probe(
        tracefs: Option<&Path>,
        btf_file: Option<&Path>,
        trampoline_target: Option<u32>,
    ) -> Self {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        let btf = match btf_file {
            Some(path) => Probe::from_path(path, "the --btf file does not exist"),
            None => Probe::from_path(
                Path::new("/sys/kernel/btf/vmlinux"),
                "kernel built without CONFIG_DEBUG_INFO_BTF; pass --btf FILE",
            ),
        };
        let tracefs_probe = match tracefs {
            Some(path) => Probe::yes(format!("mounted at {}", path.display())),
            None => Probe::no(
                "not mounted at /sys/kernel/tracing or /sys/kernel/debug/tracing, and mounting failed",
            ),
        };
        let tracepoints = match tracefs {
            Some(path) => Probe::from_path(
                &path.join("events/sched/sched_process_exit/id"),
                "no tracepoint events (CONFIG_BPF_EVENTS / CONFIG_TRACEPOINTS off?)",
            ),
            None => Probe::no("needs tracefs"),
        };
        let kprobes = pmu_or_tracefs("kprobe", tracefs, "CONFIG_KPROBES is off");
        let uprobes = pmu_or_tracefs("uprobe", tracefs, "CONFIG_UPROBE_EVENTS is off");
        // A trampoline program loaded against a known kernel function: the id comes from our
        // BTF reader (aya's own probe parses the whole kernel BTF for it).
        let fentry =
            match is_program_supported_with_attach_id(ProgramType::Tracing, trampoline_target) {
                Ok(true) => {
                    Probe::yes("a BPF trampoline program loads (attaching is tried at start)")
                }
                Ok(false) => Probe::no("kernel does not support BPF_PROG_TYPE_TRACING"),
                Err(err) => Probe::no(format!(
                    "trampoline probe failed: {:#}",
                    anyhow::Error::from(err)
                )),
            };
        let ringbuf = map_probe(MapType::RingBuf, "ring buffer (kernel 5.8+)");
        let perf_event_array = map_probe(MapType::PerfEventArray, "perf event array");
        let preemption = preemption::probe();
        Self {
            release,
            tracefs_path: tracefs.map(Path::to_path_buf),
            btf,
            tracefs: tracefs_probe,
            tracepoints,
            kprobes,
            fentry,
            uprobes,
            ringbuf,
            perf_event_array,
            preemption,
        }
    }

    /// (name, probe) pairs in display order.
    pub fn rows(&self) -> [(&'static str, &Probe); 9] {
        [
            ("btf", &self.btf),
            ("tracefs", &self.tracefs),
            ("tracepoints", &self.tracepoints),
            ("kprobes", &self.kprobes),
            ("fentry/fexit", &self.fentry),
            ("uprobes", &self.uprobes),
            ("ring buffer", &self.ringbuf),
            ("perf event array", &self.perf_event_array),
            ("preemption", &self.preemption),
        ]
    }
}

/// Byte offsets of `fields` in the records of the classic tracepoint `<group>/<event>`, from its
/// `format` file in tracefs (lines like `field:const void * skaddr;\toffset:8;\tsize:8;...`).
pub fn tracepoint_field_offsets(
    tracefs: &Path,
    group: &str,
    event: &str,
    fields: &[&str],
) -> anyhow::Result<Vec<u32>> {
    let path = tracefs
        .join("events")
        .join(group)
        .join(event)
        .join("format");
    let text = std::fs::read_to_string(&path)
        .map_err(|err| anyhow::anyhow!("reading {}: {err}", path.display()))?;
    fields
        .iter()
        .map(|field| {
            format_field_offset(&text, field)
                .ok_or_else(|| anyhow::anyhow!("{} has no field `{field}`", path.display()))
        })
        .collect()
}

fn format_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';');
        let declaration = parts.next()?.strip_prefix("field:")?;
        // The name is the declaration's last word, minus any array suffix.
        let name = declaration.split_whitespace().last()?.split('[').next()?;
        if name != field {
            return None;
        }
        parts.find_map(|part| part.trim().strip_prefix("offset:")?.parse().ok())
    })
}

/// Probes are created through the PMU (`/sys/bus/event_source/devices/<pmu>/type`, kernel 4.17+)
/// or, on older kernels, through `<tracefs>/<pmu>_events`.
fn pmu_or_tracefs(pmu: &str, tracefs: Option<&Path>, why_not: &str) -> Probe {
    let pmu_type = PathBuf::from(format!("/sys/bus/event_source/devices/{pmu}/type"));
    if pmu_type.exists() {
        return Probe::yes(format!("{pmu} PMU present"));
    }
    if let Some(events) = tracefs.map(|t| t.join(format!("{pmu}_events")))
        && events.exists()
    {
        return Probe::yes(format!("{} present", events.display()));
    }
    Probe::no(format!(
        "no {pmu} PMU and no {pmu}_events in tracefs: {why_not}"
    ))
}

fn map_probe(map: MapType, what: &str) -> Probe {
    match is_map_supported(map) {
        Ok(true) => Probe::yes(format!("{what} supported")),
        Ok(false) => Probe::no(format!("{what} not supported by this kernel")),
        Err(err) => Probe::no(format!(
            "{what} probe failed: {:#}",
            anyhow::Error::from(err)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sock:inet_sock_set_state` as kernel 6.1 prints it.
    const FORMAT: &str = "name: inet_sock_set_state
ID: 1332
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
";

    #[test]
    fn tracepoint_format_fields() {
        assert_eq!(format_field_offset(FORMAT, "skaddr"), Some(8));
        assert_eq!(format_field_offset(FORMAT, "oldstate"), Some(16));
        assert_eq!(format_field_offset(FORMAT, "newstate"), Some(20));
        assert_eq!(format_field_offset(FORMAT, "saddr"), Some(32));
        assert_eq!(format_field_offset(FORMAT, "state"), None);
    }
}
