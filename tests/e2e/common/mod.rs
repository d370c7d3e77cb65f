//! Shared helpers of the end-to-end tests: privilege gate, the daemon under test, and an
//! interactive bash on a pseudo-terminal.
#![allow(dead_code)]

pub mod lifecycles;
pub mod netns;

use std::{
    fs,
    io::{Read as _, Write as _},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

/// The daemon binary built by cargo for this test run.
pub const DAEMON: &str = env!("CARGO_BIN_EXE_datakit-ebpf");

/// eBPF tests load programs into the one kernel; run them one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// True when the test may load eBPF programs. Under CI=true a missing privilege is a failure,
/// never a silent skip.
pub fn privileged() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("this test needs root to load eBPF programs, and CI=true forbids skipping it");
        }
        eprintln!("SKIPPED: needs root to load eBPF programs");
    }
    root
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dkebpf-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A self-signed certificate and its key (`cert.pem`, `key.pem` in `dir`), made with the
/// `openssl` CLI (Debian package openssl), for nginx's HTTPS listeners.
pub fn self_signed_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .arg("-subj")
        .arg(format!("/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A free TCP port on loopback (nothing listens on it when this returns).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// The daemon under test, started with an EMPTY environment as DataKit starts it.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    pub pidfile: PathBuf,
}

impl Daemon {
    /// Starts `datakit-ebpf <args> --log <dir>/daemon.log --pidfile <dir>/daemon.pid`.
    pub fn start(dir: &Path, args: &[&str]) -> Daemon {
        Self::start_with(dir, args, &[], Stdio::null())
    }

    /// Like `start`, with these environment variables (and nothing else) and this stdout.
    pub fn start_with(dir: &Path, args: &[&str], env: &[(&str, &str)], stdout: Stdio) -> Daemon {
        Self::start_wrapped(dir, &[], args, env, stdout)
    }

    /// Like `start_with`, through `wrapper` when not empty: a command given the daemon's path
    /// and arguments after its own, which must end by exec'ing them (so the child is the
    /// daemon), e.g. `unshare -m sh -c '…; exec "$0" "$@"'`.
    pub fn start_wrapped(
        dir: &Path,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        stdout: Stdio,
    ) -> Daemon {
        let log = dir.join("daemon.log");
        let pidfile = dir.join("daemon.pid");
        let stderr = fs::File::create(dir.join("daemon.stderr")).unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(DAEMON);
                command
            }
            None => Command::new(DAEMON),
        };
        let child = command
            .args(args)
            .arg("--log")
            .arg(&log)
            .arg("--pidfile")
            .arg(&pidfile)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn datakit-ebpf");
        Daemon {
            child: Some(child),
            log,
            pidfile,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the daemon to exit by itself (panics after `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let ok = wait_until(timeout, || self.exited().is_some());
        assert!(
            ok,
            "daemon still running after {timeout:?}:\n{}",
            self.log_text()
        );
        self.child.take().unwrap().wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `needle` in the daemon's log; panics with the log when it does not come.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let found = wait_until(timeout, || {
            self.log_text().contains(needle) || self.exited().is_some()
        });
        let log = self.log_text();
        assert!(
            found && log.contains(needle),
            "no {needle:?} in the daemon log:\n{log}"
        );
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().ok().flatten()
    }

    /// SIGTERM, then the exit status (panics if the daemon takes longer than 15 s).
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                panic!(
                    "daemon did not exit within 15 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The prompt our test shells print; counted to know when a line was processed.
const PROMPT: &str = "@@dkebpf@@ ";

/// An interactive bash on a pseudo-terminal, typed into like a person would.
pub struct InteractiveBash {
    child: Child,
    master: fs::File,
    output: Arc<Mutex<Vec<u8>>>,
    lines_typed: usize,
    _dir: PathBuf,
}

impl InteractiveBash {
    /// Starts `bash --noprofile --norc -i` as `uid` (None: as the test's own user).
    pub fn spawn(dir: &Path, uid: Option<u32>) -> InteractiveBash {
        // No completion on Tab (a Tab is then inserted as typed), raw 8-bit input, no bracketed
        // paste escapes in the output.
        let inputrc = dir.join("inputrc");
        fs::write(
            &inputrc,
            "set disable-completion on\nset enable-bracketed-paste off\nset input-meta on\nset output-meta on\nset convert-meta off\nset horizontal-scroll-mode on\n",
        )
        .unwrap();
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let slave: OwnedFd = pty.slave;
        let mut cmd = Command::new("/bin/bash");
        cmd.args(["--noprofile", "--norc", "-i"])
            .env_clear()
            .env("INPUTRC", &inputrc)
            .env("PS1", PROMPT)
            .env("TERM", "dumb")
            .env("HISTFILE", "/dev/null")
            .current_dir("/")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt as _;
            cmd.uid(uid).gid(uid);
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn bash");
        let master = fs::File::from(pty.master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = output.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let bash = InteractiveBash {
            child,
            master,
            output,
            lines_typed: 0,
            _dir: dir.to_path_buf(),
        };
        bash.wait_prompts(1);
        bash
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn prompts(&self) -> usize {
        let out = self.output.lock().unwrap();
        String::from_utf8_lossy(&out).matches(PROMPT).count()
    }

    fn wait_prompts(&self, n: usize) {
        let ok = wait_until(Duration::from_secs(30), || self.prompts() >= n);
        assert!(
            ok,
            "bash did not print prompt #{n}; output so far:\n{}",
            String::from_utf8_lossy(&self.output.lock().unwrap())
        );
    }

    /// Types `line` (raw bytes) and Enter, and waits until bash shows its next prompt.
    pub fn type_line(&mut self, line: &[u8]) {
        for chunk in line.chunks(256) {
            self.master.write_all(chunk).unwrap();
        }
        self.master.write_all(b"\r").unwrap();
        self.lines_typed += 1;
        self.wait_prompts(self.lines_typed + 1);
    }
}

impl Drop for InteractiveBash {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Names of the eBPF programs currently loaded in the kernel (`bpftool prog show`).
pub fn loaded_program_names() -> Vec<String> {
    let bpftool = ["/usr/sbin/bpftool", "/usr/bin/bpftool"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("bpftool");
    let out = Command::new(bpftool)
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool (Debian package bpftool) is needed for this test");
    assert!(out.status.success(), "bpftool failed: {out:?}");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    progs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .collect()
}
