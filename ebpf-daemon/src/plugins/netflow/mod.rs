//! ebpf-net's `netflow`: per-connection TCP and UDP bytes, retransmits, RTT, connections opened
//! and closed, by process and direction. ebpf-net's `dnsflow` is in plugins/dnsflow; httpflow is
//! not implemented yet.

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
    if collector::object_is_empty() || super::dnsflow::object_is_empty() {
        missing.push(
            "this binary was built without eBPF programs (run `cargo xtask bootstrap` and rebuild)"
                .into(),
        );
    }
    match choice {
        Ok(choice) if missing.is_empty() => Availability {
            can_run: true,
            mechanism: format!(
                "netflow at the {} tier ({}); dnsflow by a socket filter on a packet socket",
                choice.tier.name(),
                choice.reason
            ),
            reason: "httpflow is not implemented yet".into(),
        },
        _ => Availability {
            can_run: false,
            mechanism: "-".into(),
            reason: missing.join("; "),
        },
    }
}
