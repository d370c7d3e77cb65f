//! The `ebpf-net` plugin: netflow, dnsflow and httpflow (when `l7net_enabled` lists it). Each
//! part starts on its own, so one that cannot run on this kernel (netflow before 6.3 without
//! kprobes or trampolines, say) does not keep the others from running; the plugin fails only
//! when no part can start.

use std::sync::Arc;

use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::{Availability, Kernel, PluginContext, dnsflow, httpflow, netflow};
use crate::config::{Config, L7Protocol};

/// What each part of ebpf-net would run on this kernel, or why it cannot.
pub fn availability(kernel: &Kernel, config: &Config) -> Availability {
    let mut parts = vec![("netflow", netflow::availability(kernel, config))];
    if !config.dnsflow_disabled {
        parts.push(("dnsflow", dnsflow::availability()));
    }
    if config.l7net.contains(&L7Protocol::HttpFlow) {
        let http = httpflow::availability(
            kernel,
            config.httpflow_tier,
            config.l7net.contains(&L7Protocol::HttpFlowTls),
        );
        parts.push((
            "httpflow",
            if http.can_run {
                Ok(http.mechanism)
            } else {
                Err(http.reason)
            },
        ));
    }
    let mut running = Vec::new();
    let mut not_running = Vec::new();
    for (name, part) in parts {
        match part {
            Ok(mechanism) => running.push(format!("{name} {mechanism}")),
            Err(why) => not_running.push(format!("{name}: {why}")),
        }
    }
    let can_run = !running.is_empty();
    if config.dnsflow_disabled {
        running.push("dnsflow off (--dnsflow-disabled)".into());
    }
    Availability {
        can_run,
        mechanism: if can_run {
            running.join("; ")
        } else {
            "-".into()
        },
        reason: not_running.join("; "),
    }
}

/// Starts every part that can run; an error only when none could.
pub fn start(
    config: &Config,
    kernel: &Kernel,
    ctx: PluginContext,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    // Shared: dnsflow learns names from DNS answers, netflow tags rows with them.
    let domains = Arc::new(dnsflow::domains::DomainCache::new(
        dnsflow::MAX_DOMAINS,
        2 * config.interval.as_nanos() as u64,
    ));
    let mut failures = Vec::new();
    match netflow::start(config, kernel, domains.clone()) {
        Ok(collector) => {
            tasks.spawn(collector.run(ctx.clone()));
        }
        Err(err) => failures.push(format!("netflow: {err:#}")),
    }
    let mut parts = 1;
    if config.dnsflow_disabled {
        info!("dnsflow: off (--dnsflow-disabled)");
    } else {
        parts += 1;
        match dnsflow::DnsflowCollector::load(config, domains) {
            Ok(collector) => {
                info!("dnsflow: capturing DNS through a socket filter");
                tasks.spawn(collector.run(ctx.clone()));
            }
            Err(err) => failures.push(format!("dnsflow: {err:#}")),
        }
    }
    if config.l7net.contains(&L7Protocol::HttpFlow) {
        parts += 1;
        let tls = config.l7net.contains(&L7Protocol::HttpFlowTls);
        let loaded = kernel
            .btf()
            .map_err(|why| anyhow::anyhow!("kernel BTF: {why}"))
            .and_then(|btf| {
                let choice =
                    httpflow::tier::choose_tier(&kernel.features, btf, config.httpflow_tier)
                        .map_err(|why| anyhow::anyhow!("{why}"))?;
                let load = |choice: &httpflow::tier::TierChoice| {
                    httpflow::collector::HttpflowCollector::load(config, btf, choice, tls)
                };
                load(&choice).or_else(|err| {
                    match httpflow::tier::fallback(&choice, config.httpflow_tier, &err) {
                        Some(next) => {
                            warn!("httpflow: {}; trying the syscalls tier", next.reason);
                            load(&next)
                        }
                        None => Err(err),
                    }
                })
            });
        match loaded {
            Ok(collector) => {
                tasks.spawn(collector.run(ctx));
            }
            Err(err) => failures.push(format!("httpflow: {err:#}")),
        }
    }
    if failures.len() == parts {
        anyhow::bail!("{}", failures.join("; "));
    }
    for failure in failures {
        error!("ebpf-net: {failure}; its other parts run");
    }
    Ok(())
}
