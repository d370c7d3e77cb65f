//! ebpf-net's `netflow`: per-connection TCP and UDP bytes, retransmits, RTT, connections opened
//! and closed, by process and direction.

pub mod aggregate;
mod cgroup;
pub mod closed;
pub mod collector;
mod route;

use std::sync::Arc;

use tracing::{info, warn};

use super::{Kernel, dnsflow::domains::DomainCache};
use crate::config::Config;

/// The tier netflow would use on this kernel and why, or why it cannot run.
pub fn availability(kernel: &Kernel, config: &Config) -> Result<String, String> {
    if collector::object_is_empty() {
        return Err(
            "this binary was built without eBPF programs (run `cargo xtask bootstrap` and rebuild)"
                .into(),
        );
    }
    let choice = collector::choose_tier(&kernel.features, kernel.btf(), config.netflow_tier)
        .map_err(|why| format!("no usable tier ({why})"))?;
    let (closed, why) = closed::choose(&kernel.features.ringbuf, config.netflow_closed_events)?;
    Ok(format!(
        "at the {} tier ({}); closed connections through the {} ({why}); unconnected UDP {}",
        choice.tier.name(),
        choice.reason,
        closed.name(),
        collector::udp_peers_plan(config),
    ))
}

/// Chooses the tier, loads and attaches netflow.
pub fn start(
    config: &Config,
    kernel: &Kernel,
    domains: Arc<DomainCache>,
) -> anyhow::Result<collector::NetflowCollector> {
    let btf = kernel
        .btf()
        .map_err(|why| anyhow::anyhow!("kernel BTF: {why}"))?;
    let candidates = collector::tier_candidates(&kernel.features, Ok(btf), config.netflow_tier)
        .map_err(|why| anyhow::anyhow!("no usable tier: {why}"))?;
    let (closed_events, why) =
        closed::choose(&kernel.features.ringbuf, config.netflow_closed_events)
            .map_err(anyhow::Error::msg)?;
    info!(
        "netflow: closed connections through the {} ({why})",
        closed_events.name()
    );
    let mut failures = Vec::new();
    for choice in candidates {
        info!(
            "netflow: {} tier chosen: {}",
            choice.tier.name(),
            choice.reason
        );
        match collector::NetflowCollector::load(
            config,
            btf,
            kernel.features.tracefs_path.as_deref(),
            &choice,
            closed_events,
        ) {
            Ok(collector) => return Ok(collector.with_domains(domains)),
            Err(err) => {
                warn!(
                    "netflow: the {} tier failed ({err:#}); trying the next one",
                    choice.tier.name()
                );
                failures.push(format!("{}: {err:#}", choice.tier.name()));
            }
        }
    }
    anyhow::bail!("every usable tier failed: {}", failures.join("; "))
}
