//! Builds the eBPF objects (crate `ebpf-probes`, one object per plugin) and leaves them in
//! OUT_DIR for `include_bytes_aligned!`.
//!
//! The eBPF toolchain (nightly with rust-src, bpf-linker) is only needed for a real build. When it
//! is missing, empty placeholder objects are written instead so `cargo check`, clippy and
//! rust-analyzer work anywhere; such a binary refuses to load programs and says why.
//! `cargo xtask bootstrap` installs the toolchain.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

/// One object per plugin: the `[[bin]]` targets of `ebpf-probes`.
const OBJECTS: &[&str] = &["bash", "dnsflow", "httpflow", "netflow", "netflow_perf"];

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=XDG_CACHE_HOME");

    let linker_dir = bpf_linker_dir();
    if let Some(dir) = &linker_dir {
        // aya-build runs `cargo +nightly build`, whose rustc looks bpf-linker up on PATH.
        prepend_path(dir);
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("bpf-linker").display()
        );
    }

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let missing = missing_toolchain(linker_dir.is_some());
    if skip || missing.is_some() {
        if let Some(why) = missing.filter(|_| !skip) {
            println!(
                "cargo:warning=eBPF toolchain missing ({why}): building without eBPF programs; run `cargo xtask bootstrap`"
            );
        }
        for name in OBJECTS {
            fs::write(out_dir.join(name), [])?;
        }
        return Ok(());
    }

    // aya-build turns every line the nested cargo prints into a `cargo:warning`; keep it to errors.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    let probes_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf-probes");
    let probes_dir = probes_dir.to_str().expect("UTF-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ebpf-probes",
            root_dir: probes_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// Where `cargo xtask bootstrap` caches bpf-linker (kept in step with xtask), or a bpf-linker
/// already on PATH.
fn bpf_linker_dir() -> Option<PathBuf> {
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    let dir = cache.join("datakit-ebpf/bpf-linker/bin");
    if dir.join("bpf-linker").is_file() {
        return Some(dir);
    }
    env::split_paths(&env::var_os("PATH")?).find(|dir| dir.join("bpf-linker").is_file())
}

fn prepend_path(dir: &Path) {
    let old = env::var_os("PATH").unwrap_or_default();
    let new = env::join_paths(std::iter::once(dir.to_path_buf()).chain(env::split_paths(&old)))
        .expect("PATH entries without separators");
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", new) };
}

/// Why a real eBPF build cannot run here, if it cannot.
fn missing_toolchain(have_linker: bool) -> Option<&'static str> {
    if !have_linker {
        return Some("bpf-linker not found");
    }
    let Some(sysroot) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success())
    else {
        return Some("nightly toolchain not found");
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Some("nightly rust-src component not installed");
    }
    None
}
