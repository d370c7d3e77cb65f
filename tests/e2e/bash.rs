//! ebpf-bash end to end: the real uretprobe, a real interactive bash on a pty, the daemon
//! posting to a fake DataKit, and the exact points that arrive.

mod common;

use std::{process::Stdio, time::Duration};

use common::{Daemon, InteractiveBash, privileged, scratch, serial, wait_until};
use fake_datakit::{FakeDataKit, FieldValue, Point};

/// Bytes kept of a command line (ebpf_common::bash::BASH_LINE_MAX).
const LINE_MAX: usize = 4095;

fn daemon_args(apiserver: &str) -> Vec<String> {
    [
        "run",
        "--datakit-apiserver",
        apiserver,
        "--enabled",
        "ebpf-bash",
        "--hostname",
        "e2e-host",
        "--tags",
        "env=test;team=ops",
        "--interval",
        "1s",
        "--min-interval",
        "1s",
        "--log-level",
        "debug",
    ]
    .map(String::from)
    .to_vec()
}

fn start_daemon(dir: &std::path::Path, apiserver: &str, extra: &[&str]) -> Daemon {
    let mut args = daemon_args(apiserver);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // A zone east of UTC (a POSIX TZ string: no tzdata needed): `message` carries local time
    // with its offset, as the reference writes it.
    let mut daemon = Daemon::start_with(dir, &args, &[("TZ", "CST-8")], Stdio::null());
    daemon.wait_log("ebpf-bash: attached uretprobe", Duration::from_secs(30));
    daemon
}

fn bash_points_of(points: &[Point], pid: u32) -> Vec<Point> {
    points
        .iter()
        .filter(|p| p.measurement == "bash" && p.str("pid") == Some(&pid.to_string()))
        .cloned()
        .collect()
}

fn cmds(points: &[Point]) -> Vec<String> {
    points
        .iter()
        .map(|p| p.str("cmd").unwrap().to_string())
        .collect()
}

#[test]
fn typed_lines_arrive_exactly() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("bash-exact");
    let datakit = FakeDataKit::start();
    // The shell is at its prompt before the probe exists: its first line must not be lost.
    let mut bash = InteractiveBash::spawn(&dir, None);
    let mut daemon = start_daemon(&dir, &datakit.addr().to_string(), &[]);

    let long: String = std::iter::once(": ".to_string())
        .chain(std::iter::repeat_n("x".to_string(), 3998))
        .collect();
    assert_eq!(long.len(), 4000);
    let too_long: String = std::iter::once(": ".to_string())
        .chain((0..5998).map(|i| char::from(b'a' + (i % 26) as u8).to_string()))
        .collect();
    let typed: Vec<Vec<u8>> = vec![
        b"echo hello".to_vec(),
        br#"echo 'single' "double \"esc\"" a=b c\=d, x y"#.to_vec(),
        b"printf '%s' tab\there".to_vec(),
        "echo 你好 ünïcødé 🚀".as_bytes().to_vec(),
        b"".to_vec(), // Enter on an empty prompt: not a command
        long.as_bytes().to_vec(),
        too_long.as_bytes().to_vec(),
        b"echo \xff\xfe raw".to_vec(),
        br"echo back\slash\\ end".to_vec(),
    ];
    for line in &typed {
        bash.type_line(line);
    }
    let expected: Vec<String> = vec![
        "echo hello".into(),
        r#"echo 'single' "double \"esc\"" a=b c\=d, x y"#.into(),
        "printf '%s' tab\there".into(),
        "echo 你好 ünïcødé 🚀".into(),
        long.clone(),
        too_long[..LINE_MAX].to_string(),
        "echo \u{fffd}\u{fffd} raw".into(),
        r"echo back\slash\\ end".into(),
    ];
    let pid = bash.pid();
    let points = datakit.wait_for(Duration::from_secs(20), |pts| {
        bash_points_of(pts, pid).len() >= expected.len()
    });
    let ours = bash_points_of(&points, pid);
    assert_eq!(cmds(&ours), expected, "daemon log:\n{}", daemon.log_text());

    for (point, cmd) in ours.iter().zip(&expected) {
        assert_eq!(point.category, "logging");
        assert_eq!(point.input, "ebpf-bash");
        assert_eq!(point.tag("host"), Some("e2e-host"));
        assert_eq!(point.tag("service"), Some("ebpf"));
        assert_eq!(point.tag("env"), Some("test"));
        assert_eq!(point.tag("team"), Some("ops"));
        assert_eq!(point.str("user"), Some("root"));
        assert_eq!(point.str("pid"), Some(pid.to_string().as_str()));
        let truncated = cmd.len() == LINE_MAX && cmd.starts_with(": ab");
        assert_eq!(
            point.field("truncated"),
            Some(&FieldValue::B(truncated)),
            "{cmd:.40}"
        );
        let message = point.str("message").unwrap();
        let suffix = format!(" pid:`{pid}` user:`root` cmd:`{cmd}`");
        assert!(message.ends_with(&suffix), "message {message:.120}");
        let stamp = &message[..message.len() - suffix.len()];
        assert!(
            stamp.len() == 25 && stamp.ends_with("+08:00") && stamp.as_bytes()[10] == b'T',
            "{stamp}"
        );
        let ts = point.timestamp.expect("timestamp");
        // The point's own time, 8 hours east, to the second.
        let east =
            std::time::UNIX_EPOCH + Duration::from_secs((ts / 1_000_000_000) as u64 + 8 * 3600);
        let expected = humantime::format_rfc3339_seconds(east)
            .to_string()
            .replace('Z', "+08:00");
        assert_eq!(stamp, expected);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        assert!(
            (now - ts).abs() < 60_000_000_000,
            "timestamp {ts} vs now {now}"
        );
    }
    for request in datakit.requests() {
        assert_eq!(request.precision.as_deref(), Some("n"));
        assert_eq!(request.content_encoding.as_deref(), Some("gzip"));
    }
    assert!(daemon.terminate().success());
}

#[test]
fn user_is_the_login_name_of_the_real_uid() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("bash-user");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let datakit = FakeDataKit::start();
    let mut daemon = start_daemon(&dir, &datakit.addr().to_string(), &[]);
    // uid 65534 is `nobody` in Debian's passwd; its gid half differs from root's.
    let mut bash = InteractiveBash::spawn(&dir, Some(65534));
    bash.type_line(b"echo as nobody");
    let pid = bash.pid();
    let points = datakit.wait_for(Duration::from_secs(15), |pts| {
        !bash_points_of(pts, pid).is_empty()
    });
    let ours = bash_points_of(&points, pid);
    assert_eq!(
        cmds(&ours),
        ["echo as nobody"],
        "log:\n{}",
        daemon.log_text()
    );
    assert_eq!(ours[0].str("user"), Some("nobody"));
    assert!(daemon.terminate().success());
}

#[test]
fn many_waiting_lines_are_sent_at_once() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("bash-burst");
    let datakit = FakeDataKit::start();
    let apiserver = datakit.addr().to_string();
    // A long interval: only the "many lines waiting" rule can deliver these in time.
    let args = [
        "run",
        "--datakit-apiserver",
        &apiserver,
        "--enabled",
        "ebpf-bash",
        "--interval",
        "120s",
        "--min-interval",
        "1s",
    ];
    let mut daemon = Daemon::start(&dir, &args);
    daemon.wait_log("ebpf-bash: attached uretprobe", Duration::from_secs(30));
    let mut bash = InteractiveBash::spawn(&dir, None);
    for i in 0..130 {
        bash.type_line(format!(": {i}").as_bytes());
    }
    let pid = bash.pid();
    let points = datakit.wait_for(Duration::from_secs(20), |pts| {
        bash_points_of(pts, pid).len() >= 128
    });
    let ours = bash_points_of(&points, pid);
    assert!(
        ours.len() >= 128,
        "only {} lines arrived before the interval",
        ours.len()
    );
    let expected: Vec<String> = (0..ours.len()).map(|i| format!(": {i}")).collect();
    assert_eq!(cmds(&ours), expected);
    // The rest arrive on shutdown: nothing is lost.
    assert!(daemon.terminate().success());
    let all = bash_points_of(&datakit.points(), pid);
    assert_eq!(all.len(), 130, "after SIGTERM");
}

#[test]
fn datakit_down_at_start_then_up_loses_nothing() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("bash-down");
    let port = common::free_port();
    let apiserver = format!("127.0.0.1:{port}");
    let mut daemon = start_daemon(&dir, &apiserver, &[]);
    let mut bash = InteractiveBash::spawn(&dir, None);
    for i in 0..5 {
        bash.type_line(format!("echo while down {i}").as_bytes());
    }
    // Let a few deliveries fail (interval 1 s, backoff from 0.5 s).
    std::thread::sleep(Duration::from_secs(3));
    let datakit = FakeDataKit::start_on(([127, 0, 0, 1], port).into()).unwrap();
    bash.type_line(b"echo after up");
    let pid = bash.pid();
    let points = datakit.wait_for(Duration::from_secs(40), |pts| {
        bash_points_of(pts, pid).len() >= 6
    });
    let mut expected: Vec<String> = (0..5).map(|i| format!("echo while down {i}")).collect();
    expected.push("echo after up".into());
    assert_eq!(
        cmds(&bash_points_of(&points, pid)),
        expected,
        "log:\n{}",
        daemon.log_text()
    );
    assert!(daemon.terminate().success());
    // The daemon kept running, and logged the outage at most once per interval (1 s) rather
    // than once per attempt, then its recovery once.
    let log = daemon.log_text();
    let failures = log.matches("cannot deliver to DataKit").count();
    assert!(
        (1..=5).contains(&failures),
        "{failures} failure log lines:\n{log}"
    );
    assert_eq!(
        log.matches("delivery to DataKit recovered").count(),
        1,
        "{log}"
    );
}

#[test]
fn server_errors_are_retried_and_bad_requests_dropped() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("bash-errors");
    let datakit = FakeDataKit::start();
    let mut daemon = start_daemon(&dir, &datakit.addr().to_string(), &[]);
    let mut bash = InteractiveBash::spawn(&dir, None);
    let pid = bash.pid();

    datakit.fail_next(500, 3);
    bash.type_line(b"echo retried");
    let points = datakit.wait_for(Duration::from_secs(20), |pts| {
        !bash_points_of(pts, pid).is_empty()
    });
    assert_eq!(cmds(&bash_points_of(&points, pid)), ["echo retried"]);
    let statuses: Vec<u16> = datakit.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 500, 200]);

    datakit.fail_next(400, 1);
    bash.type_line(b"echo rejected");
    assert!(wait_until(Duration::from_secs(10), || datakit
        .requests()
        .len()
        >= 5));
    bash.type_line(b"echo accepted");
    let points = datakit.wait_for(Duration::from_secs(20), |pts| {
        bash_points_of(pts, pid).len() >= 2
    });
    assert_eq!(
        cmds(&bash_points_of(&points, pid)),
        ["echo retried", "echo accepted"]
    );
    let rejected: Vec<u16> = datakit
        .requests()
        .iter()
        .map(|r| r.status)
        .filter(|s| *s == 400)
        .collect();
    assert_eq!(rejected, [400], "a 400 is not retried");
    assert!(daemon.terminate().success());
    assert!(
        daemon.log_text().contains("datakit.injectedFailure"),
        "the 400's body is logged:\n{}",
        daemon.log_text()
    );
}

#[test]
fn sigterm_detaches_and_cleans_up_and_restart_survives_leftovers() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = scratch("bash-lifecycle");
    let datakit = FakeDataKit::start();

    // Leftovers of a SIGKILLed run: a pid file naming a dead pid, and a probe event in tracefs.
    std::fs::write(dir.join("daemon.pid"), "999999\n").unwrap();
    let tracefs = std::path::Path::new("/sys/kernel/tracing");
    if !tracefs.join("uprobe_events").exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status();
    }
    let stale = "aya_999999_r_readline_0x0_0";
    std::fs::OpenOptions::new()
        .append(true)
        .open(tracefs.join("uprobe_events"))
        .and_then(|mut f| {
            std::io::Write::write_all(
                &mut f,
                format!("r:uprobes/{stale} /bin/bash:0x1000\n").as_bytes(),
            )
        })
        .expect("writing a stale uprobe event");

    let mut daemon = start_daemon(&dir, &datakit.addr().to_string(), &[]);
    assert_eq!(
        std::fs::read_to_string(&daemon.pidfile).unwrap().trim(),
        daemon.pid().to_string()
    );
    let events = std::fs::read_to_string(tracefs.join("uprobe_events")).unwrap();
    assert!(
        !events.contains(stale),
        "stale event not removed:\n{events}"
    );
    assert!(
        common::loaded_program_names()
            .iter()
            .any(|n| n == "bash_readline")
    );

    let mut bash = InteractiveBash::spawn(&dir, None);
    bash.type_line(b"echo before sigterm");
    // Sent at shutdown at the latest: SIGTERM flushes.
    let status = daemon.terminate();
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        daemon.log_text()
    );
    let pid = bash.pid();
    assert_eq!(
        cmds(&bash_points_of(&datakit.points(), pid)),
        ["echo before sigterm"]
    );
    assert!(!daemon.pidfile.exists(), "pid file not removed");
    assert!(
        !common::loaded_program_names()
            .iter()
            .any(|n| n == "bash_readline"),
        "programs still loaded after exit"
    );
}
