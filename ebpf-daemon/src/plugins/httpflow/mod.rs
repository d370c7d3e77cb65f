//! ebpf-net's `httpflow` (`l7net_enabled = ["httpflow"]`): HTTP/1.x requests and responses
//! from socket data, paired per connection and reported per interval; with `httpflow-tls`, the
//! plain text of OpenSSL connections too (uprobes on the libssl each process maps).

pub mod aggregate;
pub mod collector;
mod misses;
pub mod parse;
pub mod stream;
pub mod tls;

use super::{Availability, Kernel};

/// Whether httpflow (and, with `tls`, httpflow-tls) can run here.
pub fn availability(kernel: &Kernel, tls: bool) -> Availability {
    let mut missing = Vec::new();
    match kernel.btf() {
        Ok(btf) => {
            if let Err(err) = btf.http_offsets() {
                missing.push(format!("struct offsets: {err:#}"));
            }
        }
        Err(why) => missing.push(format!("needs kernel BTF: {why}")),
    }
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
    if missing.is_empty() {
        Availability {
            can_run: true,
            mechanism: if tls {
                "OpenSSL uprobes (SSL_read/SSL_write/_ex) plus syscall tracepoints".into()
            } else {
                "syscall tracepoints (read/write/send/recv families) and sock:inet_sock_set_state"
                    .into()
            },
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
