//! IP address → domain name, learnt from the A/AAAA answers dnsflow sees, read by netflow for
//! `dst_domain` (contract §1.3, §2.4). The reference's map never evicted; this one is bounded
//! (the entry closest to expiry goes first, counted) and respects record TTLs, plus a grace
//! period so that a connection opened just before the TTL ran out is still named in the
//! netflow row reported one interval later.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

#[derive(Debug)]
struct Entry {
    name: String,
    expires_ns: u64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<IpAddr, Entry>,
    /// (expiry, address) of every entry: the next to expire first.
    by_expiry: BTreeSet<(u64, IpAddr)>,
}

/// Shared between dnsflow (writer) and netflow (reader) behind an `Arc`.
#[derive(Debug)]
pub struct DomainCache {
    inner: Mutex<Inner>,
    max_entries: usize,
    grace_ns: u64,
    evicted: AtomicU64,
}

impl DomainCache {
    pub fn new(max_entries: usize, grace_ns: u64) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_entries: max_entries.max(1),
            grace_ns,
            evicted: AtomicU64::new(0),
        }
    }

    /// Records that `ip` is `name` for `ttl_s` seconds from `now_ns` (monotonic).
    pub fn insert(&self, ip: IpAddr, name: &str, ttl_s: u32, now_ns: u64) {
        if name.is_empty() {
            return;
        }
        let ip = ip.to_canonical();
        let expires_ns = now_ns
            .saturating_add(u64::from(ttl_s).saturating_mul(1_000_000_000))
            .saturating_add(self.grace_ns);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = inner.entries.remove(&ip) {
            inner.by_expiry.remove(&(old.expires_ns, ip));
        }
        inner.purge(now_ns);
        while inner.entries.len() >= self.max_entries {
            let Some((_, victim)) = inner.by_expiry.pop_first() else {
                break;
            };
            inner.entries.remove(&victim);
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        inner.by_expiry.insert((expires_ns, ip));
        inner.entries.insert(
            ip,
            Entry {
                name: name.to_string(),
                expires_ns,
            },
        );
    }

    /// The name of `ip` if an unexpired answer gave one.
    pub fn get(&self, ip: IpAddr, now_ns: u64) -> Option<String> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .entries
            .get(&ip.to_canonical())
            .filter(|e| e.expires_ns > now_ns)
            .map(|e| e.name.clone())
    }

    /// Drops expired entries (also done on every insert).
    pub fn purge(&self, now_ns: u64) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .purge(now_ns);
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    /// Entries evicted because the cache was full, since start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn purge(&mut self, now_ns: u64) {
        while let Some(&(at, ip)) = self.by_expiry.first() {
            if at > now_ns {
                break;
            }
            self.by_expiry.pop_first();
            self.entries.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ttl_and_grace_are_respected() {
        let cache = DomainCache::new(16, 2 * S);
        cache.insert(ip("10.0.0.1"), "a.test", 10, 100 * S);
        assert_eq!(
            cache.get(ip("10.0.0.1"), 111 * S).as_deref(),
            Some("a.test")
        );
        assert_eq!(cache.get(ip("10.0.0.1"), 112 * S), None);
        cache.purge(112 * S);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn newer_answer_replaces_older() {
        let cache = DomainCache::new(16, 0);
        cache.insert(ip("fd00::1"), "a.test", 1, 0);
        cache.insert(ip("fd00::1"), "b.test", 100, 0);
        assert_eq!(cache.get(ip("fd00::1"), 50 * S).as_deref(), Some("b.test"));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn mapped_address_finds_the_v4_entry() {
        let cache = DomainCache::new(16, 0);
        cache.insert(ip("10.0.0.1"), "a.test", 100, 0);
        assert_eq!(
            cache.get(ip("::ffff:10.0.0.1"), 1).as_deref(),
            Some("a.test")
        );
    }

    #[test]
    fn bounded_evicting_soonest_expiry() {
        let cache = DomainCache::new(3, 0);
        for i in 0..5u32 {
            cache.insert(ip(&format!("10.0.0.{i}")), "x.test", 100 + i, 0);
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.evicted(), 2);
        assert_eq!(cache.get(ip("10.0.0.0"), 0), None);
        assert!(cache.get(ip("10.0.0.4"), 0).is_some());
    }
}
