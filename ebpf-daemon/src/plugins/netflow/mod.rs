//! ebpf-net's `netflow`: per-connection TCP and UDP bytes, retransmits, RTT, connections opened
//! and closed, by process and direction. (dnsflow is not implemented yet; httpflow is the
//! `httpflow` plugin module, started with ebpf-net.)

pub mod aggregate;
pub mod collector;

use super::{Availability, Kernel};
use crate::config::Config;

pub fn availability(kernel: &Kernel, config: &Config) -> Availability {
    let mut missing = Vec::new();
    let choice = collector::choose_tier(&kernel.features, kernel.btf(), config.netflow_tier);
    if let Err(why) = &choice {
        missing.push(format!("netflow: no usable tier ({why})"));
    }
    if collector::object_is_empty() {
        missing.push(
            "this binary was built without eBPF programs (run `cargo xtask bootstrap` and rebuild)"
                .into(),
        );
    }
    match choice {
        Ok(choice) if missing.is_empty() => Availability {
            can_run: true,
            mechanism: format!(
                "netflow at the {} tier ({})",
                choice.tier.name(),
                choice.reason
            ),
            reason: "dnsflow is not implemented yet".into(),
        },
        _ => Availability {
            can_run: false,
            mechanism: "-".into(),
            reason: missing.join("; "),
        },
    }
}
