//! Project tasks, run as `cargo xtask <command>` (the alias lives in `.cargo/config.toml`).
//!
//! Everything a fresh Debian 12 machine needs beyond rustup (stable + `nightly`) is installed by
//! `bootstrap`, which every other command runs first. Each step checks before it acts, so a second run
//! costs a few process spawns. Cached under `${XDG_CACHE_HOME:-$HOME/.cache}/datakit-ebpf/`:
//!
//! - `bpf-linker/bin/bpf-linker`: bpf-linker, built against the nightly toolchain's own libLLVM;
//! - `llvm-<major>/lib/`: symlinks to that libLLVM, the `LLVM_PREFIX` bpf-linker was built with.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};

mod matrix;
mod vm;

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests need; `bootstrap` installs the missing ones.
const APT_PACKAGES: &[&str] = &[
    "bpftool", // loaded programs after SIGTERM (bash lifecycle test), bpf_stats (bench), BTF header (btf test)
    "iproute2", // `ip netns`/veth: the network tests' hosts in namespaces
    "iptables", // packet loss with the netfilter `statistic` match (retransmit test)
    "ethtool", // segmentation offloads off on the lossy veth pair (retransmit test)
    "procps",  // `sysctl kernel.bpf_stats_enabled` (bench)
    "bash",    // the bash collector's tests drive /bin/bash
    "util-linux", // `mount -t tracefs` in the lifecycle test
    "python3", // the bench's 10,000-connection server
    "gcc",     // offsetof check of the BTF-derived offsets (btf unit test)
    // The dnsflow tests' DNS server; the -base package is the binary without a system service
    // that would take port 53.
    "dnsmasq-base",
    "bind9-dnsutils", // `dig`, the dnsflow tests' client
    "nginx",          // the HTTP and HTTPS server of the httpflow tests and the bench
    "curl", // the HTTP(S) client of the httpflow tests (several URLs = one keep-alive connection)
    "openssl", // the self-signed certificate of the httpflow-tls test and the bench's HTTPS load
    // The bench's HTTP and HTTPS load: one event-loop thread saturates nginx over keep-alive
    // connections, and Debian's build links the system OpenSSL, so the HTTPS load needs no TLS
    // crate in the bench and runs through the same libssl that the daemon's uprobes attach to.
    "wrk",
];

#[derive(Parser)]
#[command(name = "cargo xtask", about = "datakit-ebpf project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need: nightly rust-src, bpf-linker, Debian test packages.
    /// Idempotent: every step checks first.
    Bootstrap {
        /// Only the Rust toolchain part (rust-src, bpf-linker); skip the Debian packages.
        #[arg(long)]
        no_apt: bool,
    },
    /// Build the daemon (`datakit-ebpf`, eBPF programs included).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// The project's test command (README and CI): bootstrap, fmt check, clippy, cargo test, and
    /// the kernel matrix's smoke (Debian 5.10, 6.1, 6.12, 7.2 under QEMU, two at a time).
    Test {
        /// Skip the fmt and clippy steps.
        #[arg(long)]
        quick: bool,
        /// Skip the kernel matrix's smoke.
        #[arg(long)]
        no_vm: bool,
        /// Test only these packages (default: the workspace's default members).
        #[arg(short = 'p', long = "package", value_name = "SPEC")]
        packages: Vec<String>,
        /// Arguments for the test binaries, e.g. `-- --test-threads=1` or `-- NAME_FILTER`.
        #[arg(last = true, value_name = "TEST_ARGS")]
        test_args: Vec<OsString>,
    },
    /// fmt check and clippy, without running the tests.
    Lint,
    /// The kernel matrix: boots Debian kernels (5.10, 6.1, 6.12, 7.2) under QEMU, two at a time,
    /// and runs the full end-to-end suite in each (netflow at every tier the kernel has, tier
    /// parity, bash, dnsflow, httpflow, no-BTF), or the smoke, or a host command. Reports per
    /// kernel and test. Kernels are fetched once and cached.
    VmTest {
        /// Kernels to boot (repeatable; default: all).
        #[arg(long = "kernel", value_name = "LABEL")]
        kernels: Vec<String>,
        /// Run the smoke of `cargo xtask test` instead of the full suite.
        #[arg(long)]
        smoke: bool,
        /// Shell command to run in the guest (host paths; the host root is mounted read-only).
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Benchmarks (release build, root, about 10 minutes): throughput with the daemon off and on
    /// (netflow alone, the default configuration, everything on) under HTTP and HTTPS loads (nginx
    /// and wrk) and a 64-byte ping-pong, the daemon's CPU and RSS, kernel time per program run.
    /// Prints the figures beside the targets.
    Bench,
    /// Build the daemon in release and run it (default: `--config conf/ebpf.conf.sample --output -`,
    /// line protocol to stdout). Runs from the workspace root; must be root to load eBPF programs.
    Run {
        /// Arguments for `datakit-ebpf`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Bootstrap { no_apt } => bootstrap(!no_apt),
        Cmd::Build { release } => bootstrap(false).and_then(|()| build_daemon(release)),
        Cmd::Test {
            quick,
            no_vm,
            packages,
            test_args,
        } => test(quick, no_vm, &packages, &test_args),
        Cmd::Lint => lint(),
        Cmd::Bench => bootstrap(true).and_then(|()| bench()),
        Cmd::VmTest {
            kernels,
            smoke,
            command,
        } => bootstrap(true).and_then(|()| {
            let kernels = vm::select(&kernels)?;
            let (plan, report) = if !command.is_empty() {
                build_daemon(false)?;
                (matrix::Plan::Command(command.join(" ")), "command")
            } else if smoke {
                (matrix::Plan::Smoke(test_suite()?), "smoke")
            } else {
                (matrix::Plan::Full(test_suite()?), "full")
            };
            matrix::run(&kernels, &plan, &target_dir().join("vm-test").join(report))
        }),
        Cmd::Run { args } => run_daemon(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Paths and environment

/// The workspace root (xtask's parent directory).
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/datakit-ebpf`.
fn cache_dir() -> Result<PathBuf> {
    let base = match env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(xdg) => PathBuf::from(xdg),
        None => {
            let home = env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .ok_or_else(|| anyhow!("neither XDG_CACHE_HOME nor HOME is set"))?;
            PathBuf::from(home).join(".cache")
        }
    };
    Ok(base.join("datakit-ebpf"))
}

/// Directory holding the cached `bpf-linker`:
/// `${XDG_CACHE_HOME:-$HOME/.cache}/datakit-ebpf/bpf-linker/bin`.
/// The daemon's build.rs looks in the same place, so keep the two in step.
fn bpf_linker_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("bpf-linker").join("bin"))
}

/// `PATH` with the bpf-linker directory in front.
fn path_with_bpf_linker() -> Result<OsString> {
    let current = env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(bpf_linker_dir()?).chain(env::split_paths(&current));
    env::join_paths(dirs).context("building PATH")
}

/// The daemon's target directory: `$CARGO_TARGET_DIR` (relative to the workspace root) or `target/`.
fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// A `cargo` command run from the workspace root with the bpf-linker directory on PATH.
fn cargo() -> Result<Command> {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root())
        .env("PATH", path_with_bpf_linker()?);
    Ok(cmd)
}

fn is_root() -> bool {
    // Effective UID is the second field of the `Uid:` line.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

// ---------------------------------------------------------------------------------------------
// Running commands

/// The command as a shell-like line: variables it sets (except PATH), program, arguments.
fn show(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter(|(k, _)| *k != "PATH")
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    let program = Path::new(cmd.get_program());
    // `$CARGO` is a full path into the toolchain; `cargo` reads better.
    parts.push(match program.file_name() {
        Some(name) if name == "cargo" => "cargo".into(),
        _ => program.to_string_lossy().into_owned(),
    });
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd`, echoing it first; fails when it cannot start or exits unsuccessfully.
fn run(mut cmd: Command) -> Result<()> {
    let line = show(&cmd);
    eprintln!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; fails on a non-zero exit.
fn output(cmd: &mut Command) -> Result<String> {
    let line = show(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------------
// bootstrap

fn bootstrap(apt: bool) -> Result<()> {
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    if apt {
        ensure_apt_packages()?;
    }
    Ok(())
}

fn ensure_nightly_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "the `nightly` toolchain is needed for the eBPF programs; \
         install it with `rustup toolchain install nightly --profile minimal`",
    )?;
    if installed
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-"))
    {
        eprintln!("[bootstrap] rust-src (nightly): already installed");
        return Ok(());
    }
    eprintln!("[bootstrap] rust-src (nightly): installing");
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
    run(cmd)
}

/// `bpf-linker --version` succeeds and reports the pinned version.
fn bpf_linker_works(bin: &Path) -> bool {
    bin.is_file()
        && Command::new(bin).arg("--version").output().is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

fn ensure_bpf_linker() -> Result<()> {
    let bin = bpf_linker_dir()?.join("bpf-linker");
    if bpf_linker_works(&bin) {
        eprintln!(
            "[bootstrap] bpf-linker {BPF_LINKER_VERSION}: cached at {}",
            bin.display()
        );
        return Ok(());
    }
    eprintln!(
        "[bootstrap] bpf-linker {BPF_LINKER_VERSION}: not usable at {}, building it against the \
         nightly toolchain's libLLVM (takes a minute or two)",
        bin.display()
    );

    // The nightly's libLLVM and its major version.
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let lib_dir = sysroot.join("lib");
    let libllvm = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .ok_or_else(|| anyhow!("no libLLVM.so.*-rust-* in {}", lib_dir.display()))?;
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| anyhow!("no `LLVM version:` line in `rustc +nightly -vV`"))?
        .to_owned();

    // LLVM_PREFIX for bpf-linker's build: `<prefix>/lib/libLLVM.so` (+ the file's own name).
    let cache = cache_dir()?;
    let prefix = cache.join(format!("llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let own_name = libllvm.file_name().expect("a file name");
    for name in [OsStr::new("libLLVM.so"), own_name] {
        let link = prefix_lib.join(name);
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
    }
    eprintln!(
        "[bootstrap] {}/{{libLLVM.so,{}}} -> {}",
        prefix_lib.display(),
        own_name.to_string_lossy(),
        libllvm.display()
    );

    let root = cache.join("bpf-linker");
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.arg("install")
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args(["--locked", "--force", "--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        // A throw-away target directory, and no workspace config: build it like a fresh install.
        .env_remove("CARGO_TARGET_DIR")
        .current_dir(&cache);
    run(cmd)?;
    if !bpf_linker_works(&bin) {
        bail!("{} was installed but `--version` fails", bin.display());
    }
    eprintln!(
        "[bootstrap] bpf-linker {BPF_LINKER_VERSION}: built at {}",
        bin.display()
    );
    Ok(())
}

fn missing_apt_packages(packages: &[&'static str]) -> Result<Vec<&'static str>> {
    // One dpkg-query for all; unknown packages print nothing (and make it exit 1).
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\n")
        .args(packages)
        .output()
        .context("cannot run dpkg-query (this needs a Debian-based system)")?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?;
            // `${Status}` is "want flag state", e.g. "install ok installed".
            (words.nth(2)? == "installed").then_some(name)
        })
        .collect();
    Ok(packages
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

fn ensure_apt_packages() -> Result<()> {
    ensure_packages(APT_PACKAGES)
}

/// Installs the missing ones of `packages` (root), after one `apt-get update`.
fn ensure_packages(packages: &[&'static str]) -> Result<()> {
    let missing = missing_apt_packages(packages)?;
    if missing.is_empty() {
        eprintln!(
            "[bootstrap] Debian packages: all {} installed",
            packages.len()
        );
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "Debian packages the tests need are missing: {list}\n\
             install them as root (`apt-get install -y --no-install-recommends {list}`) \
             or run `cargo xtask bootstrap` as root"
        );
    }
    eprintln!("[bootstrap] Debian packages: installing {list}");
    let mut update = Command::new("apt-get");
    update
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install)?;
    let still = missing_apt_packages(packages)?;
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    eprintln!("[bootstrap] Debian packages: installed {list}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// build, run

fn build_daemon(release: bool) -> Result<()> {
    let mut cmd = cargo()?;
    cmd.args(["build", "-p", "datakit-ebpf"]);
    if release {
        cmd.arg("--release");
    }
    run(cmd)
}

fn run_daemon(args: Vec<OsString>) -> Result<()> {
    bootstrap(false)?;
    build_daemon(true)?;
    let bin = target_dir().join("release").join("datakit-ebpf");
    let args = if args.is_empty() {
        ["--config", "conf/ebpf.conf.sample", "--output", "-"]
            .map(OsString::from)
            .to_vec()
    } else {
        args
    };
    if !is_root() {
        eprintln!("warning: not root; loading eBPF programs will most likely fail");
    }
    let mut cmd = Command::new(&bin);
    cmd.args(&args).current_dir(workspace_root());
    eprintln!("$ (cd {}; {})", workspace_root().display(), show(&cmd));
    // Replace this process so signals (Ctrl-C) and the exit status belong to the daemon.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec {}", bin.display()))
}

// ---------------------------------------------------------------------------------------------
// test, lint

type Step<'a> = (String, Box<dyn FnOnce() -> Result<()> + 'a>);

/// Runs the steps in order with a header each, stops at the first failure, prints a summary.
fn run_steps(title: &str, steps: Vec<Step<'_>>) -> Result<()> {
    let total = steps.len();
    let names: Vec<String> = steps.iter().map(|(n, _)| n.clone()).collect();
    let mut results: Vec<(Duration, Option<String>)> = Vec::new();
    let started = Instant::now();
    for (i, (name, step)) in steps.into_iter().enumerate() {
        eprintln!("\n======== [{}/{total}] {name} ========", i + 1);
        let t = Instant::now();
        let res = step();
        let failed = res.as_ref().err().map(|e| format!("{e:#}"));
        results.push((t.elapsed(), failed.clone()));
        if failed.is_some() {
            break;
        }
    }
    eprintln!("\n======== {title}: summary ========");
    for (i, name) in names.iter().enumerate() {
        match results.get(i) {
            Some((d, None)) => eprintln!("  ok       {name} ({:.1}s)", d.as_secs_f64()),
            Some((d, Some(_))) => eprintln!("  FAILED   {name} ({:.1}s)", d.as_secs_f64()),
            None => eprintln!("  skipped  {name}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    match results.iter().find_map(|(_, e)| e.clone()) {
        Some(err) => {
            eprintln!("{title}: FAILED after {elapsed:.1}s");
            Err(anyhow!(err))
        }
        None => {
            eprintln!("{title}: all {total} steps passed in {elapsed:.1}s");
            Ok(())
        }
    }
}

fn fmt_check() -> Result<()> {
    let mut cmd = cargo()?;
    cmd.args(["fmt", "--all", "--", "--check"]);
    run(cmd)
}

fn clippy() -> Result<()> {
    let mut cmd = cargo()?;
    cmd.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    run(cmd)
}

fn bench() -> Result<()> {
    // A `harness = false` bench target: it reuses the end-to-end helpers (namespaces, daemon).
    let mut cmd = cargo()?;
    cmd.args(["bench", "-p", "datakit-ebpf", "--bench", "netflow_overhead"]);
    run(cmd)
}

fn lint() -> Result<()> {
    run_steps(
        "lint",
        vec![
            (
                "bootstrap (toolchain)".into(),
                Box::new(|| bootstrap(false)),
            ),
            ("cargo fmt --all -- --check".into(), Box::new(fmt_check)),
            (
                "cargo clippy --all-targets -- -D warnings".into(),
                Box::new(clippy),
            ),
        ],
    )
}

/// Builds the daemon and its test binaries (no run) and finds them in cargo's JSON messages.
fn test_suite() -> Result<matrix::Suite> {
    let mut cmd = cargo()?;
    cmd.args([
        "test",
        "-p",
        "datakit-ebpf",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    eprintln!("$ {}", show(&cmd));
    let messages = output(&mut cmd)?;
    let mut tests = std::collections::BTreeMap::new();
    for line in messages.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) = (
            is_test,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            tests.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    // The smoke picks its HTTP test by name (see matrix::smoke_http_test).
    let httpflow_tests = match tests.get("httpflow") {
        Some(bin) => output(Command::new(bin).args(["--list", "--format", "terse"]))?
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .map(String::from)
            .collect(),
        None => Vec::new(),
    };
    Ok(matrix::Suite {
        daemon: target_dir().join("debug/datakit-ebpf"),
        tests,
        httpflow_tests,
    })
}

fn test(quick: bool, no_vm: bool, packages: &[String], test_args: &[OsString]) -> Result<()> {
    if !is_root() {
        if in_ci() {
            bail!("`cargo xtask test` must run as root under CI: the eBPF tests load programs");
        }
        eprintln!("warning: not root; the eBPF tests will fail or be skipped (run with sudo)");
    }
    let mut steps: Vec<Step<'_>> = vec![("bootstrap".into(), Box::new(|| bootstrap(true)))];
    if !quick {
        steps.push(("cargo fmt --all -- --check".into(), Box::new(fmt_check)));
        steps.push((
            "cargo clippy --all-targets -- -D warnings".into(),
            Box::new(clippy),
        ));
    }
    let mut cmd = cargo()?;
    // Every suite runs even when an earlier one fails, so one CI run reports all failures.
    cmd.args(["test", "--no-fail-fast"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    if !test_args.is_empty() {
        cmd.arg("--").args(test_args);
    }
    let name = show(&cmd);
    steps.push((name, Box::new(move || run(cmd))));
    if packages.is_empty() && test_args.is_empty() {
        // The suite above runs netflow at the tracepoint tier; the host has one more.
        let mut cmd = cargo()?;
        cmd.args(["test", "-p", "datakit-ebpf", "--test", "netflow"])
            .env("DKE_TEST_NETFLOW_TIER", "classic-tracepoint");
        let name = show(&cmd);
        steps.push((name, Box::new(move || run(cmd))));
    }
    if !no_vm {
        // The kernels CI's host is not: fentry and kprobe tiers, older verifiers (README,
        // "Kernel matrix"). The full suite is `cargo xtask vm-test`.
        steps.push((
            "kernel matrix smoke (cargo xtask vm-test --smoke)".into(),
            Box::new(|| {
                let plan = matrix::Plan::Smoke(test_suite()?);
                let report = target_dir().join("vm-test").join("smoke");
                matrix::run(&vm::select(&[])?, &plan, &report)
            }),
        ));
    }
    run_steps("test", steps)
}
