//! Kernel timestamps to wall-clock time.

use nix::time::{ClockId, clock_gettime};

fn ns(clock: ClockId) -> i64 {
    clock_gettime(clock)
        .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
        .unwrap_or(0)
}

/// Nanoseconds since the Unix epoch now.
pub fn now_unix_ns() -> i64 {
    ns(ClockId::CLOCK_REALTIME)
}

/// `bpf_ktime_get_ns()`'s clock (CLOCK_MONOTONIC) now.
pub fn monotonic_ns() -> u64 {
    ns(ClockId::CLOCK_MONOTONIC) as u64
}

/// Converts a `bpf_ktime_get_boot_ns()` value into nanoseconds since the Unix epoch. The offset
/// is taken now, so a wall-clock step (NTP) moves later events with it, as it should.
pub fn boot_to_unix_ns(boot_ns: u64) -> i64 {
    let offset = ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_BOOTTIME);
    offset + boot_ns as i64
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_time_maps_close_to_now() {
        let boot = super::ns(nix::time::ClockId::CLOCK_BOOTTIME) as u64;
        let diff = (super::boot_to_unix_ns(boot) - super::now_unix_ns()).abs();
        assert!(diff < 1_000_000_000, "{diff}");
    }
}
