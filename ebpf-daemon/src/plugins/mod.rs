//! The plugins (`--enabled`): what each needs from the kernel, and what they share.

pub mod bash;
pub mod dnsflow;
pub mod endpoints;
pub mod httpflow;
mod losses;
mod misses;
pub mod net;
pub mod netflow;

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    btf::KernelBtf, config::Config, kernel::KernelFeatures, lineproto::Point, sender::Sender,
};

/// Tags every point carries (contract §1.2): `host`, `service`, then the configured extra tags.
/// A key the collector already set is not overwritten.
#[derive(Debug, Clone)]
pub struct GlobalTags {
    tags: Vec<(String, String)>,
}

impl GlobalTags {
    pub fn new(config: &Config) -> Self {
        let mut tags = vec![
            ("host".to_string(), config.hostname.clone()),
            ("service".to_string(), config.service.clone()),
        ];
        for (k, v) in &config.tags {
            if !tags.iter().any(|(existing, _)| existing == k) {
                tags.push((k.clone(), v.clone()));
            }
        }
        Self { tags }
    }

    /// From explicit pairs, for tests.
    #[cfg(test)]
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Self {
            tags: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    pub fn apply(&self, point: &mut Point) {
        for (k, v) in &self.tags {
            if !point.tags.iter().any(|(existing, _)| existing == k) {
                point.tags.push((k.clone(), v.clone()));
            }
        }
    }
}

/// What a running plugin gets.
#[derive(Clone)]
pub struct PluginContext {
    pub config: Arc<Config>,
    pub tags: Arc<GlobalTags>,
    pub sender: Sender,
    pub interval: Duration,
    pub shutdown: watch::Receiver<bool>,
}

/// Whether a plugin can run on this kernel, through which mechanism, or why not.
#[derive(Debug, Clone)]
pub struct Availability {
    pub can_run: bool,
    /// How it runs (when it can).
    pub mechanism: String,
    /// Why it cannot run, or which of its parts cannot (empty when everything runs).
    pub reason: String,
}

/// What start-up learnt about the running kernel.
pub struct Kernel {
    pub features: KernelFeatures,
    /// The kernel's BTF (or `--btf`), or why it could not be read.
    pub btf: Result<KernelBtf, String>,
}

impl Kernel {
    pub fn btf(&self) -> Result<&KernelBtf, &str> {
        self.btf.as_ref().map_err(String::as_str)
    }
}

/// Availability of `plugin` on this kernel (for `check` and for start-up).
pub fn availability(
    plugin: crate::config::Plugin,
    kernel: &Kernel,
    config: &Config,
) -> Availability {
    use crate::config::Plugin;
    match plugin {
        Plugin::Bash => bash::availability(&kernel.features, config),
        Plugin::Net => net::availability(kernel, config),
        other => Availability {
            can_run: false,
            mechanism: "-".into(),
            reason: format!("{} is not supported by this daemon", other.name()),
        },
    }
}
