//! `datakit-ebpf check`: can each plugin run on this kernel, through which mechanism, and why not.

use std::fmt::Write as _;

use crate::{
    config::{Config, L7Protocol, Plugin},
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
        // A plugin that runs only in part (ebpf-net without netflow, say) is not all right.
        if enabled && (!availability.can_run || !availability.reason.is_empty()) {
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
    // ebpf-net's application protocols (`l7net_enabled`).
    for l7 in L7Protocol::ALL {
        let enabled = config.enabled.contains(&Plugin::Net) && config.l7net.contains(&l7);
        let availability = plugins::httpflow::availability(
            kernel,
            config.httpflow_tier,
            l7 == L7Protocol::HttpFlowTls,
        );
        if enabled && !availability.can_run {
            all_ok = false;
        }
        let _ = writeln!(
            out,
            "  {:<15} {:<9} {:<11} {}",
            l7.name(),
            if enabled { "enabled" } else { "disabled" },
            if availability.can_run {
                "can run"
            } else {
                "cannot run"
            },
            if availability.can_run {
                format!("via {}", availability.mechanism)
            } else {
                availability.reason
            },
        );
    }
    let _ = writeln!(
        out,
        "\n{}",
        if all_ok {
            "every enabled plugin can run"
        } else {
            "some enabled plugins cannot run, or run only in part"
        }
    );
    (out, all_ok)
}
