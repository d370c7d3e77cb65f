//! The kernel matrix: what runs in each guest (the smoke of `cargo xtask test`, the full suite
//! of `cargo xtask vm-test`, or a command), two guests at a time, and the per-kernel, per-test
//! report parsed from libtest's `test NAME ... ok|FAILED|ignored` lines.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::vm::{self, Kernel};

/// Guests at once: each emulated CPU takes a host core, and CI machines have two.
const PARALLEL: usize = 2;

/// What the guests run.
pub enum Plan {
    /// `cargo xtask test`: per kernel, every program of every plugin loaded and attached (netflow
    /// at each of the kernel's tiers, by the parity test, and its perf-event-array object), one
    /// exact-bytes netflow check (the same test), one bash line, one DNS query, one HTTP request.
    Smoke(Suite),
    /// `cargo xtask vm-test`: every suite, netflow's at each tier.
    Full(Suite),
    /// `cargo xtask vm-test -- COMMAND`.
    Command(String),
}

/// The host's binaries the guests run (the guest sees the host's root read-only).
pub struct Suite {
    pub daemon: PathBuf,
    /// Test binaries by test target name (`netflow`, `bash`, ...).
    pub tests: BTreeMap<String, PathBuf>,
    /// Test names of the httpflow binary, when it exists (for the smoke's pick).
    pub httpflow_tests: Vec<String>,
}

/// A shell step of a guest's script.
struct Step {
    name: String,
    script: String,
}

impl Plan {
    /// Per-step and whole-guest time limits.
    fn timeouts(&self) -> (Duration, Duration) {
        match self {
            Plan::Smoke(_) => (Duration::from_secs(300), Duration::from_secs(900)),
            Plan::Full(_) | Plan::Command(_) => {
                (Duration::from_secs(1800), Duration::from_secs(5400))
            }
        }
    }

    fn steps(&self, kernel: &Kernel) -> Result<Vec<Step>> {
        let (suite, full) = match self {
            Plan::Command(command) => {
                return Ok(vec![Step {
                    name: "command".into(),
                    script: command.clone(),
                }]);
            }
            Plan::Smoke(suite) => (suite, false),
            Plan::Full(suite) => (suite, true),
        };
        let bin = |name: &str| -> Result<String> {
            match suite.tests.get(name) {
                Some(path) => Ok(format!("{} --test-threads=1 --color never", path.display())),
                None => bail!("no `{name}` test binary"),
            }
        };
        let tiers = kernel.tiers.join(",");
        // Suites that start netflow only alongside what they test use the kernel's first tier
        // (the auto choice; fentry needs no kprobe warm-up).
        let first_tier = format!("DKE_TEST_NETFLOW_TIER={}", kernel.tiers[0]);
        let mut steps = vec![Step {
            name: "check".into(),
            script: format!(
                "{} check --enabled ebpf-net,ebpf-bash",
                suite.daemon.display()
            ),
        }];
        let mut step = |name: &str, script: String| {
            steps.push(Step {
                name: name.into(),
                script,
            })
        };
        // Tiers with a known failure on this kernel: the parity test leaves them out (their own
        // netflow@tier steps still run in the full suite, reported as known failures).
        let skip: Vec<&str> = kernel
            .known_broken
            .iter()
            .map(|(what, _)| *what)
            .filter(|what| kernel.tiers.contains(what))
            .collect();
        let skip = skip.join(",");
        if full {
            for tier in kernel.tiers {
                step(
                    &format!("netflow@{tier}"),
                    format!(
                        "DKE_TEST_NETFLOW_TIER={tier} DKE_TEST_STRESS_FLOWS={FULL_STRESS_FLOWS} {}",
                        bin("netflow")?
                    ),
                );
            }
            step(
                "tiers",
                format!(
                    "DKE_TEST_EXPECT_TIERS={tiers} DKE_TEST_SKIP_TIERS={skip} DKE_TEST_AUTO_TIER={} {}",
                    kernel.tiers[0],
                    bin("tiers")?
                ),
            );
            step("bash", bin("bash")?);
            step("dnsflow", format!("{first_tier} {}", bin("dnsflow")?));
            if suite.tests.contains_key("httpflow") {
                for tier in kernel.httpflow_tiers {
                    step(
                        &format!("httpflow@{tier}"),
                        format!(
                            "{first_tier} DKE_TEST_HTTPFLOW_TIER={tier} {}",
                            bin("httpflow")?
                        ),
                    );
                }
            }
        } else {
            step(
                "tiers",
                format!(
                    "DKE_TEST_EXPECT_TIERS={tiers} DKE_TEST_SKIP_TIERS={skip} DKE_TEST_AUTO_TIER={} {} --exact same_rows_at_every_tier_tcp_and_connected_udp auto_picks_a_tier_that_loses_nothing_here",
                    kernel.tiers[0],
                    bin("tiers")?
                ),
            );
            // A slice of the lifecycle stress suite (every lifecycle, fewer flows), exact.
            step(
                "netflow-stress",
                format!(
                    "{first_tier} DKE_TEST_STRESS_FLOWS={SMOKE_STRESS_FLOWS} {} --exact lifecycles_stress_every_row_exact",
                    bin("netflow")?
                ),
            );
            // The netflow_perf object (closed connections through a perf event array), at the
            // kernel's first tier.
            step(
                "netflow-perf",
                format!(
                    "{first_tier} {} --exact thousand_short_connections_through_the_perf_event_array",
                    bin("netflow")?
                ),
            );
            step(
                "bash",
                format!("{} --exact typed_lines_arrive_exactly", bin("bash")?),
            );
            step(
                "dnsflow",
                format!(
                    "{first_tier} {} --exact udp_a_and_aaaa_to_ipv4_and_ipv6_servers",
                    bin("dnsflow")?
                ),
            );
            // At the tier `auto` picks on this kernel.
            let http_tier = kernel.httpflow_tiers[0];
            if let Some(test) = smoke_http_test(&suite.httpflow_tests)
                .filter(|_| !known_broken_step(kernel, &format!("httpflow@{http_tier}")))
            {
                step(
                    "httpflow",
                    format!(
                        "{first_tier} DKE_TEST_HTTPFLOW_TIER={http_tier} {} --exact {test}",
                        bin("httpflow")?
                    ),
                );
            }
        }
        if kernel.hidden_btf {
            step("hidden-btf", hidden_btf_script(suite, &bin("netflow")?));
        }
        Ok(steps)
    }
}

/// Flows of netflow's lifecycle stress suite in an emulated guest (about 7x slower than the
/// host, which runs 10,000): the smoke's slice (600 took 160 s of the step's 300 on 7.2 with
/// two guests at once), and the full suite's.
const SMOKE_STRESS_FLOWS: usize = 400;
const FULL_STRESS_FLOWS: usize = 2_000;

/// The httpflow test of the smoke: the first (by name) containing `smoke`, else the first
/// containing `exact`, else the first.
fn smoke_http_test(tests: &[String]) -> Option<&String> {
    let mut sorted: Vec<&String> = tests.iter().collect();
    sorted.sort();
    ["smoke", "exact", ""]
        .iter()
        .find_map(|pattern| sorted.iter().find(|t| t.contains(pattern)).copied())
}

/// Kernels without BTF: `/sys/kernel/btf` hidden under an empty tmpfs (after copying the
/// kernel's BTF to a file); `check` must explain and point at `--btf`, accept the kprobe tier
/// with `--btf FILE`, and the netflow `--btf` test must count exact bytes at the kprobe tier.
/// Its checks print libtest-like lines, so they land in the per-test report.
fn hidden_btf_script(suite: &Suite, netflow: &str) -> String {
    let daemon = suite.daemon.display();
    format!(
        r#"fail=0
verdict() {{ if [ "$2" = 0 ]; then echo "test hidden_btf::$1 ... ok"; else echo "test hidden_btf::$1 ... FAILED"; fail=1; fi; }}
cp /sys/kernel/btf/vmlinux /tmp/vmlinux.btf && mount -t tmpfs hidden-btf /sys/kernel/btf
test ! -e /sys/kernel/btf/vmlinux; verdict btf_is_hidden $?
{daemon} check --enabled ebpf-net > /tmp/nobtf.txt; cat /tmp/nobtf.txt
grep -Eq '^  btf +no .*pass --btf FILE' /tmp/nobtf.txt; verdict check_explains_and_points_at_btf_option $?
{daemon} check --enabled ebpf-net --btf /tmp/vmlinux.btf --netflow-tier kprobe > /tmp/btf.txt; cat /tmp/btf.txt
grep -q 'netflow at the kprobe tier' /tmp/btf.txt; verdict check_with_btf_file_accepts_kprobe_tier $?
DKE_TEST_NETFLOW_TIER=kprobe DKE_TEST_BTF_FILE=/tmp/vmlinux.btf {netflow} --exact external_btf_file_is_used || fail=1
exit $fail"#
    )
}

/// Quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest's script: every step under its own timeout, framed by markers the report parses.
fn script(steps: &[Step], step_timeout: Duration) -> String {
    let mut out = String::new();
    let workspace = crate::workspace_root().join("ebpf-daemon");
    // cargo runs tests from the package directory; the tests' tolerances for emulation
    // (RTT, timings; never exact bytes or counts) key on DKE_TEST_EMULATED.
    let _ = writeln!(out, "cd {}", quote(&workspace.to_string_lossy()));
    let _ = writeln!(out, "export CI=true DKE_TEST_EMULATED=1 RUST_BACKTRACE=1");
    let _ = writeln!(out, "rc=0");
    for step in steps {
        let _ = writeln!(
            out,
            "echo '== step {name}'; timeout -k 10 {t} sh -c {script} 2>&1; s=$?; echo \"== step-exit {name} $s\"; [ $s = 0 ] || rc=1",
            name = step.name,
            t = step_timeout.as_secs(),
            script = quote(&step.script),
        );
    }
    let _ = writeln!(out, "exit $rc");
    out
}

/// The outcome of one test (or of a step without libtest output) in one kernel.
#[derive(Clone)]
struct Outcome {
    step: String,
    test: String,
    result: String,
}

/// Per-test outcomes and per-step output from the guest's output.
fn parse(output: &str, guest_finished: bool) -> (Vec<Outcome>, BTreeMap<String, String>) {
    let mut outcomes = Vec::new();
    let mut logs: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<(String, usize)> = None;
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("== step ") {
            current = Some((name.to_string(), outcomes.len()));
            continue;
        }
        if let Some(rest) = line.strip_prefix("== step-exit ") {
            let mut words = rest.split_whitespace();
            let (name, code) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let first = current.take().map_or(outcomes.len(), |(_, first)| first);
            let ours = &outcomes[first..];
            let failed_test = ours.iter().any(|o: &Outcome| o.result == "FAILED");
            // A step fails as a whole when no test says why (a crash, a timeout, `check`).
            if code != "0" && !failed_test {
                let test = match code {
                    "124" | "137" => "(step timed out)".to_string(),
                    _ => format!("(step exit {code})"),
                };
                outcomes.push(Outcome {
                    step: name.into(),
                    test,
                    result: "FAILED".into(),
                });
            } else if ours.is_empty() {
                outcomes.push(Outcome {
                    step: name.into(),
                    test: "(step)".into(),
                    result: if code == "0" { "ok" } else { "FAILED" }.into(),
                });
            }
            continue;
        }
        if let Some((step, _)) = &current {
            let log = logs.entry(step.clone()).or_default();
            log.push_str(line);
            log.push('\n');
            if let Some(rest) = line.strip_prefix("test ")
                && let Some((test, result)) = rest.rsplit_once(" ... ")
                && ["ok", "FAILED", "ignored"].contains(&result.trim())
            {
                outcomes.push(Outcome {
                    step: step.clone(),
                    test: test.to_string(),
                    result: result.trim().to_string(),
                });
            }
        }
    }
    if let Some((step, _)) = current {
        outcomes.push(Outcome {
            step,
            test: if guest_finished {
                "(step output cut)"
            } else {
                "(guest did not finish)"
            }
            .into(),
            result: "FAILED".into(),
        });
    }
    (outcomes, logs)
}

struct KernelReport {
    label: &'static str,
    outcomes: Vec<Outcome>,
    /// Why the kernel failed beyond its tests (fetch, boot, hang), if it did.
    error: Option<String>,
    console: Option<PathBuf>,
    took: Duration,
}

impl KernelReport {
    fn ok(&self) -> bool {
        self.error.is_none() && self.outcomes.iter().all(|o| o.result != "FAILED")
    }
}

/// Result of a failed test in a step with a known failure on the kernel (the full suite runs
/// those steps to keep watching them); it does not fail the run.
const KNOWN_FAILURE: &str = "known";

/// Whether `step` is one of `kernel`'s known failures: a netflow tier (`fentry`, matching the
/// step `netflow@fentry`) or a step by name (`httpflow@syscalls`).
fn known_broken_step(kernel: &Kernel, step: &str) -> bool {
    kernel
        .known_broken
        .iter()
        .any(|(what, _)| step == *what || step == format!("netflow@{what}"))
}

/// Marks the failures of `kernel`'s known-broken steps as known.
fn mark_known_failures(kernel: &Kernel, outcomes: &mut [Outcome]) {
    for o in outcomes {
        if o.result == "FAILED" && known_broken_step(kernel, &o.step) {
            o.result = KNOWN_FAILURE.into();
        }
    }
}

/// Runs `plan` on `kernels`, two at a time; prints and writes (under `report_dir`) the per-kernel,
/// per-test table and each step's output. Fails when any test or kernel failed.
pub fn run(kernels: &[&'static Kernel], plan: &Plan, report_dir: &Path) -> Result<()> {
    vm::ensure_host_packages()?;
    let (step_timeout, guest_timeout) = plan.timeouts();
    let _ = fs::remove_dir_all(report_dir);
    fs::create_dir_all(report_dir)?;
    let next = AtomicUsize::new(0);
    let reports = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(kernels.len()) {
            scope.spawn(|| {
                while let Some(&kernel) = kernels.get(next.fetch_add(1, Ordering::SeqCst)) {
                    let report = run_kernel(kernel, plan, step_timeout, guest_timeout, report_dir);
                    reports.lock().unwrap().push(report);
                }
            });
        }
    });
    let mut reports = reports.into_inner().unwrap();
    reports.sort_by_key(|r| kernels.iter().position(|k| k.label == r.label));
    let mut table = table(&reports);
    for kernel in kernels {
        for (tier, why) in kernel.known_broken {
            let _ = match plan {
                Plan::Smoke(_) => writeln!(
                    table,
                    "known failure, left out of the smoke (`cargo xtask vm-test --kernel {}` runs it): {} {tier}: {why}",
                    kernel.label, kernel.label
                ),
                _ => writeln!(
                    table,
                    "known failure (`{KNOWN_FAILURE}` above; does not fail the run): {} {tier}: {why}",
                    kernel.label
                ),
            };
        }
    }
    eprintln!("\n======== kernel matrix: per kernel and test ========\n{table}");
    fs::write(report_dir.join("summary.txt"), &table)?;
    eprintln!(
        "(step outputs and `check` reports: {})",
        report_dir.display()
    );
    if reports.iter().any(|r| !r.ok()) {
        bail!("kernel matrix: failures above");
    }
    Ok(())
}

fn run_kernel(
    kernel: &'static Kernel,
    plan: &Plan,
    step_timeout: Duration,
    guest_timeout: Duration,
    report_dir: &Path,
) -> KernelReport {
    let started = Instant::now();
    let label = kernel.label;
    let mut report = KernelReport {
        label,
        outcomes: Vec::new(),
        error: None,
        console: None,
        took: Duration::ZERO,
    };
    let run = plan.steps(kernel).and_then(|steps| {
        eprintln!(
            "[vm {label}] booting: {}",
            steps
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        vm::run_in_guest(kernel, &script(&steps, step_timeout), guest_timeout)
    });
    match run {
        Err(err) => report.error = Some(format!("{err:#}")),
        Ok(guest) => {
            let (mut outcomes, logs) = parse(&guest.output, guest.exit.is_some());
            mark_known_failures(kernel, &mut outcomes);
            let dir = report_dir.join(label);
            let _ = fs::create_dir_all(&dir);
            for (step, log) in &logs {
                let _ = fs::write(dir.join(format!("{}.log", step.replace('@', "-"))), log);
            }
            let _ = fs::write(dir.join("output.log"), &guest.output);
            report.outcomes = outcomes;
            if guest.hung {
                report.error = Some(format!(
                    "guest hung: killed after {} s",
                    guest_timeout.as_secs()
                ));
            } else if guest.exit.is_none() {
                report.error = Some("the guest's script did not finish".into());
            }
            if !report.ok() {
                report.console = Some(guest.keep_console());
            }
        }
    }
    report.took = started.elapsed();
    let failed = report
        .outcomes
        .iter()
        .filter(|o| o.result == "FAILED")
        .count();
    eprintln!(
        "[vm {label}] {} in {:.0?}: {} results, {failed} failed{}{}",
        if report.ok() { "ok" } else { "FAILED" },
        report.took,
        report.outcomes.len(),
        report
            .error
            .as_ref()
            .map(|e| format!("; {e}"))
            .unwrap_or_default(),
        report
            .console
            .as_ref()
            .map(|c| format!("; console kept at {}", c.display()))
            .unwrap_or_default(),
    );
    report
}

/// One row per (step, test), one column per kernel.
fn table(reports: &[KernelReport]) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    for report in reports {
        for o in &report.outcomes {
            let key = (o.step.clone(), o.test.clone());
            if !rows.contains(&key) {
                rows.push(key);
            }
        }
    }
    let width = rows
        .iter()
        .map(|(s, t)| s.len() + t.len() + 2)
        .max()
        .unwrap_or(10)
        .max(10);
    let mut out = format!("{:<width$}", "step: test");
    for r in reports {
        let _ = write!(out, "  {:<8}", r.label);
    }
    out.push('\n');
    for (step, test) in &rows {
        let _ = write!(out, "{:<width$}", format!("{step}: {test}"));
        for r in reports {
            let cell = r
                .outcomes
                .iter()
                .find(|o| &o.step == step && &o.test == test)
                .map_or("-", |o| o.result.as_str());
            let _ = write!(out, "  {cell:<8}");
        }
        out.push('\n');
    }
    for r in reports {
        let passed = r.outcomes.iter().filter(|o| o.result == "ok").count();
        let failed = r.outcomes.iter().filter(|o| o.result == "FAILED").count();
        let known = r
            .outcomes
            .iter()
            .filter(|o| o.result == KNOWN_FAILURE)
            .count();
        let _ = writeln!(
            out,
            "{} {:<5} {passed} ok, {failed} failed, {known} known failures, {:.0?}{}{}",
            if r.ok() { "ok    " } else { "FAILED" },
            r.label,
            r.took,
            r.error
                .as_ref()
                .map(|e| format!("; {e}"))
                .unwrap_or_default(),
            r.console
                .as_ref()
                .map(|c| format!("; console: {}", c.display()))
                .unwrap_or_default(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tests_steps_and_failures() {
        let output = "== uname 6.1\n== step check\nkernel 6.1\n== step-exit check 0\n\
            == step netflow@kprobe\nrunning 2 tests\ntest a ... ok\ntest b ... FAILED\n\
            == step-exit netflow@kprobe 101\n== step bash\nSegmentation fault\n\
            == step-exit bash 139\n== step dns\ntest c ... ok\n";
        let (outcomes, logs) = parse(output, false);
        let got: Vec<String> = outcomes
            .iter()
            .map(|o| format!("{}|{}|{}", o.step, o.test, o.result))
            .collect();
        assert_eq!(
            got,
            [
                "check|(step)|ok",
                "netflow@kprobe|a|ok",
                "netflow@kprobe|b|FAILED",
                "bash|(step exit 139)|FAILED",
                "dns|c|ok",
                "dns|(guest did not finish)|FAILED",
            ]
        );
        assert_eq!(logs["check"], "kernel 6.1\n");
    }

    #[test]
    fn known_failures_do_not_fail_the_run() {
        let kernel = vm::select(&["7.2".into()]).unwrap()[0];
        let outcome = |step: &str, result: &str| Outcome {
            step: step.into(),
            test: "t".into(),
            result: result.into(),
        };
        let mut outcomes = vec![
            outcome("netflow@fentry", "FAILED"),
            outcome("netflow@fentry", "ok"),
            outcome("httpflow@syscalls", "FAILED"),
            outcome("netflow@kprobe", "FAILED"),
        ];
        mark_known_failures(kernel, &mut outcomes);
        let got: Vec<&str> = outcomes.iter().map(|o| o.result.as_str()).collect();
        assert_eq!(got, ["known", "ok", "known", "FAILED"]);
        let report = KernelReport {
            label: "7.2",
            outcomes: outcomes[..3].to_vec(),
            error: None,
            console: None,
            took: Duration::ZERO,
        };
        assert!(report.ok());
    }

    #[test]
    fn http_smoke_pick() {
        let tests = ["b_exact".to_string(), "a".into(), "z_smoke".into()];
        assert_eq!(smoke_http_test(&tests).unwrap(), "z_smoke");
        assert_eq!(smoke_http_test(&tests[..2]).unwrap(), "b_exact");
        assert_eq!(smoke_http_test(&tests[1..2]).unwrap(), "a");
        assert!(smoke_http_test(&[]).is_none());
    }
}
