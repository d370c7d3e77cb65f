//! Types shared by the eBPF programs (`ebpf-probes`) and the daemon (`datakit-ebpf`).
//!
//! Every type that crosses the kernel/user boundary is `#[repr(C)]` with explicit padding, and its
//! size is checked at compile time so the two sides cannot drift apart silently.
#![no_std]

pub mod bash;
pub mod dnsflow;
pub mod httpflow;
pub mod netflow;

/// Asserts at compile time that a shared type has the size both sides were written for.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
    };
}
