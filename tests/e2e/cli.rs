//! The binary's command line, configuration errors, `check`, and how DataKit launches it.

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::{DAEMON, Daemon, InteractiveBash, privileged, scratch, serial};
use fake_datakit::FakeDataKit;

/// Runs the binary to completion with an empty environment.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(DAEMON)
        .args(args)
        .env_clear()
        .output()
        .expect("run datakit-ebpf");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_file_names_file_line_and_key_and_exits_nonzero() {
    let dir = scratch("cli-badconf");
    let conf = dir.join("ebpf.conf");
    std::fs::write(
        &conf,
        "[[inputs.ebpf]]\n  daemon = true\n  name = 'ebpf'\n  enabled_plugins = [\"ebpf-bash\"]\n  intervall = \"60s\"\n",
    )
    .unwrap();
    let conf_arg = conf.to_str().unwrap();
    let (code, _, stderr) = run(&["--config", conf_arg]);
    assert_eq!(code, 2, "{stderr}");
    let expected =
        format!("{conf_arg}:5:3: key `intervall`: unknown key; did you mean `interval`?");
    assert!(stderr.contains(&expected), "stderr: {stderr}");

    std::fs::write(&conf, "[[inputs.ebpf]]\n  interval = \"soon\"\n").unwrap();
    let (code, _, stderr) = run(&["--config", conf_arg]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(&format!(
            "{conf_arg}:2:14: key `interval`: invalid duration `soon`"
        )),
        "{stderr}"
    );
}

#[test]
fn unknown_plugin_lists_the_valid_ones() {
    let (code, _, stderr) = run(&["run", "--enabled", "ebpf-bash,ebpf-nett"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("unknown plugin `ebpf-nett`; valid plugins are: ebpf-net, ebpf-bash, ebpf-conntrack, ebpf-trace, bpf-netlog"),
        "{stderr}"
    );
}

#[test]
fn version_and_help() {
    let (code, stdout, _) = run(&["version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with(&format!(
        "datakit-ebpf version {}",
        env!("CARGO_PKG_VERSION")
    )));
    let (code, stdout, _) = run(&[]);
    assert_eq!(code, 0);
    assert!(stdout.contains("Usage: datakit-ebpf"), "{stdout}");
    let (code, stdout, _) = run(&["run", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--datakit-apiserver",
        "--enabled",
        "--config",
        "--output",
        "--tags",
    ] {
        assert!(stdout.contains(flag), "help lacks {flag}:\n{stdout}");
    }
}

#[test]
fn check_reports_each_plugin_and_exits_by_the_enabled_ones() {
    if !privileged() {
        return;
    }
    let (code, stdout, stderr) = run(&["check", "--enabled", "ebpf-bash"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    for needle in [
        "kernel features:",
        "uprobes",
        "ring buffer",
        "fentry/fexit",
        "kprobes",
        "btf",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    let bash_line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("ebpf-bash"))
        .unwrap();
    assert!(
        bash_line.contains("enabled")
            && bash_line.contains("can run")
            && bash_line.contains("via uretprobe"),
        "{bash_line}"
    );

    // The rest is about this project's host kernel, which has neither kprobes nor trampolines
    // (the kernel matrix checks the tier choice on kernels that have them).
    if std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        return;
    }
    // netflow's tracepoint tier runs on this host kernel.
    let (code, stdout, _) = run(&["check", "--enabled", "ebpf-bash,ebpf-net"]);
    assert_eq!(code, 0, "{stdout}");
    let net_line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("ebpf-net"))
        .unwrap();
    assert!(
        net_line.contains("can run") && net_line.contains("tracepoint tier"),
        "{net_line}"
    );
    // httpflow says how it runs: parsed in the kernel, fallbacks counted.
    let http_line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("httpflow"))
        .unwrap_or_else(|| panic!("no httpflow line:\n{stdout}"));
    assert!(
        http_line.contains("parsed in the kernel") && http_line.contains("counted"),
        "{http_line}"
    );

    // A forced tier this kernel lacks (no kprobes here): netflow cannot run and says why;
    // ebpf-net still runs its other parts (dnsflow needs no tracing hooks), but not all of it:
    // exit 1.
    let (code, stdout, _) = run(&[
        "check",
        "--enabled",
        "ebpf-net",
        "--netflow-tier",
        "kprobe",
        "--l7net-disabled",
        "httpflow,httpflow-tls",
    ]);
    assert_eq!(code, 1, "{stdout}");
    let net_line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("ebpf-net"))
        .unwrap();
    assert!(
        net_line.contains("can run")
            && net_line.contains("via dnsflow")
            && net_line.contains("not running: netflow: no usable tier")
            && net_line.contains("kprobe: no kprobes"),
        "{net_line}"
    );
    // With httpflow on (the default), ebpf-net runs it too, and still says netflow cannot.
    let (code, stdout, _) = run(&["check", "--enabled", "ebpf-net", "--netflow-tier", "kprobe"]);
    assert_eq!(code, 1, "{stdout}");
    let net_line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("ebpf-net"))
        .unwrap();
    assert!(
        net_line.contains("can run")
            && net_line.contains("; httpflow ")
            && net_line.contains("not running: netflow"),
        "{net_line}"
    );
}

/// The command line DataKit 1.82 builds (contract §3.6), plus flags older DataKits send.
#[test]
fn datakit_launch_line_with_legacy_flags_runs() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("cli-datakit");
    let datakit = FakeDataKit::start();
    let apiserver = datakit.addr().to_string();
    let args = [
        "run",
        "--datakit-apiserver",
        &apiserver,
        "--hostname",
        "node-1",
        "--l7net-enabled",
        "httpflow",
        "--pprof-host",
        "127.0.0.1",
        "--pprof-port",
        "6061",
        "--netlog-metric",
        "--ephemeral_port",
        "10001",
        "--interval",
        "1s",
        "--min-interval",
        "1s",
        "--res-net",
        "100MiB/s",
        "--trace-allprocess",
        "true",
        "--conv-to-ddtrace",
        "false",
        "--enabled",
        "ebpf-bash",
        "--tags",
        "cluster=c1;zone=z9",
    ];
    let mut daemon = Daemon::start(&dir, &args);
    daemon.wait_log("ebpf-bash: attached uretprobe", Duration::from_secs(30));
    let mut bash = InteractiveBash::spawn(&dir, None);
    bash.type_line(b"echo launched by datakit");
    let pid = bash.pid().to_string();
    let points = datakit.wait_for(Duration::from_secs(15), |pts| {
        pts.iter().any(|p| p.str("pid") == Some(&pid))
    });
    let point = points
        .iter()
        .find(|p| p.str("pid") == Some(&pid))
        .expect("bash point");
    assert_eq!(point.tag("host"), Some("node-1"));
    assert_eq!(point.tag("cluster"), Some("c1"));
    assert_eq!(point.tag("zone"), Some("z9"));
    assert!(daemon.terminate().success());
    let log = daemon.log_text();
    assert!(
        log.contains("--res-net") && log.contains("--trace-allprocess"),
        "legacy flags not warned about:\n{log}"
    );
}

#[test]
fn fatal_start_failure_reports_last_error() {
    let dir = scratch("cli-lasterror");
    let datakit = FakeDataKit::start();
    let apiserver = datakit.addr().to_string();
    // ebpf-conntrack is accepted (DataKit may send it) but not provided by this daemon.
    let mut daemon = Daemon::start(
        &dir,
        &[
            "run",
            "--datakit-apiserver",
            &apiserver,
            "--enabled",
            "ebpf-conntrack",
        ],
    );
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", daemon.log_text());
    let errors = datakit.last_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["input"], "ebpf");
    let content = errors[0]["err_content"].as_str().unwrap();
    assert!(content.contains("ebpf-conntrack"), "{content}");
}

#[test]
fn stdout_sink_prints_line_protocol() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("cli-stdout");
    let stdout_path = dir.join("stdout.lp");
    let stdout = std::fs::File::create(&stdout_path).unwrap();
    let args = [
        "run",
        "--output",
        "-",
        "--enabled",
        "ebpf-bash",
        "--interval",
        "1s",
        "--min-interval",
        "1s",
    ];
    let mut daemon = Daemon::start_with(&dir, &args, &[], Stdio::from(stdout));
    daemon.wait_log("ebpf-bash: attached uretprobe", Duration::from_secs(30));
    let mut bash = InteractiveBash::spawn(&dir, None);
    bash.type_line(b"echo to stdout");
    let pid = bash.pid().to_string();
    let found = common::wait_until(Duration::from_secs(15), || {
        std::fs::read_to_string(&stdout_path).is_ok_and(|s| s.contains("echo to stdout"))
    });
    assert!(found, "log:\n{}", daemon.log_text());
    assert!(daemon.terminate().success());
    let text = std::fs::read_to_string(&stdout_path).unwrap();
    let points =
        fake_datakit::parse_lp(&text, "logging", "ebpf-bash").expect("valid line protocol");
    assert!(
        points
            .iter()
            .any(|p| p.str("pid") == Some(&pid) && p.str("cmd") == Some("echo to stdout"))
    );
}

/// CLI over environment over config file over defaults, through the real binary.
#[test]
fn precedence_cli_env_file() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("cli-precedence");
    let datakit = FakeDataKit::start();
    let conf = dir.join("ebpf.conf");
    std::fs::write(
        &conf,
        format!(
            "[[inputs.ebpf]]\n  daemon = true\n  name = 'ebpf'\n  args = [\"--datakit-apiserver\", \"{}\"]\n  \
             enabled_plugins = [\"ebpf-bash\"]\n  interval = \"1s\"\n  min_interval = \"1s\"\n  \
             hostname = \"from-file\"\n  service = \"from-file\"\n  [inputs.ebpf.tags]\n    source_of = \"file\"\n",
            datakit.addr()
        ),
    )
    .unwrap();
    let args = ["--config", conf.to_str().unwrap(), "--service", "from-cli"];
    let env = [("DKE_HOSTNAME", "from-env"), ("DKE_TAGS", "level=env")];
    let mut daemon = Daemon::start_with(&dir, &args, &env, Stdio::null());
    daemon.wait_log("ebpf-bash: attached uretprobe", Duration::from_secs(30));
    let mut bash = InteractiveBash::spawn(&dir, None);
    bash.type_line(b"echo precedence");
    let pid = bash.pid().to_string();
    let points = datakit.wait_for(Duration::from_secs(15), |pts| {
        pts.iter().any(|p| p.str("pid") == Some(&pid))
    });
    let point = points
        .iter()
        .find(|p| p.str("pid") == Some(&pid))
        .expect("bash point");
    assert_eq!(point.tag("host"), Some("from-env"), "env over file");
    assert_eq!(point.tag("service"), Some("from-cli"), "CLI over file");
    assert_eq!(point.tag("source_of"), Some("file"), "file over defaults");
    assert_eq!(point.tag("level"), Some("env"));
    assert!(daemon.terminate().success());
}
