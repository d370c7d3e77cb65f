//! `datakit-ebpf check`: can each plugin run on this kernel, through which mechanism, and why not.

use std::fmt::Write as _;

use crate::{
    config::{Config, Plugin},
    plugins::{self, Kernel},
};

/// The report, and whether every enabled plugin can run.
pub fn report(config: &Config, kernel: &Kernel) -> (String, bool) {
    let features = &kernel.features;
    let mut out = String::new();
    let _ = writeln!(out, "kernel {}", features.release);
    let _ = writeln!(out, "\nkernel features:");
    for (name, probe) in features.rows() {
        let state = if probe.available { "yes" } else { "no" };
        let _ = writeln!(out, "  {name:<17} {state:<4} {}", probe.detail);
    }
    match &kernel.btf {
        Ok(_) => {}
        Err(why) => {
            let _ = writeln!(out, "  {:<17} {:<4} {why}", "btf (parsed)", "no");
        }
    }
    let _ = writeln!(out, "\nplugins:");
    let mut all_ok = true;
    for plugin in Plugin::ALL {
        let enabled = config.enabled.contains(&plugin);
        let availability = plugins::availability(plugin, kernel, config);
        if enabled && !availability.can_run {
            all_ok = false;
        }
        let _ = writeln!(
            out,
            "  {:<15} {:<9} {:<11} {}{}",
            plugin.name(),
            if enabled { "enabled" } else { "disabled" },
            if availability.can_run {
                "can run"
            } else {
                "cannot run"
            },
            if availability.can_run {
                format!("via {}", availability.mechanism)
            } else {
                String::new()
            },
            match (availability.can_run, availability.reason.is_empty()) {
                (true, true) => String::new(),
                // Some parts run, some cannot (ebpf-net on a kernel netflow cannot use, say).
                (true, false) => format!("; not running: {}", availability.reason),
                (false, _) => availability.reason,
            },
        );
    }
    let _ = writeln!(
        out,
        "\n{}",
        if all_ok {
            "every enabled plugin can run"
        } else {
            "some enabled plugins cannot run"
        }
    );
    (out, all_ok)
}
