//! ebpf-net's `httpflow` (`l7net_enabled = ["httpflow"]`): HTTP/1.x requests and responses
//! parsed and paired per connection in the kernel, reported per interval; with `httpflow-tls`, the
//! plain text of OpenSSL connections too (uprobes on the libssl each process maps).

pub mod aggregate;
pub mod collector;
pub mod parse;
pub mod stream;
pub mod tier;
pub mod tls;

use super::{Availability, Kernel};
use crate::config::HttpflowTier;

/// Whether httpflow (and, with `tls`, httpflow-tls) can run here, and at which tier.
pub fn availability(kernel: &Kernel, forced: HttpflowTier, tls: bool) -> Availability {
    let mut missing = Vec::new();
    let mut choice = None;
    match kernel.btf() {
        Ok(btf) => {
            if let Err(err) = btf.http_offsets() {
                missing.push(format!("struct offsets: {err:#}"));
            }
            match tier::choose_tier(&kernel.features, btf, forced) {
                Ok(c) => choice = Some(c),
                Err(why) => missing.push(why),
            }
        }
        Err(why) => missing.push(format!("needs kernel BTF: {why}")),
    }
    // sock:inet_sock_set_state at every tier, the syscall ones at the syscalls tier.
    if !kernel.features.tracepoints.available {
        missing.push("needs tracepoints (syscalls, sock:inet_sock_set_state)".into());
    }
    if !kernel.features.ringbuf.available {
        missing.push("needs the BPF ring buffer (5.8+)".into());
    }
    if tls && !kernel.features.uprobes.available {
        missing.push("httpflow-tls needs uprobes".into());
    }
    if collector::object_is_empty() {
        missing.push("this binary was built without eBPF programs".into());
    }
    if let (true, Some(choice)) = (missing.is_empty(), choice) {
        let hooks = match choice.tier {
            HttpflowTier::Fentry => "fentry/fexit inet_sendmsg/inet_recvmsg (and inet6_*)",
            _ => "syscall tracepoints (read/write/send/recv families)",
        };
        Availability {
            can_run: true,
            mechanism: format!(
                "the {} tier ({}): {hooks}{}, sock:inet_sock_set_state; HTTP/1 parsed in the \
                 kernel, one record per exchange (pipelined connections fall back to userspace \
                 framing, counted)",
                choice.tier.name(),
                choice.reason,
                if tls {
                    ", OpenSSL uprobes (SSL_read/SSL_write/_ex)"
                } else {
                    ""
                },
            ),
            reason: String::new(),
        }
    } else {
        Availability {
            can_run: false,
            mechanism: "-".into(),
            reason: missing.join("; "),
        }
    }
}
