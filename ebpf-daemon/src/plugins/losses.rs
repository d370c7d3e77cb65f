//! Kernel-side loss counters: each plugin's programs count what they could not do (a full map
//! or ring buffer, an unreadable address) in a per-CPU array; the daemon logs their growth.

use aya::maps::{MapData, PerCpuArray};
use tracing::warn;

pub struct KernelLosses {
    plugin: &'static str,
    counters: PerCpuArray<MapData, u64>,
    /// (counter index, what a count means), in log order.
    meanings: &'static [(u32, &'static str)],
    reported: Vec<u64>,
}

impl KernelLosses {
    pub fn new(
        plugin: &'static str,
        counters: PerCpuArray<MapData, u64>,
        meanings: &'static [(u32, &'static str)],
    ) -> Self {
        Self {
            plugin,
            counters,
            meanings,
            reported: vec![0; meanings.len()],
        }
    }

    /// The current total of any counter of the array (not only the losses).
    pub fn total(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Logs each counter that grew since the last call, with its total.
    pub fn report(&mut self) {
        for (i, &(index, meaning)) in self.meanings.iter().enumerate() {
            let total = self.total(index);
            let slot = &mut self.reported[i];
            if total > *slot {
                warn!(
                    "{}: {} {meaning} (total {total})",
                    self.plugin,
                    total - *slot
                );
                *slot = total;
            }
        }
    }
}
