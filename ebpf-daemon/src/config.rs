//! Daemon configuration: one [`Config`] built from the command line, the environment and an
//! optional `--config` file in DataKit's `[[inputs.ebpf]]` format (contract §3).
//!
//! # Precedence (highest first)
//! 1. command line (`run`/`check` flags);
//! 2. environment (`ENV_INPUT_EBPF_*`, `DKE_*`, `HOST_ROOT`, `HOST_PROC`);
//! 3. the `--config` file: its keys, then its `args` array (parsed like the command line), then
//!    its `envs` array (parsed like the environment);
//! 4. built-in defaults.
//!
//! A value set at a higher level replaces the lower one as a whole (lists are not concatenated),
//! except tags, which are merged by key with the higher level winning. `l7net_enabled` and
//! `l7net_disabled` are one setting: the highest level that sets either decides.
//!
//! Unlike the reference, `--config` does not wipe the command line (§3.5), multiple tags joined
//! with `;` are kept (§6.2.3), and `K8S_WORKLOAD_LABEL_PREFIX` is honoured (§6.2.4).
//!
//! Parsing is pure: the environment is passed in, and [`load`] only touches the system to read the
//! config file, ask for the host name and see whether DataKit's `externals` directory exists.

use std::{
    collections::HashMap,
    ffi::OsString,
    fmt,
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use crate::cli::{self, CliArgs, Invocation};

/// Where DataKit installs externals; its presence selects the reference's log and pid paths.
pub const DATAKIT_EXTERNALS_DIR: &str = "/usr/local/datakit/externals";
/// DataKit's default API address (`--datakit-apiserver`).
pub const DEFAULT_DATAKIT_ADDR: &str = "0.0.0.0:9529";
const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_BATCH_SIZE: usize = 256;
const MAX_BATCH_SIZE: usize = 10_000;
const DEFAULT_QUEUE_CAPACITY: usize = 100_000;
const MAX_QUEUE_CAPACITY: usize = 10_000_000;

/// A collector plugin (`--enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plugin {
    Net,
    Bash,
    Conntrack,
    Trace,
    Netlog,
}

impl Plugin {
    pub const ALL: [Plugin; 5] = [
        Plugin::Net,
        Plugin::Bash,
        Plugin::Conntrack,
        Plugin::Trace,
        Plugin::Netlog,
    ];

    /// The name used by DataKit and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Plugin::Net => "ebpf-net",
            Plugin::Bash => "ebpf-bash",
            Plugin::Conntrack => "ebpf-conntrack",
            Plugin::Trace => "ebpf-trace",
            Plugin::Netlog => "bpf-netlog",
        }
    }

    /// Whether this daemon has an implementation (the others are accepted with a warning).
    pub fn is_implemented(&self) -> bool {
        matches!(self, Plugin::Net | Plugin::Bash)
    }
}

impl FromStr for Plugin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Plugin::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown plugin `{s}`; valid plugins are: {}",
                    names(Plugin::ALL.iter().map(Plugin::name))
                )
            })
    }
}

impl fmt::Display for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An application protocol of `ebpf-net` (`--l7net-enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L7Protocol {
    HttpFlow,
    HttpFlowTls,
}

impl L7Protocol {
    pub const ALL: [L7Protocol; 2] = [L7Protocol::HttpFlow, L7Protocol::HttpFlowTls];

    pub fn name(&self) -> &'static str {
        match self {
            L7Protocol::HttpFlow => "httpflow",
            L7Protocol::HttpFlowTls => "httpflow-tls",
        }
    }
}

impl FromStr for L7Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        L7Protocol::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown application protocol `{s}`; valid ones are: {}",
                    names(L7Protocol::ALL.iter().map(L7Protocol::name))
                )
            })
    }
}

impl fmt::Display for L7Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where points are delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// DataKit's HTTP API, e.g. `http://0.0.0.0:9529` (no trailing `/`).
    DataKit { base_url: String },
    /// Line protocol on stdout (debugging, tests).
    Stdout,
}

/// Kubernetes API access for the workload tags (contract §1.9, §3.3). `None` means the client's
/// defaults (`https://kubernetes.default:443`, the service-account token file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sConfig {
    pub url: Option<String>,
    pub bearer_token: Option<String>,
    pub bearer_token_path: Option<PathBuf>,
    pub workload_labels: Vec<String>,
    pub workload_label_prefix: Option<String>,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub output: Output,
    /// DataKit base URL, also used for `/v1/lasterror` when `output` is stdout.
    pub datakit_base_url: String,
    pub hostname: String,
    pub service: String,
    /// Extra tags in order; `host` is never here (it became `hostname`).
    pub tags: Vec<(String, String)>,
    pub interval: Duration,
    pub min_interval: Duration,
    pub enabled: Vec<Plugin>,
    pub l7net: Vec<L7Protocol>,
    pub ipv6_disabled: bool,
    pub ephemeral_port: Option<u16>,
    /// `None`: stderr.
    pub log: Option<PathBuf>,
    /// One of trace, debug, info, warn, error.
    pub log_level: String,
    pub pidfile: Option<PathBuf>,
    pub batch_size: usize,
    pub queue_capacity: usize,
    pub gzip: bool,
    pub bash_paths: Vec<PathBuf>,
    pub host_root: PathBuf,
    pub host_proc: PathBuf,
    pub btf: Option<PathBuf>,
    /// netflow attach tier (`--netflow-tier`); `Auto` picks the best the kernel offers.
    pub netflow_tier: NetflowTier,
    /// How netflow's closed connections reach the daemon (`--netflow-closed-events`).
    pub netflow_closed_events: ClosedEvents,
    /// Size of netflow's kernel connection map.
    pub netflow_max_conns: u32,
    /// Report loopback connections in netflow.
    pub netflow_include_loopback: bool,
    /// netflow sends TCP rows only (the reference's schema); unconnected UDP is not tracked.
    pub netflow_udp_disabled: bool,
    /// ebpf-net runs without dnsflow (`--dnsflow-disabled`).
    pub dnsflow_disabled: bool,
    /// httpflow: replace numeric and UUID-like path segments with `:id`.
    pub httpflow_path_normalize: bool,
    /// httpflow capture tier (`--httpflow-tier`); `Auto` is fentry where trampolines work.
    pub httpflow_tier: HttpflowTier,
    /// Unconnected UDP asked for explicitly (`--netflow-udp-unconnected`): it is counted by
    /// default through cgroup programs; this also allows the fallback to syscall tracepoints (a
    /// cost on every send and receive call of every socket) where those cannot attach.
    pub netflow_udp_unconnected: bool,
    /// Unconnected UDP sockets are not counted (`--netflow-udp-unconnected-disabled`; wins over
    /// `--netflow-udp-unconnected`).
    pub netflow_udp_unconnected_disabled: bool,
    /// How unconnected UDP peers are learnt (`DKE_NETFLOW_UDP_PEERS`, for tests and diagnosis).
    pub netflow_udp_peers: UdpPeers,
    /// dnsflow: a query unanswered this long is reported with `rcode = -1`.
    pub dnsflow_timeout: Duration,
    /// dnsflow's reporting interval (the reference's is a fixed 30 s, whatever `interval`).
    pub dnsflow_interval: Duration,
    /// Accepted, not served.
    pub pprof_host: Option<String>,
    pub pprof_port: Option<String>,
    pub k8s: K8sConfig,
    /// Things worth a warning once logging is up (legacy flags, floors applied, ignored options).
    pub warnings: Vec<String>,
}

/// Where a configuration error was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorOrigin {
    File {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    /// The file could not be read at all.
    FileUnreadable(PathBuf),
    CommandLine,
    /// The environment variable's name.
    Env(String),
}

/// A configuration error naming its source, e.g. ``ebpf.conf:7:1: key `intervall`: unknown key…``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: ErrorOrigin,
    /// The config key or `--flag` concerned, if any.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            ErrorOrigin::File { path, line, column } => {
                write!(f, "{}:{line}:{column}: ", path.display())?
            }
            ErrorOrigin::FileUnreadable(path) => write!(f, "{}: ", path.display())?,
            ErrorOrigin::CommandLine => f.write_str("command line: ")?,
            ErrorOrigin::Env(name) => write!(f, "environment variable {name}: ")?,
        }
        match (&self.origin, &self.key) {
            (ErrorOrigin::File { .. }, Some(key)) => write!(f, "key `{key}`: ")?,
            (ErrorOrigin::CommandLine, Some(key)) => write!(f, "`{key}`: ")?,
            _ => {}
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Parses argv (program name first). The error is clap's, for `--help`/`--version` output and
/// usage errors; call `.exit()` on it (exit 0 for displays, 2 for errors).
pub fn parse_cli(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, clap::Error> {
    cli::parse(args)
}

/// Builds the configuration: reads `--config` if given, merges all sources, validates.
pub fn load(inv: &Invocation, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let system = System {
        hostname: system_hostname(),
        datakit_install: Path::new(DATAKIT_EXTERNALS_DIR).is_dir(),
    };
    load_with(inv, env, &system)
}

/// What [`load`] asks the system; injected so tests are hermetic.
struct System {
    hostname: Option<String>,
    datakit_install: bool,
}

fn system_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0)?;
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
}

fn load_with(
    inv: &Invocation,
    env: &HashMap<String, String>,
    system: &System,
) -> Result<Config, ConfigError> {
    let mut warnings = inv.warnings.clone();
    let mut merged = Layer::default();
    if let Some(path) = &inv.cli.config {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: ErrorOrigin::FileUnreadable(path.clone()),
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        let file = parse_file(path, &text, &mut warnings)?;
        merged = merged.under(file.envs).under(file.args).under(file.keys);
    }
    let env_layer =
        layer_from_env(env, "environment", &mut warnings).map_err(|(var, message)| {
            ConfigError {
                origin: ErrorOrigin::Env(var),
                key: None,
                message,
            }
        })?;
    let cli_layer =
        layer_from_cli(&inv.cli, "command line", &mut warnings).map_err(|(flag, message)| {
            ConfigError {
                origin: ErrorOrigin::CommandLine,
                key: Some(flag),
                message,
            }
        })?;
    merged = merged.under(env_layer).under(cli_layer);
    Ok(resolve(merged, system, warnings))
}

/// One source's settings; `None` means "not set here".
#[derive(Debug, Default)]
struct Layer {
    output: Option<Output>,
    datakit_apiserver: Option<String>,
    hostname: Option<String>,
    service: Option<String>,
    tags: Vec<(String, String)>,
    interval: Option<Duration>,
    min_interval: Option<Duration>,
    enabled: Option<Vec<Plugin>>,
    l7net: Option<Vec<L7Protocol>>,
    ipv6_disabled: Option<bool>,
    ephemeral_port: Option<u16>,
    /// `Some(None)`: explicitly stderr.
    log: Option<Option<PathBuf>>,
    log_level: Option<String>,
    /// `Some(None)`: explicitly no pid file.
    pidfile: Option<Option<PathBuf>>,
    batch_size: Option<usize>,
    queue_capacity: Option<usize>,
    gzip: Option<bool>,
    bash_paths: Option<Vec<PathBuf>>,
    btf: Option<PathBuf>,
    netflow_tier: Option<NetflowTier>,
    netflow_closed_events: Option<ClosedEvents>,
    netflow_max_conns: Option<usize>,
    netflow_include_loopback: Option<bool>,
    netflow_udp_disabled: Option<bool>,
    dnsflow_disabled: Option<bool>,
    netflow_udp_unconnected: Option<bool>,
    netflow_udp_unconnected_disabled: Option<bool>,
    netflow_udp_peers: Option<UdpPeers>,
    dnsflow_timeout: Option<Duration>,
    dnsflow_interval: Option<Duration>,
    httpflow_path_normalize: Option<bool>,
    httpflow_tier: Option<HttpflowTier>,
    pprof_host: Option<String>,
    pprof_port: Option<String>,
    host_root: Option<PathBuf>,
    host_proc: Option<PathBuf>,
    k8s_url: Option<String>,
    k8s_bearer_token: Option<String>,
    k8s_bearer_token_path: Option<PathBuf>,
    k8s_workload_labels: Option<Vec<String>>,
    k8s_workload_label_prefix: Option<String>,
}

impl Layer {
    /// `self` overridden by `higher`.
    fn under(self, higher: Layer) -> Layer {
        let mut tags = self.tags;
        merge_tags(&mut tags, higher.tags);
        Layer {
            output: higher.output.or(self.output),
            datakit_apiserver: higher.datakit_apiserver.or(self.datakit_apiserver),
            hostname: higher.hostname.or(self.hostname),
            service: higher.service.or(self.service),
            tags,
            interval: higher.interval.or(self.interval),
            min_interval: higher.min_interval.or(self.min_interval),
            enabled: higher.enabled.or(self.enabled),
            l7net: higher.l7net.or(self.l7net),
            ipv6_disabled: higher.ipv6_disabled.or(self.ipv6_disabled),
            ephemeral_port: higher.ephemeral_port.or(self.ephemeral_port),
            log: higher.log.or(self.log),
            log_level: higher.log_level.or(self.log_level),
            pidfile: higher.pidfile.or(self.pidfile),
            batch_size: higher.batch_size.or(self.batch_size),
            queue_capacity: higher.queue_capacity.or(self.queue_capacity),
            gzip: higher.gzip.or(self.gzip),
            bash_paths: higher.bash_paths.or(self.bash_paths),
            btf: higher.btf.or(self.btf),
            netflow_tier: higher.netflow_tier.or(self.netflow_tier),
            netflow_closed_events: higher.netflow_closed_events.or(self.netflow_closed_events),
            netflow_max_conns: higher.netflow_max_conns.or(self.netflow_max_conns),
            netflow_include_loopback: higher
                .netflow_include_loopback
                .or(self.netflow_include_loopback),
            netflow_udp_disabled: higher.netflow_udp_disabled.or(self.netflow_udp_disabled),
            dnsflow_disabled: higher.dnsflow_disabled.or(self.dnsflow_disabled),
            httpflow_path_normalize: higher
                .httpflow_path_normalize
                .or(self.httpflow_path_normalize),
            httpflow_tier: higher.httpflow_tier.or(self.httpflow_tier),
            netflow_udp_unconnected: higher
                .netflow_udp_unconnected
                .or(self.netflow_udp_unconnected),
            netflow_udp_unconnected_disabled: higher
                .netflow_udp_unconnected_disabled
                .or(self.netflow_udp_unconnected_disabled),
            netflow_udp_peers: higher.netflow_udp_peers.or(self.netflow_udp_peers),
            dnsflow_timeout: higher.dnsflow_timeout.or(self.dnsflow_timeout),
            dnsflow_interval: higher.dnsflow_interval.or(self.dnsflow_interval),
            pprof_host: higher.pprof_host.or(self.pprof_host),
            pprof_port: higher.pprof_port.or(self.pprof_port),
            host_root: higher.host_root.or(self.host_root),
            host_proc: higher.host_proc.or(self.host_proc),
            k8s_url: higher.k8s_url.or(self.k8s_url),
            k8s_bearer_token: higher.k8s_bearer_token.or(self.k8s_bearer_token),
            k8s_bearer_token_path: higher.k8s_bearer_token_path.or(self.k8s_bearer_token_path),
            k8s_workload_labels: higher.k8s_workload_labels.or(self.k8s_workload_labels),
            k8s_workload_label_prefix: higher
                .k8s_workload_label_prefix
                .or(self.k8s_workload_label_prefix),
        }
    }
}

/// Later entries replace the value of an earlier entry with the same key, keeping its position.
fn merge_tags(into: &mut Vec<(String, String)>, more: Vec<(String, String)>) {
    for (k, v) in more {
        match into.iter_mut().find(|(existing, _)| *existing == k) {
            Some(slot) => slot.1 = v,
            None => into.push((k, v)),
        }
    }
}

fn resolve(m: Layer, system: &System, mut warnings: Vec<String>) -> Config {
    let datakit_base_url = m
        .datakit_apiserver
        .or_else(|| match &m.output {
            Some(Output::DataKit { base_url }) => Some(base_url.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("http://{DEFAULT_DATAKIT_ADDR}"));
    let output = m.output.unwrap_or_else(|| Output::DataKit {
        base_url: datakit_base_url.clone(),
    });

    // `host` is the host name, not an extra tag (contract §1.2): --hostname beats a host= tag.
    let mut tags = m.tags;
    let host_tag = tags
        .iter()
        .position(|(k, _)| k == "host")
        .map(|i| tags.remove(i).1);
    let hostname = match (m.hostname, host_tag) {
        (Some(h), Some(t)) => {
            if h != t {
                warnings.push(format!(
                    "tag host={t} ignored: the host name `{h}` takes precedence"
                ));
            }
            h
        }
        (Some(h), None) => h,
        (None, Some(t)) if !t.is_empty() => t,
        _ => system
            .hostname
            .clone()
            .unwrap_or_else(|| "no-value".to_string()),
    };

    let min_interval = m.min_interval.unwrap_or(DEFAULT_INTERVAL);
    let mut interval = m.interval.unwrap_or(DEFAULT_INTERVAL);
    if interval < min_interval {
        warnings.push(format!(
            "interval {} is below the minimum {}; using {}",
            fmt_duration(interval),
            fmt_duration(min_interval),
            fmt_duration(min_interval)
        ));
        interval = min_interval;
    }
    let mut dnsflow_interval = m.dnsflow_interval.unwrap_or(DEFAULT_DNSFLOW_INTERVAL);
    if dnsflow_interval < min_interval.min(DEFAULT_DNSFLOW_INTERVAL) {
        let floor = min_interval.min(DEFAULT_DNSFLOW_INTERVAL);
        warnings.push(format!(
            "dnsflow_interval {} is below the minimum {}; using {}",
            fmt_duration(dnsflow_interval),
            fmt_duration(floor),
            fmt_duration(floor)
        ));
        dnsflow_interval = floor;
    }

    let enabled = m.enabled.unwrap_or_else(|| vec![Plugin::Net]);
    let missing: Vec<&str> = enabled
        .iter()
        .filter(|p| !p.is_implemented())
        .map(Plugin::name)
        .collect();
    if !missing.is_empty() {
        warnings.push(format!(
            "plugins not implemented by this daemon, ignored: {}",
            missing.join(", ")
        ));
    }

    let externals = Path::new(DATAKIT_EXTERNALS_DIR);
    let log = m.log.unwrap_or_else(|| {
        system
            .datakit_install
            .then(|| externals.join("datakit-ebpf.log"))
    });
    let pidfile = m.pidfile.unwrap_or_else(|| {
        system
            .datakit_install
            .then(|| externals.join("datakit-ebpf.pid"))
    });

    Config {
        output,
        datakit_base_url,
        hostname,
        service: m.service.unwrap_or_else(|| "ebpf".to_string()),
        tags,
        interval,
        min_interval,
        enabled,
        l7net: m.l7net.unwrap_or_else(|| vec![L7Protocol::HttpFlow]),
        ipv6_disabled: m.ipv6_disabled.unwrap_or(false),
        ephemeral_port: m.ephemeral_port,
        log,
        log_level: m.log_level.unwrap_or_else(|| "info".to_string()),
        pidfile,
        batch_size: m.batch_size.unwrap_or(DEFAULT_BATCH_SIZE),
        queue_capacity: m.queue_capacity.unwrap_or(DEFAULT_QUEUE_CAPACITY),
        gzip: m.gzip.unwrap_or(true),
        bash_paths: m
            .bash_paths
            .unwrap_or_else(|| vec![PathBuf::from("/bin/bash")]),
        host_root: m.host_root.unwrap_or_else(|| PathBuf::from("/")),
        host_proc: m.host_proc.unwrap_or_else(|| PathBuf::from("/proc")),
        btf: m.btf,
        netflow_tier: m.netflow_tier.unwrap_or(NetflowTier::Auto),
        netflow_closed_events: m.netflow_closed_events.unwrap_or(ClosedEvents::Auto),
        netflow_max_conns: m
            .netflow_max_conns
            .map_or(ebpf_common::netflow::DEFAULT_MAX_CONNS, |n| n as u32),
        netflow_include_loopback: m.netflow_include_loopback.unwrap_or(false),
        netflow_udp_disabled: m.netflow_udp_disabled.unwrap_or(false),
        dnsflow_disabled: m.dnsflow_disabled.unwrap_or(false),
        httpflow_path_normalize: m.httpflow_path_normalize.unwrap_or(false),
        httpflow_tier: m.httpflow_tier.unwrap_or(HttpflowTier::Auto),
        netflow_udp_unconnected: m.netflow_udp_unconnected.unwrap_or(false),
        netflow_udp_unconnected_disabled: m.netflow_udp_unconnected_disabled.unwrap_or(false),
        netflow_udp_peers: m.netflow_udp_peers.unwrap_or(UdpPeers::Auto),
        dnsflow_timeout: m.dnsflow_timeout.unwrap_or(DEFAULT_DNSFLOW_TIMEOUT),
        dnsflow_interval,
        pprof_host: m.pprof_host,
        pprof_port: m.pprof_port,
        k8s: K8sConfig {
            url: m.k8s_url,
            bearer_token: m.k8s_bearer_token,
            bearer_token_path: m.k8s_bearer_token_path,
            workload_labels: m.k8s_workload_labels.unwrap_or_default(),
            workload_label_prefix: m.k8s_workload_label_prefix,
        },
        warnings,
    }
}

// ---------------------------------------------------------------------------------------------
// Value parsers shared by all sources. They return only a message; the caller adds the origin.

/// Go's `time.ParseDuration` syntax (`300ms`, `1.5h`, `1m30s`; units ns, us/µs, ms, s, m, h),
/// computed exactly. Negative durations are rejected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = |why: &str| format!("invalid duration `{text}`: {why}");
    let mut s = text.trim();
    s = s.strip_prefix('+').unwrap_or(s);
    if s.starts_with('-') {
        return Err(invalid("must not be negative"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(invalid("empty; expected e.g. `60s` or `1m30s`"));
    }
    let digits_end = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let mut total: u128 = 0;
    while !s.is_empty() {
        let (int_part, rest) = s.split_at(digits_end(s));
        let (frac_part, rest) = match rest.strip_prefix('.') {
            Some(r) => r.split_at(digits_end(r)),
            None => ("", rest),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid(
                "expected a number followed by a unit (ns, us, ms, s, m, h), e.g. `60s` or `1m30s`",
            ));
        }
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let (unit, rest) = rest.split_at(unit_end);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(invalid("missing unit (ns, us, ms, s, m, h)")),
            other => {
                return Err(invalid(&format!(
                    "unknown unit `{other}` (valid: ns, us, ms, s, m, h)"
                )));
            }
        };
        let too_large = || invalid("too large");
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| too_large())?
        };
        let mut part = int.checked_mul(scale).ok_or_else(too_large)?;
        // Digits beyond 18 are below a nanosecond for every unit; dropping them keeps this exact.
        let frac = &frac_part[..frac_part.len().min(18)];
        if !frac.is_empty() {
            let f: u128 = frac.parse().map_err(|_| too_large())?;
            part += f * scale / 10u128.pow(frac.len() as u32);
        }
        total = total.checked_add(part).ok_or_else(too_large)?;
        s = rest;
    }
    // Go durations are i64 nanoseconds.
    if total > i64::MAX as u128 {
        return Err(invalid("too large"));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Go-like rendering for messages: `1m30s`, `500ms`.
fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() != 0 || d.is_zero() {
        return format!("{d:?}");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if m > 0 {
        out += &format!("{m}m");
    }
    if s > 0 {
        out += &format!("{s}s");
    }
    out
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

/// Comma-separated items (each list flag may also be repeated); blanks dropped.
fn split_list<S: AsRef<str>>(items: &[S]) -> Vec<String> {
    items
        .iter()
        .flat_map(|i| i.as_ref().split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses and de-duplicates (first occurrence kept).
fn parse_names<T: FromStr<Err = String> + PartialEq>(items: &[String]) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    for item in items {
        let v: T = item.parse()?;
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

/// `None` for an empty list: the reference's DataKit side treats "no plugins" as the default.
fn parse_plugins(items: &[String]) -> Result<Option<Vec<Plugin>>, String> {
    let v = parse_names(&split_list(items))?;
    Ok((!v.is_empty()).then_some(v))
}

/// Unknown protocols only warn on the command line and in the environment, as in the reference:
/// DataKit passes them through verbatim and would not restart a daemon that refused them.
fn parse_l7_lenient(items: &[String], warnings: &mut Vec<String>, origin: &str) -> Vec<L7Protocol> {
    let mut out = Vec::new();
    for item in split_list(items) {
        match item.parse::<L7Protocol>() {
            Ok(p) if !out.contains(&p) => out.push(p),
            Ok(_) => {}
            Err(e) => warnings.push(format!("{origin}: {e}; ignored")),
        }
    }
    out
}

/// `enabled` wins over `disabled` (contract §3.1); `disabled` means "all others". A list that is
/// set but empty enables nothing, as DataKit does; `None` when neither is set.
fn resolve_l7(
    enabled: Option<Vec<L7Protocol>>,
    disabled: Option<Vec<L7Protocol>>,
) -> Option<Vec<L7Protocol>> {
    match (enabled, disabled) {
        (Some(e), _) if !e.is_empty() => Some(e),
        (_, Some(d)) if !d.is_empty() => Some(
            L7Protocol::ALL
                .into_iter()
                .filter(|p| !d.contains(p))
                .collect(),
        ),
        (None, None) => None,
        _ => Some(Vec::new()),
    }
}

/// `k=v` items separated by `;` (how DataKit joins its `[inputs.ebpf.tags]` table), or by `,`
/// in an item without `;` when every piece is `k=v` (else the item is one tag whose value has a
/// comma: DataKit passes `note=a,b` as it is). The value may contain `=`; blank items are
/// ignored; later duplicates replace earlier ones. An item that is not `k=v` is skipped with a
/// warning naming `origin`, never fatal: DataKit does not restart an external that exited on a
/// flag.
pub fn parse_tags<S: AsRef<str>>(
    items: &[S],
    warnings: &mut Vec<String>,
    origin: &str,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for item in items {
        let item = item.as_ref();
        let pieces: Vec<&str> = if item.contains(';') {
            item.split(';').collect()
        } else {
            let commas: Vec<&str> = item.split(',').collect();
            let all_tags = commas
                .iter()
                .all(|p| p.trim().is_empty() || p.contains('='));
            if all_tags { commas } else { vec![item] }
        };
        for piece in pieces {
            let piece = piece.trim();
            if piece.is_empty() {
                continue;
            }
            match piece.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    merge_tags(&mut out, vec![(k.trim().to_string(), v.trim().to_string())]);
                }
                Some(_) => {
                    warnings.push(format!("{origin}: tag `{piece}` has an empty key; skipped"))
                }
                None => warnings.push(format!(
                    "{origin}: tag `{piece}` is not `key=value`; skipped"
                )),
            }
        }
    }
    out
}

/// How netflow attaches to the kernel (`--netflow-tier`, `DKE_NETFLOW_TIER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetflowTier {
    /// The best tier the running kernel supports.
    Auto,
    /// fentry/fexit (BPF trampolines).
    Fentry,
    /// kprobes/kretprobes.
    Kprobe,
    /// BTF-typed tracepoints (`tp_btf`).
    Tracepoint,
    /// Classic (perf) tracepoints: the same events as `Tracepoint`, run with preemption off.
    ClassicTracepoint,
}

impl NetflowTier {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::Tracepoint => "tracepoint",
            Self::ClassicTracepoint => "classic-tracepoint",
        }
    }
}

fn parse_netflow_tier(s: &str) -> Result<NetflowTier, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" | "" => Ok(NetflowTier::Auto),
        "fentry" => Ok(NetflowTier::Fentry),
        "kprobe" => Ok(NetflowTier::Kprobe),
        "tracepoint" => Ok(NetflowTier::Tracepoint),
        "classic-tracepoint" => Ok(NetflowTier::ClassicTracepoint),
        other => Err(format!(
            "unknown netflow tier `{other}`; valid tiers are: auto, fentry, kprobe, tracepoint, classic-tracepoint"
        )),
    }
}

/// How netflow learns the peers of unconnected UDP sockets (`DKE_NETFLOW_UDP_PEERS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpPeers {
    /// cgroup programs; where they cannot attach, syscall tracepoints if unconnected UDP was
    /// asked for explicitly (`--netflow-udp-unconnected`), else none.
    Auto,
    /// Only cgroup `sendmsg4/6` and `recvmsg4/6` programs on the cgroup v2 root.
    Cgroup,
    /// Only the syscall tracepoints (`sendto`, `sendmsg`, `recvfrom`, `recvmsg`).
    Syscalls,
}

fn parse_udp_peers(s: &str) -> Result<UdpPeers, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" | "" => Ok(UdpPeers::Auto),
        "cgroup" => Ok(UdpPeers::Cgroup),
        "syscalls" => Ok(UdpPeers::Syscalls),
        other => Err(format!(
            "unknown UDP peer mechanism `{other}`; valid ones are: auto, cgroup, syscalls"
        )),
    }
}

/// How netflow hands closed connections to the daemon (`--netflow-closed-events`,
/// `DKE_NETFLOW_CLOSED_EVENTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedEvents {
    /// The ring buffer where the kernel has one (5.8+), else the perf event array.
    Auto,
    /// The BPF ring buffer: one buffer shared by all CPUs, in order.
    RingBuffer,
    /// A perf event array: one buffer per CPU (kernels before 5.8).
    PerfEventArray,
}

impl ClosedEvents {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::RingBuffer => "ring-buffer",
            Self::PerfEventArray => "perf-event-array",
        }
    }
}

fn parse_closed_events(s: &str) -> Result<ClosedEvents, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" | "" => Ok(ClosedEvents::Auto),
        "ring-buffer" => Ok(ClosedEvents::RingBuffer),
        "perf-event-array" => Ok(ClosedEvents::PerfEventArray),
        other => Err(format!(
            "unknown closed-events mechanism `{other}`; valid ones are: auto, ring-buffer, perf-event-array"
        )),
    }
}

/// How httpflow captures calls (`--httpflow-tier`, `DKE_HTTPFLOW_TIER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpflowTier {
    /// The default tier: fentry where BPF trampolines work, else syscalls (README "httpflow").
    Auto,
    /// Syscall tracepoints (read/write/send/recv families).
    Syscalls,
    /// fentry/fexit on the INET socket layer (inet_sendmsg/inet_recvmsg).
    Fentry,
}

impl HttpflowTier {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Syscalls => "syscalls",
            Self::Fentry => "fentry",
        }
    }
}

fn parse_httpflow_tier(s: &str) -> Result<HttpflowTier, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" | "" => Ok(HttpflowTier::Auto),
        "syscalls" => Ok(HttpflowTier::Syscalls),
        "fentry" => Ok(HttpflowTier::Fentry),
        other => Err(format!(
            "unknown httpflow tier `{other}`; valid tiers are: auto, syscalls, fentry"
        )),
    }
}

/// Upper bound of `--netflow-max-conns` (about 1 GB of kernel memory).
const MAX_NETFLOW_CONNS: usize = 4_000_000;

/// `host:port` or URL to a base URL: `http://` added when there is no scheme, no trailing `/`.
fn base_url(addr: &str) -> Result<String, String> {
    let addr = addr.trim().trim_end_matches('/');
    if addr.is_empty() {
        return Err("empty address".to_string());
    }
    match addr.split_once("://") {
        Some((scheme, rest)) => {
            let scheme = scheme.to_ascii_lowercase();
            // DataKit's API is plain HTTP on the node; the client is built without TLS.
            if scheme != "http" {
                return Err(format!(
                    "unsupported scheme `{scheme}` in `{addr}` (DataKit's API is plain http)"
                ));
            }
            if rest.is_empty() {
                return Err(format!("no host in `{addr}`"));
            }
            Ok(format!("{scheme}://{rest}"))
        }
        None => Ok(format!("http://{addr}")),
    }
}

fn parse_output(s: &str) -> Result<Output, String> {
    match s.trim() {
        "-" | "stdout" => Ok(Output::Stdout),
        addr => Ok(Output::DataKit {
            base_url: base_url(addr)?,
        }),
    }
}

fn parse_log_level(s: &str) -> Result<String, String> {
    let l = s.trim().to_ascii_lowercase();
    match l.as_str() {
        "trace" | "debug" | "info" | "warn" | "error" => Ok(l),
        "warning" => Ok("warn".to_string()),
        _ => Err(format!(
            "invalid log level `{s}`; valid levels are: trace, debug, info, warn, error"
        )),
    }
}

/// `""`, `-` and `stderr` mean stderr.
fn log_path(s: &str) -> Option<PathBuf> {
    match s.trim() {
        "" | "-" | "stderr" => None,
        p => Some(PathBuf::from(p)),
    }
}

/// `""` means no pid file.
fn pidfile_path(s: &str) -> Option<PathBuf> {
    let s = s.trim();
    (!s.is_empty()).then(|| PathBuf::from(s))
}

fn parse_int(s: &str) -> Result<i64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not an integer"))
}

fn check_range(n: i64, min: usize, max: usize) -> Result<usize, String> {
    usize::try_from(n)
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| format!("must be between {min} and {max}, found {n}"))
}

/// Negative means "not set" (DataKit's `ephemeral_port = -1`).
fn check_port(n: i64) -> Result<Option<u16>, String> {
    if n < 0 {
        return Ok(None);
    }
    u16::try_from(n)
        .map(Some)
        .map_err(|_| format!("must be between 0 and 65535, found {n}"))
}

/// The reference's `DNSTIMEOUT`.
const DEFAULT_DNSFLOW_TIMEOUT: Duration = Duration::from_secs(6);
/// The reference's fixed dnsflow flush period.
const DEFAULT_DNSFLOW_INTERVAL: Duration = Duration::from_secs(30);

/// Between 100 ms and 10 minutes: a query is held in memory until answered or timed out.
fn check_dnsflow_timeout(d: Duration) -> Result<Duration, String> {
    if d < Duration::from_millis(100) || d > Duration::from_secs(600) {
        return Err(format!(
            "must be between 100ms and 10m, found {}",
            fmt_duration(d)
        ));
    }
    Ok(d)
}

fn check_min_interval(d: Duration) -> Result<Duration, String> {
    if d < Duration::from_secs(1) {
        return Err(format!("must be at least 1s, found {}", fmt_duration(d)));
    }
    Ok(d)
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

// ---------------------------------------------------------------------------------------------
// Command line

/// Converts raw flags; the error is (flag, message).
fn layer_from_cli(
    a: &CliArgs,
    origin: &str,
    warnings: &mut Vec<String>,
) -> Result<Layer, (String, String)> {
    let at = |flag: &'static str| move |m: String| (flag.to_string(), m);
    let mut l = Layer::default();
    if let Some(s) = &a.output {
        l.output = non_empty(s)
            .map(|s| parse_output(&s))
            .transpose()
            .map_err(at("--output"))?;
    }
    if let Some(s) = &a.datakit_apiserver {
        l.datakit_apiserver = non_empty(s)
            .map(|s| base_url(&s))
            .transpose()
            .map_err(at("--datakit-apiserver"))?;
    }
    // DataKit passes `--hostname ""` when it has no host name: fall through to the next source.
    l.hostname = a.hostname.as_deref().and_then(non_empty);
    l.service = a.service.as_deref().and_then(non_empty);
    l.tags = parse_tags(&a.tags, warnings, &format!("{origin}: `--tags`"));
    if let Some(s) = &a.interval {
        l.interval = Some(parse_duration(s).map_err(at("--interval"))?);
    }
    if let Some(s) = &a.min_interval {
        l.min_interval = Some(
            parse_duration(s)
                .and_then(check_min_interval)
                .map_err(at("--min-interval"))?,
        );
    }
    l.enabled = parse_plugins(&a.enabled).map_err(at("--enabled"))?;
    let some = |v: &Vec<String>, w: &mut Vec<String>, flag: &str| {
        (!v.is_empty()).then(|| parse_l7_lenient(v, w, &format!("{origin}: {flag}")))
    };
    let l7e = some(&a.l7net_enabled, warnings, "--l7net-enabled");
    let l7d = some(&a.l7net_disabled, warnings, "--l7net-disabled");
    l.l7net = resolve_l7(l7e, l7d);
    l.ipv6_disabled = a.ipv6_disabled;
    if let Some(s) = &a.ephemeral_port {
        l.ephemeral_port = parse_int(s)
            .and_then(check_port)
            .map_err(at("--ephemeral-port"))?;
    }
    l.log = a.log.as_deref().map(log_path);
    if let Some(s) = &a.log_level {
        l.log_level = Some(parse_log_level(s).map_err(at("--log-level"))?);
    }
    l.pidfile = a.pidfile.as_deref().map(pidfile_path);
    if let Some(s) = &a.batch_size {
        l.batch_size = Some(
            parse_int(s)
                .and_then(|n| check_range(n, 1, MAX_BATCH_SIZE))
                .map_err(at("--batch-size"))?,
        );
    }
    if let Some(s) = &a.queue_capacity {
        l.queue_capacity = Some(
            parse_int(s)
                .and_then(|n| check_range(n, 1, MAX_QUEUE_CAPACITY))
                .map_err(at("--queue-capacity"))?,
        );
    }
    l.gzip = a.no_gzip.map(|no| !no);
    if let Some(s) = &a.netflow_tier {
        l.netflow_tier = Some(parse_netflow_tier(s).map_err(at("--netflow-tier"))?);
    }
    if let Some(s) = &a.netflow_closed_events {
        l.netflow_closed_events =
            Some(parse_closed_events(s).map_err(at("--netflow-closed-events"))?);
    }
    if let Some(s) = &a.netflow_max_conns {
        l.netflow_max_conns = Some(
            parse_int(s)
                .and_then(|n| check_range(n, 16, MAX_NETFLOW_CONNS))
                .map_err(at("--netflow-max-conns"))?,
        );
    }
    l.netflow_include_loopback = a.netflow_include_loopback;
    l.netflow_udp_disabled = a.netflow_udp_disabled;
    l.dnsflow_disabled = a.dnsflow_disabled;
    l.httpflow_path_normalize = a.httpflow_path_normalize;
    if let Some(s) = &a.httpflow_tier {
        l.httpflow_tier = Some(parse_httpflow_tier(s).map_err(at("--httpflow-tier"))?);
    }
    l.netflow_udp_unconnected = a.netflow_udp_unconnected;
    l.netflow_udp_unconnected_disabled = a.netflow_udp_unconnected_disabled;
    if let Some(s) = &a.dnsflow_timeout {
        l.dnsflow_timeout = Some(
            parse_duration(s)
                .and_then(check_dnsflow_timeout)
                .map_err(at("--dnsflow-timeout"))?,
        );
    }
    if let Some(s) = &a.dnsflow_interval {
        l.dnsflow_interval = Some(parse_duration(s).map_err(at("--dnsflow-interval"))?);
    }
    if !a.bash_path.is_empty() {
        l.bash_paths = Some(a.bash_path.clone());
    }
    l.btf = a.btf.clone();
    l.pprof_host = a.pprof_host.clone();
    l.pprof_port = a.pprof_port.as_deref().and_then(non_empty);
    let ignored = a.unimplemented_flags();
    if !ignored.is_empty() {
        warnings.push(format!(
            "{origin}: accepted but not implemented by this daemon, ignored: {}",
            ignored.join(", ")
        ));
    }
    Ok(l)
}

// ---------------------------------------------------------------------------------------------
// Environment

/// Variables for features this daemon does not implement: accepted, named in a warning.
const UNIMPLEMENTED_ENV: &[&str] = &[
    "ENV_INPUT_EBPF_TRACE_SERVER",
    "ENV_INPUT_EBPF_TRACE_ENV_LIST",
    "ENV_INPUT_EBPF_TRACE_ENV_BLACKLIST",
    "ENV_INPUT_EBPF_TRACE_NAME_LIST",
    "ENV_INPUT_EBPF_TRACE_NAME_BLACKLIST",
    "ENV_INPUT_EBPF_CONV_TO_DDTRACE",
    "ENV_INPUT_EBPF_NETLOG_BLACKLIST",
    "ENV_NETLOG_BLACKLIST",
    "ENV_INPUT_EBPF_NETLOG_METRIC_ONLY",
    "ENV_NETLOG_METRIC_ONLY",
    "ENV_INPUT_EBPF_NETLOG_METRIC",
    "ENV_NETLOG_METRIC",
    "ENV_INPUT_EBPF_NETLOG_LOG",
    "ENV_NETLOG_LOG",
    "ENV_INPUT_EBPF_CPU_LIMIT",
    "ENV_INPUT_EBPF_MEM_LIMIT",
    "ENV_INPUT_EBPF_NET_LIMIT",
    "ENV_INPUT_EBPF_SAMPLING_RATE",
    "ENV_INPUT_EBPF_SAMPLING_RATE_PTSPERMIN",
    "ENV_INPUT_EBPF_PPROF_HOST",
    "ENV_INPUT_EBPF_PPROF_PORT",
    "DKE_NETLOG_NET_FILTER",
];

/// DataKit's rule for `ENV_INPUT_EBPF_IPV6_DISABLED` (contract §3.2): only these are false.
fn datakit_env_bool(v: &str) -> bool {
    !matches!(v, "" | "f" | "false" | "FALSE" | "False" | "0")
}

/// Converts environment variables; the error is (variable, message).
fn layer_from_env(
    env: &HashMap<String, String>,
    origin: &str,
    warnings: &mut Vec<String>,
) -> Result<Layer, (String, String)> {
    let get = |k: &str| env.get(k).map(String::as_str);
    let set = |k: &str| get(k).and_then(non_empty);
    // First variable of `keys` with a non-blank value.
    let first = |keys: &[&'static str]| keys.iter().find_map(|k| set(k).map(|v| (*k, v)));
    let at = |var: &'static str| move |m: String| (var.to_string(), m);
    let mut l = Layer::default();

    if let Some(v) = set("DKE_OUTPUT") {
        l.output = Some(parse_output(&v).map_err(at("DKE_OUTPUT"))?);
    }
    if let Some(v) = set("DKE_DATAKIT_APISERVER") {
        l.datakit_apiserver = Some(base_url(&v).map_err(at("DKE_DATAKIT_APISERVER"))?);
    }
    l.hostname = set("DKE_HOSTNAME");
    if let Some(v) = get("DKE_TAGS") {
        l.tags = parse_tags(&[v], warnings, &format!("{origin}: DKE_TAGS"));
    }
    if let Some(v) = get("DKE_LOG") {
        l.log = Some(log_path(v));
    }
    if let Some(v) = set("DKE_LOG_LEVEL") {
        l.log_level = Some(parse_log_level(&v).map_err(at("DKE_LOG_LEVEL"))?);
    }
    if let Some(v) = set("DKE_HTTPFLOW_TIER") {
        l.httpflow_tier = Some(parse_httpflow_tier(&v).map_err(at("DKE_HTTPFLOW_TIER"))?);
    }
    if let Some(v) = set("DKE_NETFLOW_TIER") {
        l.netflow_tier = Some(parse_netflow_tier(&v).map_err(at("DKE_NETFLOW_TIER"))?);
    }
    if let Some(v) = set("DKE_NETFLOW_UDP_PEERS") {
        l.netflow_udp_peers = Some(parse_udp_peers(&v).map_err(at("DKE_NETFLOW_UDP_PEERS"))?);
    }
    if let Some(v) = set("DKE_NETFLOW_CLOSED_EVENTS") {
        l.netflow_closed_events =
            Some(parse_closed_events(&v).map_err(at("DKE_NETFLOW_CLOSED_EVENTS"))?);
    }
    if let Some(v) = get("ENV_INPUT_EBPF_ENABLED_PLUGINS") {
        l.enabled =
            parse_plugins(&[v.to_string()]).map_err(at("ENV_INPUT_EBPF_ENABLED_PLUGINS"))?;
    }
    if let Some(v) = set("ENV_INPUT_EBPF_L7NET_ENABLED") {
        let list = parse_l7_lenient(
            &[v],
            warnings,
            &format!("{origin}: ENV_INPUT_EBPF_L7NET_ENABLED"),
        );
        l.l7net = resolve_l7(Some(list), None);
    }
    if let Some(v) = get("ENV_INPUT_EBPF_IPV6_DISABLED") {
        l.ipv6_disabled = Some(datakit_env_bool(v));
    }
    if let Some(v) = set("ENV_INPUT_EBPF_EPHEMERAL_PORT") {
        l.ephemeral_port = parse_int(&v)
            .and_then(check_port)
            .map_err(at("ENV_INPUT_EBPF_EPHEMERAL_PORT"))?;
    }
    if let Some(v) = set("ENV_INPUT_EBPF_INTERVAL") {
        l.interval = Some(parse_duration(&v).map_err(at("ENV_INPUT_EBPF_INTERVAL"))?);
    }
    l.pprof_host = set("ENV_INPUT_EBPF_PPROF_HOST");
    l.pprof_port = set("ENV_INPUT_EBPF_PPROF_PORT");
    l.host_root = set("HOST_ROOT").map(PathBuf::from);
    l.host_proc = set("HOST_PROC").map(PathBuf::from);

    // DKE_* is what the reference reads; the unprefixed names are what DataKit actually sends for
    // the label prefix (§6.2.4) and, in older releases, for the URL and token (§3.3).
    l.k8s_url = first(&["DKE_K8S_URL", "K8S_URL"]).map(|(_, v)| v);
    l.k8s_bearer_token =
        first(&["DKE_K8S_BEARER_TOKEN", "K8S_BEARER_TOKEN_STRING"]).map(|(_, v)| v);
    l.k8s_bearer_token_path = first(&["DKE_K8S_BEARER_TOKEN_PATH", "K8S_BEARER_TOKEN_PATH"])
        .map(|(_, v)| PathBuf::from(v));
    l.k8s_workload_labels = first(&["DKE_K8S_WORKLOAD_LABELS", "ENV_INPUT_EBPF_WORKLOAD_LABELS"])
        .map(|(_, v)| split_list(&[v]));
    l.k8s_workload_label_prefix = first(&[
        "DKE_K8S_WORKLOAD_LABEL_PREFIX",
        "K8S_WORKLOAD_LABEL_PREFIX",
        "ENV_INPUT_EBPF_WORKLOAD_LABEL_PREFIX",
    ])
    .map(|(_, v)| v);

    let ignored: Vec<&str> = UNIMPLEMENTED_ENV
        .iter()
        .copied()
        .filter(|k| set(k).is_some())
        .collect();
    if !ignored.is_empty() {
        warnings.push(format!(
            "{origin}: accepted but not implemented by this daemon, ignored: {}",
            ignored.join(", ")
        ));
    }
    Ok(l)
}

// ---------------------------------------------------------------------------------------------
// Config file

/// Keys of `[[inputs.ebpf]]`: DataKit's (contract §3.1), then our extensions.
const FILE_KEYS: &[&str] = &[
    "daemon",
    "name",
    "cmd",
    "args",
    "envs",
    "cpu_limit",
    "mem_limit",
    "net_limit",
    "kubernetes_url",
    "bearer_token",
    "bearer_token_string",
    "workload_labels",
    "workload_label_prefix",
    "enabled_plugins",
    "l7net_enabled",
    "l7net_disabled",
    "pprof_host",
    "pprof_port",
    "netlog_blacklist",
    "netlog_metric",
    "netlog_log",
    "netlog_metric_only",
    "trace_server",
    "trace_env_list",
    "trace_env_blacklist",
    "trace_name_list",
    "trace_name_blacklist",
    "trace_all_process",
    "conv_to_ddtrace",
    "ipv6_disabled",
    "ephemeral_port",
    "interval",
    "sampling_rate",
    "sampling_rate_pts_per_min",
    "election",
    "tags",
    // Extensions.
    "output",
    "datakit_apiserver",
    "hostname",
    "service",
    "log",
    "log_level",
    "pidfile",
    "min_interval",
    "batch_size",
    "queue_capacity",
    "gzip",
    "bash_paths",
    "btf",
    "netflow_tier",
    "netflow_closed_events",
    "netflow_max_conns",
    "netflow_include_loopback",
    "netflow_udp_disabled",
    "dnsflow_disabled",
    "netflow_udp_unconnected",
    "netflow_udp_unconnected_disabled",
    "dnsflow_timeout",
    "dnsflow_interval",
    "httpflow_path_normalize",
    "httpflow_tier",
];

/// The file's three layers, lowest first: `envs`, `args`, keys.
#[derive(Debug, Default)]
struct FileLayers {
    envs: Layer,
    args: Layer,
    keys: Layer,
}

type Value<'i> = Spanned<DeValue<'i>>;

struct FileCtx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl FileCtx<'_> {
    fn err(
        &self,
        span: Range<usize>,
        key: Option<&str>,
        message: impl Into<String>,
    ) -> ConfigError {
        let pos = span.start.min(self.text.len());
        let before = self.text.get(..pos).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError {
            origin: ErrorOrigin::File {
                path: self.path.to_path_buf(),
                line,
                column,
            },
            key: key.map(str::to_string),
            message: message.into(),
        }
    }

    fn type_err(&self, key: &str, v: &Value<'_>, expected: &str) -> ConfigError {
        self.err(
            v.span(),
            Some(key),
            format!("expected {expected}, found {}", v.get_ref().type_str()),
        )
    }

    fn string(&self, key: &str, v: &Value<'_>) -> Result<String, ConfigError> {
        v.get_ref()
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| self.type_err(key, v, "a string"))
    }

    fn boolean(&self, key: &str, v: &Value<'_>) -> Result<bool, ConfigError> {
        v.get_ref()
            .as_bool()
            .ok_or_else(|| self.type_err(key, v, "a boolean"))
    }

    fn integer(&self, key: &str, v: &Value<'_>) -> Result<i64, ConfigError> {
        let i = v
            .get_ref()
            .as_integer()
            .ok_or_else(|| self.type_err(key, v, "an integer"))?;
        i64::from_str_radix(i.as_str(), i.radix())
            .map_err(|_| self.err(v.span(), Some(key), format!("integer {i} is out of range")))
    }

    /// A string, or an integer written without quotes (ports).
    fn string_or_int(&self, key: &str, v: &Value<'_>) -> Result<String, ConfigError> {
        match v.get_ref() {
            DeValue::String(s) => Ok(s.to_string()),
            DeValue::Integer(_) => Ok(self.integer(key, v)?.to_string()),
            _ => Err(self.type_err(key, v, "a string")),
        }
    }

    fn strings(
        &self,
        key: &str,
        v: &Value<'_>,
    ) -> Result<Vec<(String, Range<usize>)>, ConfigError> {
        let arr = v
            .get_ref()
            .as_array()
            .ok_or_else(|| self.type_err(key, v, "an array of strings"))?;
        arr.iter()
            .map(|item| match item.get_ref().as_str() {
                Some(s) => Ok((s.to_string(), item.span())),
                None => Err(self.type_err(key, item, "a string")),
            })
            .collect()
    }

    fn duration(&self, key: &str, v: &Value<'_>) -> Result<Duration, ConfigError> {
        let s = self.string(key, v)?;
        parse_duration(&s).map_err(|m| self.err(v.span(), Some(key), m))
    }

    /// Names parsed one by one so an error points at the offending element.
    fn names<T: FromStr<Err = String> + PartialEq>(
        &self,
        key: &str,
        v: &Value<'_>,
    ) -> Result<Vec<T>, ConfigError> {
        let mut out = Vec::new();
        for (s, span) in self.strings(key, v)? {
            for item in split_list(&[s]) {
                let p: T = item
                    .parse()
                    .map_err(|m| self.err(span.clone(), Some(key), m))?;
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }
}

/// Entries in file order (the map is sorted by key).
fn entries_in_order<'a, 'i>(
    t: &'a DeTable<'i>,
) -> Vec<(&'a Spanned<std::borrow::Cow<'i, str>>, &'a Value<'i>)> {
    let mut v: Vec<_> = t.iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

fn unknown_key_message(key: &str) -> String {
    let best = FILE_KEYS.iter().map(|k| (edit_distance(key, k), *k)).min();
    let hint = match best {
        Some((d, k)) if d <= 2 => format!("did you mean `{k}`? "),
        _ => String::new(),
    };
    format!(
        "unknown key; {hint}valid keys are: {}",
        FILE_KEYS.join(", ")
    )
}

fn parse_file(
    path: &Path,
    text: &str,
    warnings: &mut Vec<String>,
) -> Result<FileLayers, ConfigError> {
    let cx = FileCtx { path, text };
    let root = DeTable::parse(text).map_err(|e| {
        let message = format!("TOML syntax error: {}", e.message().trim());
        cx.err(e.span().unwrap_or(0..0), None, message)
    })?;
    let mut ebpf: Vec<&Value<'_>> = Vec::new();
    for (key, value) in entries_in_order(root.get_ref()) {
        if key.get_ref() != "inputs" {
            return Err(cx.err(
                key.span(),
                Some(key.get_ref()),
                "unknown key; expected only [[inputs.ebpf]]",
            ));
        }
        let inputs = value
            .get_ref()
            .as_table()
            .ok_or_else(|| cx.type_err("inputs", value, "a table"))?;
        for (name, v) in entries_in_order(inputs) {
            if name.get_ref() != "ebpf" {
                warnings.push(format!(
                    "{}: ignoring [inputs.{}]: only [[inputs.ebpf]] is read",
                    path.display(),
                    name.get_ref()
                ));
                continue;
            }
            match v.get_ref() {
                DeValue::Array(items) => ebpf.extend(items.iter()),
                DeValue::Table(_) => ebpf.push(v),
                _ => return Err(cx.type_err("inputs.ebpf", v, "a table")),
            }
        }
    }
    let table = match ebpf.as_slice() {
        [one] => *one,
        [] => {
            return Err(cx.err(
                0..0,
                Some("inputs.ebpf"),
                "no [[inputs.ebpf]] table in the file",
            ));
        }
        [_, second, ..] => {
            return Err(cx.err(
                second.span(),
                Some("inputs.ebpf"),
                format!(
                    "{} [[inputs.ebpf]] tables; exactly one is supported",
                    ebpf.len()
                ),
            ));
        }
    };
    let table = table
        .get_ref()
        .as_table()
        .ok_or_else(|| cx.type_err("inputs.ebpf", table, "a table"))?;
    parse_ebpf_table(&cx, table, warnings)
}

fn parse_ebpf_table(
    cx: &FileCtx<'_>,
    t: &DeTable<'_>,
    warnings: &mut Vec<String>,
) -> Result<FileLayers, ConfigError> {
    let mut out = FileLayers::default();
    let mut ignored: Vec<String> = Vec::new();
    let (mut l7e, mut l7d) = (None, None);
    let mut keys = Layer::default();
    let l = &mut keys;
    for (k, v) in entries_in_order(t) {
        let key: &str = k.get_ref();
        let vspan = v.span();
        let at = |m: String| cx.err(vspan.clone(), Some(key), m);
        match key {
            // DataKit's own bookkeeping: type-checked, otherwise meaningless here.
            "daemon" | "election" => {
                cx.boolean(key, v)?;
            }
            "name" | "cmd" => {
                cx.string(key, v)?;
            }
            "args" => {
                let args: Vec<String> = cx.strings(key, v)?.into_iter().map(|(s, _)| s).collect();
                let parsed = cli::parse_arg_list(&args, warnings).map_err(|e| {
                    let rendered = e.render().to_string();
                    let first = rendered.lines().next().unwrap_or_default();
                    at(first.trim_start_matches("error: ").to_string())
                })?;
                if parsed.config.is_some() {
                    warnings.push(format!(
                        "{}: `--config` inside `args` is ignored",
                        cx.path.display()
                    ));
                }
                let origin = format!("{}: args", cx.path.display());
                out.args = layer_from_cli(&parsed, &origin, warnings)
                    .map_err(|(f, m)| at(format!("`{f}`: {m}")))?;
            }
            "envs" => {
                let mut env = HashMap::new();
                for (item, span) in cx.strings(key, v)? {
                    let (name, value) = item.split_once('=').ok_or_else(|| {
                        cx.err(span, Some(key), format!("`{item}` is not `NAME=value`"))
                    })?;
                    env.insert(name.trim().to_string(), value.to_string());
                }
                let origin = format!("{}: envs", cx.path.display());
                out.envs = layer_from_env(&env, &origin, warnings)
                    .map_err(|(var, m)| at(format!("environment variable {var}: {m}")))?;
            }
            "kubernetes_url" => l.k8s_url = non_empty(&cx.string(key, v)?),
            "bearer_token" => {
                l.k8s_bearer_token_path = non_empty(&cx.string(key, v)?).map(PathBuf::from)
            }
            "bearer_token_string" => l.k8s_bearer_token = non_empty(&cx.string(key, v)?),
            "workload_labels" => {
                let items: Vec<String> = cx.strings(key, v)?.into_iter().map(|(s, _)| s).collect();
                l.k8s_workload_labels = Some(split_list(&items));
            }
            "workload_label_prefix" => l.k8s_workload_label_prefix = non_empty(&cx.string(key, v)?),
            "enabled_plugins" => {
                let p: Vec<Plugin> = cx.names(key, v)?;
                l.enabled = (!p.is_empty()).then_some(p);
            }
            "l7net_enabled" => l7e = Some(cx.names(key, v)?),
            "l7net_disabled" => l7d = Some(cx.names(key, v)?),
            "pprof_host" => l.pprof_host = non_empty(&cx.string(key, v)?),
            "pprof_port" => l.pprof_port = non_empty(&cx.string_or_int(key, v)?),
            "ipv6_disabled" => l.ipv6_disabled = Some(cx.boolean(key, v)?),
            "ephemeral_port" => l.ephemeral_port = check_port(cx.integer(key, v)?).map_err(at)?,
            "interval" => l.interval = Some(cx.duration(key, v)?),
            "tags" => {
                let tags = v
                    .get_ref()
                    .as_table()
                    .ok_or_else(|| cx.type_err(key, v, "a table"))?;
                for (tk, tv) in entries_in_order(tags) {
                    let name = format!("tags.{}", tk.get_ref());
                    if tk.get_ref().trim().is_empty() {
                        return Err(cx.err(tk.span(), Some(&name), "empty tag key"));
                    }
                    let value = cx.string(&name, tv)?;
                    merge_tags(&mut l.tags, vec![(tk.get_ref().to_string(), value)]);
                }
            }
            // Features this daemon does not implement: type-checked, named in one warning if set.
            "cpu_limit" | "mem_limit" | "net_limit" | "netlog_blacklist" | "trace_server"
            | "sampling_rate" => {
                if !cx.string(key, v)?.trim().is_empty() {
                    ignored.push(key.to_string());
                }
            }
            "sampling_rate_pts_per_min" => {
                if !cx.string_or_int(key, v)?.trim().is_empty() {
                    ignored.push(key.to_string());
                }
            }
            "netlog_metric" | "netlog_log" | "trace_all_process" | "conv_to_ddtrace" => {
                if cx.boolean(key, v)? {
                    ignored.push(key.to_string());
                }
            }
            // DataKit's code default is true and false is the unusual setting.
            "netlog_metric_only" => {
                cx.boolean(key, v)?;
            }
            "trace_env_list"
            | "trace_env_blacklist"
            | "trace_name_list"
            | "trace_name_blacklist" => {
                if !cx.strings(key, v)?.is_empty() {
                    ignored.push(key.to_string());
                }
            }
            // Extensions.
            "output" => {
                l.output = non_empty(&cx.string(key, v)?)
                    .map(|s| parse_output(&s))
                    .transpose()
                    .map_err(at)?
            }
            "datakit_apiserver" => {
                l.datakit_apiserver = non_empty(&cx.string(key, v)?)
                    .map(|s| base_url(&s))
                    .transpose()
                    .map_err(at)?;
            }
            "hostname" => l.hostname = non_empty(&cx.string(key, v)?),
            "service" => l.service = non_empty(&cx.string(key, v)?),
            "log" => l.log = Some(log_path(&cx.string(key, v)?)),
            "log_level" => l.log_level = Some(parse_log_level(&cx.string(key, v)?).map_err(at)?),
            "pidfile" => l.pidfile = Some(pidfile_path(&cx.string(key, v)?)),
            "min_interval" => {
                l.min_interval = Some(check_min_interval(cx.duration(key, v)?).map_err(at)?)
            }
            "batch_size" => {
                l.batch_size =
                    Some(check_range(cx.integer(key, v)?, 1, MAX_BATCH_SIZE).map_err(at)?)
            }
            "queue_capacity" => {
                l.queue_capacity =
                    Some(check_range(cx.integer(key, v)?, 1, MAX_QUEUE_CAPACITY).map_err(at)?);
            }
            "gzip" => l.gzip = Some(cx.boolean(key, v)?),
            "netflow_tier" => {
                l.netflow_tier = Some(parse_netflow_tier(&cx.string(key, v)?).map_err(at)?)
            }
            "netflow_closed_events" => {
                l.netflow_closed_events =
                    Some(parse_closed_events(&cx.string(key, v)?).map_err(at)?)
            }
            "netflow_max_conns" => {
                l.netflow_max_conns =
                    Some(check_range(cx.integer(key, v)?, 16, MAX_NETFLOW_CONNS).map_err(at)?)
            }
            "netflow_include_loopback" => l.netflow_include_loopback = Some(cx.boolean(key, v)?),
            "netflow_udp_disabled" => l.netflow_udp_disabled = Some(cx.boolean(key, v)?),
            "dnsflow_disabled" => l.dnsflow_disabled = Some(cx.boolean(key, v)?),
            "httpflow_path_normalize" => l.httpflow_path_normalize = Some(cx.boolean(key, v)?),
            "httpflow_tier" => {
                l.httpflow_tier = Some(parse_httpflow_tier(&cx.string(key, v)?).map_err(at)?)
            }
            "netflow_udp_unconnected" => l.netflow_udp_unconnected = Some(cx.boolean(key, v)?),
            "netflow_udp_unconnected_disabled" => {
                l.netflow_udp_unconnected_disabled = Some(cx.boolean(key, v)?)
            }
            "dnsflow_timeout" => {
                l.dnsflow_timeout = Some(check_dnsflow_timeout(cx.duration(key, v)?).map_err(at)?)
            }
            "dnsflow_interval" => l.dnsflow_interval = Some(cx.duration(key, v)?),
            "bash_paths" => {
                let paths: Vec<PathBuf> = cx
                    .strings(key, v)?
                    .into_iter()
                    .map(|(s, _)| PathBuf::from(s))
                    .collect();
                l.bash_paths = (!paths.is_empty()).then_some(paths);
            }
            "btf" => l.btf = non_empty(&cx.string(key, v)?).map(PathBuf::from),
            _ => return Err(cx.err(k.span(), Some(key), unknown_key_message(key))),
        }
    }
    l.l7net = resolve_l7(l7e, l7d);
    out.keys = keys;
    if out.keys.pprof_host.is_some() || out.keys.pprof_port.is_some() {
        ignored.push("pprof_host/pprof_port (no pprof server)".to_string());
    }
    if !ignored.is_empty() {
        warnings.push(format!(
            "{}: accepted but not implemented by this daemon, ignored: {}",
            cx.path.display(),
            ignored.join(", ")
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DK_HOST: &str = "test-host";

    fn sys(datakit_install: bool) -> System {
        System {
            hostname: Some(DK_HOST.to_string()),
            datakit_install,
        }
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cfg_env(args: &[&str], e: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let inv = parse_cli(args.iter().map(OsString::from)).unwrap();
        load_with(&inv, &env(e), &sys(false))
    }

    fn cfg(args: &[&str]) -> Config {
        cfg_env(args, &[]).unwrap()
    }

    #[test]
    fn dnsflow_disabled_from_flag_file_and_default() {
        assert!(!cfg(&["x", "run"]).dnsflow_disabled);
        assert!(cfg(&["x", "run", "--dnsflow-disabled"]).dnsflow_disabled);
        assert!(!cfg(&["x", "run", "--dnsflow-disabled=false"]).dnsflow_disabled);
        let c = file_cfg(
            "dnsflow-off.conf",
            "[[inputs.ebpf]]\ndnsflow_disabled = true\n",
            &[],
            &[],
        )
        .unwrap();
        assert!(c.dnsflow_disabled);
    }

    #[test]
    fn udp_rows_can_be_left_out() {
        assert!(!cfg(&["x", "run"]).netflow_udp_disabled);
        assert!(cfg(&["x", "run", "--netflow-udp-disabled"]).netflow_udp_disabled);
        let c = file_cfg(
            "tcp-only.conf",
            "[[inputs.ebpf]]\nnetflow_udp_disabled = true\n",
            &[],
            &[],
        )
        .unwrap();
        assert!(c.netflow_udp_disabled);
        // The command line is above the file.
        let c = file_cfg(
            "tcp-only.conf",
            "[[inputs.ebpf]]\nnetflow_udp_disabled = true\n",
            &["--netflow-udp-disabled=false"],
            &[],
        )
        .unwrap();
        assert!(!c.netflow_udp_disabled);
    }

    #[test]
    fn udp_unconnected_on_by_default_with_an_opt_out() {
        let c = cfg(&["x", "run"]);
        assert!(!c.netflow_udp_unconnected && !c.netflow_udp_unconnected_disabled);
        assert_eq!(c.netflow_udp_peers, UdpPeers::Auto);
        // Still accepted: now the default, it also allows the syscall tracepoint fallback.
        assert!(cfg(&["x", "run", "--netflow-udp-unconnected"]).netflow_udp_unconnected);
        let c = cfg(&["x", "run", "--netflow-udp-unconnected-disabled"]);
        assert!(c.netflow_udp_unconnected_disabled);
        assert!(
            !cfg(&["x", "run", "--netflow-udp-unconnected-disabled=false"])
                .netflow_udp_unconnected_disabled
        );
        let c = file_cfg(
            "udp-off.conf",
            "[[inputs.ebpf]]\nnetflow_udp_unconnected_disabled = true\nnetflow_udp_unconnected = true\n",
            &[],
            &[],
        )
        .unwrap();
        assert!(c.netflow_udp_unconnected_disabled && c.netflow_udp_unconnected);
        let c = cfg_env(&["x", "run"], &[("DKE_NETFLOW_UDP_PEERS", "Syscalls")]).unwrap();
        assert_eq!(c.netflow_udp_peers, UdpPeers::Syscalls);
        let c = cfg_env(&["x", "run"], &[("DKE_NETFLOW_UDP_PEERS", "cgroup")]).unwrap();
        assert_eq!(c.netflow_udp_peers, UdpPeers::Cgroup);
        let err = cfg_env(&["x", "run"], &[("DKE_NETFLOW_UDP_PEERS", "bpf")]).unwrap_err();
        assert!(err.to_string().contains("DKE_NETFLOW_UDP_PEERS"), "{err}");
    }

    #[test]
    fn closed_events_from_flag_env_file_and_default() {
        assert_eq!(cfg(&["x", "run"]).netflow_closed_events, ClosedEvents::Auto);
        let c = cfg_env(
            &["x", "run", "--netflow-closed-events", "Perf-Event-Array"],
            &[("DKE_NETFLOW_CLOSED_EVENTS", "ring-buffer")],
        )
        .unwrap();
        assert_eq!(c.netflow_closed_events, ClosedEvents::PerfEventArray);
        let c = cfg_env(
            &["x", "run"],
            &[("DKE_NETFLOW_CLOSED_EVENTS", "ring-buffer")],
        )
        .unwrap();
        assert_eq!(c.netflow_closed_events, ClosedEvents::RingBuffer);
        let c = file_cfg(
            "closed-events.conf",
            "[[inputs.ebpf]]\nnetflow_closed_events = \"perf-event-array\"\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(c.netflow_closed_events, ClosedEvents::PerfEventArray);
        let err = cfg_env(&["x", "run", "--netflow-closed-events", "perf"], &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("valid ones are: auto, ring-buffer, perf-event-array"),
            "{err}"
        );
    }

    #[test]
    fn httpflow_tier_from_flag_env_and_default() {
        assert_eq!(cfg(&["x", "run"]).httpflow_tier, HttpflowTier::Auto);
        assert_eq!(
            cfg(&["x", "run", "--httpflow-tier", "FENTRY"]).httpflow_tier,
            HttpflowTier::Fentry
        );
        let c = cfg_env(&["x", "run"], &[("DKE_HTTPFLOW_TIER", "syscalls")]).unwrap();
        assert_eq!(c.httpflow_tier, HttpflowTier::Syscalls);
        // The flag wins over the environment.
        let c = cfg_env(
            &["x", "run", "--httpflow-tier", "fentry"],
            &[("DKE_HTTPFLOW_TIER", "syscalls")],
        )
        .unwrap();
        assert_eq!(c.httpflow_tier, HttpflowTier::Fentry);
        let err = cfg_env(&["x", "run", "--httpflow-tier", "kprobe"], &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("valid tiers are: auto, syscalls, fentry"),
            "{err}"
        );
    }

    /// Writes `text` to a unique temporary file and returns its path.
    fn temp_conf(name: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("datakit-ebpf-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn file_cfg(
        name: &str,
        text: &str,
        args: &[&str],
        e: &[(&str, &str)],
    ) -> Result<Config, ConfigError> {
        let path = temp_conf(name, text);
        let mut argv = vec!["datakit-ebpf", "run", "--config", path.to_str().unwrap()];
        argv.extend_from_slice(args);
        cfg_env(&argv, e)
    }

    fn file_err(text: &str) -> String {
        let mut w = Vec::new();
        parse_file(Path::new("ebpf.conf"), text, &mut w)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults() {
        let c = cfg(&["datakit-ebpf", "run"]);
        assert_eq!(
            c.output,
            Output::DataKit {
                base_url: "http://0.0.0.0:9529".into()
            }
        );
        assert_eq!(c.datakit_base_url, "http://0.0.0.0:9529");
        assert_eq!(c.hostname, DK_HOST);
        assert_eq!(c.service, "ebpf");
        assert_eq!(c.interval, Duration::from_secs(60));
        assert_eq!(c.min_interval, Duration::from_secs(60));
        assert_eq!(c.enabled, [Plugin::Net]);
        assert_eq!(c.l7net, [L7Protocol::HttpFlow]);
        assert!(!c.ipv6_disabled);
        assert_eq!(c.ephemeral_port, None);
        assert_eq!((c.log.clone(), c.pidfile.clone()), (None, None));
        assert_eq!(c.log_level, "info");
        assert_eq!(
            (c.batch_size, c.queue_capacity, c.gzip),
            (256, 100_000, true)
        );
        assert_eq!(c.bash_paths, [PathBuf::from("/bin/bash")]);
        assert_eq!(
            (c.host_root.as_path(), c.host_proc.as_path()),
            (Path::new("/"), Path::new("/proc"))
        );
        assert_eq!(c.k8s, K8sConfig::default());
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn datakit_install_paths_only_when_installed() {
        let inv = parse_cli(["x", "run"].map(OsString::from)).unwrap();
        let c = load_with(&inv, &HashMap::new(), &sys(true)).unwrap();
        assert_eq!(
            c.log,
            Some(PathBuf::from(
                "/usr/local/datakit/externals/datakit-ebpf.log"
            ))
        );
        assert_eq!(
            c.pidfile,
            Some(PathBuf::from(
                "/usr/local/datakit/externals/datakit-ebpf.pid"
            ))
        );
        let inv = parse_cli(["x", "run", "--log", "-", "--pidfile", "/tmp/p"].map(OsString::from))
            .unwrap();
        let c = load_with(&inv, &HashMap::new(), &sys(true)).unwrap();
        assert_eq!(c.log, None);
        assert_eq!(c.pidfile, Some(PathBuf::from("/tmp/p")));
    }

    #[test]
    fn no_hostname_anywhere_is_no_value() {
        let inv = parse_cli(["x", "run"].map(OsString::from)).unwrap();
        let c = load_with(
            &inv,
            &HashMap::new(),
            &System {
                hostname: None,
                datakit_install: false,
            },
        )
        .unwrap();
        assert_eq!(c.hostname, "no-value");
    }

    #[test]
    fn datakit_default_command_line() {
        // Contract §3.6, K8s default conf on host node-1.
        let c = cfg(&[
            "/usr/local/datakit/externals/datakit-ebpf",
            "run",
            "--datakit-apiserver",
            "0.0.0.0:9529",
            "--hostname",
            "node-1",
            "--l7net-enabled",
            "httpflow",
            "--pprof-host",
            "127.0.0.1",
            "--pprof-port",
            "6061",
            "--netlog-metric",
            "--enabled",
            "ebpf-net",
        ]);
        assert_eq!(
            c.output,
            Output::DataKit {
                base_url: "http://0.0.0.0:9529".into()
            }
        );
        assert_eq!(c.hostname, "node-1");
        assert_eq!(c.l7net, [L7Protocol::HttpFlow]);
        assert_eq!(c.enabled, [Plugin::Net]);
        assert_eq!(
            (c.pprof_host.as_deref(), c.pprof_port.as_deref()),
            (Some("127.0.0.1"), Some("6061"))
        );
        assert_eq!(c.interval, Duration::from_secs(60));
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].contains("--netlog-metric") && c.warnings[0].contains("--pprof-port")
        );
    }

    #[test]
    fn datakit_full_command_line_with_tags() {
        let c = cfg(&[
            "datakit-ebpf",
            "run",
            "--datakit-apiserver",
            "http://10.0.0.1:9529/",
            "--hostname",
            "node-1",
            "--l7net-disabled",
            "httpflow-tls",
            "--ipv6-disabled",
            "--ephemeral_port",
            "10001",
            "--interval",
            "90s",
            "--netlog-metric",
            "--netlog-log",
            "--res-cpu",
            "2.0",
            "--res-mem",
            "4GiB",
            "--res-net",
            "100MiB/s",
            "--enabled",
            "ebpf-net,ebpf-bash",
            "--tags",
            "env=prod;team=net",
        ]);
        assert_eq!(c.datakit_base_url, "http://10.0.0.1:9529");
        assert_eq!(c.l7net, [L7Protocol::HttpFlow]);
        assert!(c.ipv6_disabled);
        assert_eq!(c.ephemeral_port, Some(10001));
        assert_eq!(c.interval, Duration::from_secs(90));
        assert_eq!(c.enabled, [Plugin::Net, Plugin::Bash]);
        assert_eq!(
            c.tags,
            [("env".into(), "prod".into()), ("team".into(), "net".into())]
        );
    }

    #[test]
    fn pre_1_27_legacy_command_line() {
        let c = cfg(&[
            "datakit-ebpf",
            "--datakit-apiserver",
            "0.0.0.0:9529",
            "--hostname",
            "old-node",
            "--ipv6-disabled",
            "true",
            "--conv-to-ddtrace",
            "false",
            "--trace-allprocess",
            "true",
            "--netlog-metric-only",
            "false",
            "--ephemeral_port",
            "10001",
            "--enabled",
            "ebpf-net,ebpf-bash",
            "true",
        ]);
        assert_eq!(c.hostname, "old-node");
        assert!(c.ipv6_disabled);
        assert_eq!(c.ephemeral_port, Some(10001));
        assert_eq!(c.enabled, [Plugin::Net, Plugin::Bash]);
        assert!(
            c.warnings.iter().any(|w| w.contains("stray")),
            "{:?}",
            c.warnings
        );
        assert!(
            c.warnings.iter().any(|w| w.contains("--trace-allprocess")),
            "{:?}",
            c.warnings
        );
        let c = cfg(&[
            "datakit-ebpf",
            "--ipv6-disabled",
            "false",
            "--enabled",
            "ebpf-net",
        ]);
        assert!(!c.ipv6_disabled);
    }

    #[test]
    fn tags_with_either_separator() {
        for s in ["a=1;b=2", "a=1,b=2", " a = 1 ; ; b=2 ;"] {
            let c = cfg(&["x", "run", "--tags", s]);
            assert_eq!(
                c.tags,
                [("a".into(), "1".into()), ("b".into(), "2".into())],
                "{s}"
            );
        }
        let c = cfg(&["x", "run", "--tags", "a=x=y", "--tags", "b=2,a=3"]);
        assert_eq!(c.tags, [("a".into(), "3".into()), ("b".into(), "2".into())]);
        // DataKit joins its tags table with `;`: a comma belongs to a value.
        let c = cfg(&["x", "run", "--tags", "note=a,b;team=ops"]);
        assert_eq!(
            c.tags,
            [("note".into(), "a,b".into()), ("team".into(), "ops".into())]
        );
        let c = cfg(&["x", "run", "--tags", "note=a,b"]);
        assert_eq!(c.tags, [("note".into(), "a,b".into())]);
        // A malformed tag is skipped with a warning; the rest stand.
        let c = cfg(&["x", "run", "--tags", "a=1;oops;=v"]);
        assert_eq!(c.tags, [("a".into(), "1".into())]);
        assert_eq!(
            c.warnings,
            [
                "command line: `--tags`: tag `oops` is not `key=value`; skipped",
                "command line: `--tags`: tag `=v` has an empty key; skipped"
            ]
        );
    }

    #[test]
    fn host_tag_becomes_hostname() {
        let c = cfg(&["x", "run", "--tags", "host=h1,env=a"]);
        assert_eq!(c.hostname, "h1");
        assert_eq!(c.tags, [("env".into(), "a".into())]);
        let c = cfg(&["x", "run", "--hostname", "h2", "--tags", "host=h1"]);
        assert_eq!(c.hostname, "h2");
        assert!(c.tags.is_empty());
        assert_eq!(c.warnings.len(), 1);
        // An empty --hostname (DataKit without a host name) falls through.
        assert_eq!(cfg(&["x", "run", "--hostname", ""]).hostname, DK_HOST);
    }

    #[test]
    fn both_ephemeral_spellings() {
        assert_eq!(
            cfg(&["x", "run", "--ephemeral_port", "10001"]).ephemeral_port,
            Some(10001)
        );
        assert_eq!(
            cfg(&["x", "run", "--ephemeral-port", "0"]).ephemeral_port,
            Some(0)
        );
        assert_eq!(
            cfg(&["x", "run", "--ephemeral-port", "-1"]).ephemeral_port,
            None
        );
        let err = cfg_env(&["x", "run", "--ephemeral-port", "70000"], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command line: `--ephemeral-port`: must be between 0 and 65535, found 70000"
        );
    }

    #[test]
    fn output_and_base_url() {
        let c = cfg(&["x", "run", "--output", "-"]);
        assert_eq!(c.output, Output::Stdout);
        assert_eq!(c.datakit_base_url, "http://0.0.0.0:9529");
        let c = cfg(&[
            "x",
            "run",
            "--output",
            "stdout",
            "--datakit-apiserver",
            "http://dk:9529/",
        ]);
        assert_eq!(c.output, Output::Stdout);
        assert_eq!(c.datakit_base_url, "http://dk:9529");
        let c = cfg(&["x", "run", "--output", "127.0.0.1:19529"]);
        assert_eq!(
            c.output,
            Output::DataKit {
                base_url: "http://127.0.0.1:19529".into()
            }
        );
        assert_eq!(c.datakit_base_url, "http://127.0.0.1:19529");
        let err = cfg_env(&["x", "run", "--datakit-apiserver", "ftp://x"], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command line: `--datakit-apiserver`: unsupported scheme `ftp` in `ftp://x` (DataKit's API is plain http)"
        );
        let err = cfg_env(&["x", "run", "--datakit-apiserver", "https://dk"], &[]).unwrap_err();
        assert!(
            err.to_string().contains("unsupported scheme `https`"),
            "{err}"
        );
    }

    #[test]
    fn extensions_on_the_command_line() {
        let c = cfg(&[
            "x",
            "run",
            "--min-interval",
            "1s",
            "--interval",
            "5s",
            "--batch-size",
            "10",
            "--queue-capacity",
            "50",
            "--no-gzip",
            "--bash-path",
            "/bin/bash",
            "--bash-path",
            "/usr/bin/bash",
            "--btf",
            "/tmp/vmlinux",
            "--log-level",
            "DEBUG",
            "--service",
            "svc",
        ]);
        assert_eq!(
            (c.interval, c.min_interval),
            (Duration::from_secs(5), Duration::from_secs(1))
        );
        assert_eq!((c.batch_size, c.queue_capacity, c.gzip), (10, 50, false));
        assert_eq!(
            c.bash_paths,
            [PathBuf::from("/bin/bash"), PathBuf::from("/usr/bin/bash")]
        );
        assert_eq!(c.btf, Some(PathBuf::from("/tmp/vmlinux")));
        assert_eq!((c.log_level.as_str(), c.service.as_str()), ("debug", "svc"));
        let err = cfg_env(&["x", "run", "--min-interval", "500ms"], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command line: `--min-interval`: must be at least 1s, found 500ms"
        );
        let err = cfg_env(&["x", "run", "--log-level", "loud"], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command line: `--log-level`: invalid log level `loud`; valid levels are: trace, debug, info, warn, error"
        );
    }

    #[test]
    fn dnsflow_options() {
        let c = cfg(&["x", "run"]);
        assert_eq!(
            (c.dnsflow_timeout, c.dnsflow_interval),
            (Duration::from_secs(6), Duration::from_secs(30))
        );
        let c = cfg(&[
            "x",
            "run",
            "--min-interval",
            "1s",
            "--dnsflow-interval",
            "2s",
            "--dnsflow-timeout",
            "1500ms",
        ]);
        assert_eq!(
            (c.dnsflow_timeout, c.dnsflow_interval),
            (Duration::from_millis(1500), Duration::from_secs(2))
        );
        let c = cfg(&["x", "run", "--dnsflow-interval", "2s"]);
        assert_eq!(c.dnsflow_interval, Duration::from_secs(30));
        assert_eq!(
            c.warnings,
            ["dnsflow_interval 2s is below the minimum 30s; using 30s"]
        );
        let err = cfg_env(&["x", "run", "--dnsflow-timeout", "1h"], &[]).unwrap_err();
        assert!(err.to_string().contains("--dnsflow-timeout"), "{err}");
        let c = file_cfg(
            "dnsflow.conf",
            "[[inputs.ebpf]]\ndnsflow_timeout = \"3s\"\ndnsflow_interval = \"45s\"\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.dnsflow_timeout, c.dnsflow_interval),
            (Duration::from_secs(3), Duration::from_secs(45))
        );
    }

    #[test]
    fn interval_floor() {
        let c = cfg(&["x", "run", "--interval", "10s"]);
        assert_eq!(c.interval, Duration::from_secs(60));
        assert_eq!(
            c.warnings,
            ["interval 10s is below the minimum 1m; using 1m"]
        );
    }

    #[test]
    fn plugins() {
        let c = cfg(&[
            "x",
            "run",
            "--enabled",
            "ebpf-bash",
            "--enabled",
            "ebpf-net,ebpf-bash,ebpf-trace",
        ]);
        assert_eq!(c.enabled, [Plugin::Bash, Plugin::Net, Plugin::Trace]);
        assert_eq!(
            c.warnings,
            ["plugins not implemented by this daemon, ignored: ebpf-trace"]
        );
        let err = cfg_env(&["x", "run", "--enabled", "ebpf-nett"], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command line: `--enabled`: unknown plugin `ebpf-nett`; valid plugins are: ebpf-net, ebpf-bash, \
             ebpf-conntrack, ebpf-trace, bpf-netlog"
        );
        for p in Plugin::ALL {
            assert_eq!(p.name().parse::<Plugin>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
    }

    #[test]
    fn l7net_rules() {
        assert_eq!(
            cfg(&["x", "run", "--l7net-disabled", "httpflow"]).l7net,
            [L7Protocol::HttpFlowTls]
        );
        let c = cfg(&[
            "x",
            "run",
            "--l7net-enabled",
            "httpflow-tls",
            "--l7net-disabled",
            "httpflow-tls",
        ]);
        assert_eq!(c.l7net, [L7Protocol::HttpFlowTls]);
        let c = cfg(&["x", "run", "--l7net-enabled", "http,httpflow"]);
        assert_eq!(c.l7net, [L7Protocol::HttpFlow]);
        assert_eq!(c.warnings.len(), 1);
        assert_eq!(resolve_l7(Some(vec![]), None), Some(vec![]));
        assert_eq!(resolve_l7(None, None), None);
    }

    #[test]
    fn durations_go_syntax() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("60s"), Duration::from_secs(60));
        assert_eq!(ok("1m"), Duration::from_secs(60));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2h"), Duration::from_secs(7200));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("1h2m3s4ms5us6ns"), Duration::new(3723, 4_005_006));
        assert_eq!(ok("10µs"), Duration::from_micros(10));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("+3s"), Duration::from_secs(3));
        assert_eq!(ok("0.000000001s"), Duration::from_nanos(1));
        let err = |s: &str| parse_duration(s).unwrap_err();
        assert_eq!(
            err("60"),
            "invalid duration `60`: missing unit (ns, us, ms, s, m, h)"
        );
        assert_eq!(
            err("5d"),
            "invalid duration `5d`: unknown unit `d` (valid: ns, us, ms, s, m, h)"
        );
        assert_eq!(err("-1s"), "invalid duration `-1s`: must not be negative");
        assert!(err("").contains("empty"));
        assert!(err("abc").contains("expected a number"));
        assert!(err("1.s.").contains("expected a number"));
        assert!(err("3000000h").contains("too large"));
        assert_eq!(fmt_duration(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn environment() {
        let c = cfg_env(
            &["x", "run"],
            &[
                ("ENV_INPUT_EBPF_ENABLED_PLUGINS", "ebpf-bash, ebpf-net"),
                ("ENV_INPUT_EBPF_L7NET_ENABLED", "httpflow,httpflow-tls"),
                ("ENV_INPUT_EBPF_IPV6_DISABLED", "yes"),
                ("ENV_INPUT_EBPF_EPHEMERAL_PORT", "32768"),
                ("ENV_INPUT_EBPF_INTERVAL", "2m"),
                ("ENV_INPUT_EBPF_PPROF_PORT", "6061"),
                ("ENV_INPUT_EBPF_TRACE_SERVER", "x:1"),
                ("DKE_K8S_URL", "https://k8s:6443"),
                ("DKE_K8S_BEARER_TOKEN", "tok"),
                ("DKE_K8S_BEARER_TOKEN_PATH", "/t"),
                ("DKE_K8S_WORKLOAD_LABELS", "app, tier"),
                ("K8S_WORKLOAD_LABEL_PREFIX", "p_"),
                ("HOST_ROOT", "/rootfs"),
                ("HOST_PROC", "/rootfs/proc"),
                ("DKE_DATAKIT_APISERVER", "dk:9529"),
                ("DKE_OUTPUT", "stdout"),
                ("DKE_HOSTNAME", "envhost"),
                ("DKE_TAGS", "a=1;b=2"),
                ("DKE_LOG", "/var/log/e.log"),
                ("DKE_LOG_LEVEL", "warn"),
            ],
        )
        .unwrap();
        assert_eq!(c.enabled, [Plugin::Bash, Plugin::Net]);
        assert_eq!(c.l7net, [L7Protocol::HttpFlow, L7Protocol::HttpFlowTls]);
        assert!(c.ipv6_disabled);
        assert_eq!(c.ephemeral_port, Some(32768));
        assert_eq!(c.interval, Duration::from_secs(120));
        assert_eq!(c.pprof_port.as_deref(), Some("6061"));
        assert_eq!(
            c.k8s,
            K8sConfig {
                url: Some("https://k8s:6443".into()),
                bearer_token: Some("tok".into()),
                bearer_token_path: Some("/t".into()),
                workload_labels: vec!["app".into(), "tier".into()],
                workload_label_prefix: Some("p_".into()),
            }
        );
        assert_eq!(
            (c.host_root.as_path(), c.host_proc.as_path()),
            (Path::new("/rootfs"), Path::new("/rootfs/proc"))
        );
        assert_eq!(c.output, Output::Stdout);
        assert_eq!(c.datakit_base_url, "http://dk:9529");
        assert_eq!(c.hostname, "envhost");
        assert_eq!(c.tags.len(), 2);
        assert_eq!(c.log, Some(PathBuf::from("/var/log/e.log")));
        assert_eq!(c.log_level, "warn");
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("ENV_INPUT_EBPF_TRACE_SERVER")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn ipv6_disabled_env_truthiness() {
        for (v, want) in [
            ("", false),
            ("f", false),
            ("false", false),
            ("FALSE", false),
            ("False", false),
            ("0", false),
            ("true", true),
            ("1", true),
            ("no", true),
            ("fAlse", true),
            ("off", true),
        ] {
            let c = cfg_env(&["x", "run"], &[("ENV_INPUT_EBPF_IPV6_DISABLED", v)]).unwrap();
            assert_eq!(c.ipv6_disabled, want, "{v:?}");
        }
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let err = cfg_env(&["x", "run"], &[("ENV_INPUT_EBPF_INTERVAL", "abc")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable ENV_INPUT_EBPF_INTERVAL: invalid duration `abc`: expected a number followed by a \
             unit (ns, us, ms, s, m, h), e.g. `60s` or `1m30s`"
        );
        let err = cfg_env(&["x", "run"], &[("ENV_INPUT_EBPF_EPHEMERAL_PORT", "x")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable ENV_INPUT_EBPF_EPHEMERAL_PORT: `x` is not an integer"
        );
    }

    #[test]
    fn empty_environment_is_fine() {
        assert!(cfg_env(&["x", "run", "--enabled", "ebpf-bash"], &[]).is_ok());
    }

    const PREC_FILE: &str =
        "[[inputs.ebpf]]\n  hostname = \"file\"\n  interval = \"70s\"\n  service = \"file\"\n";

    #[test]
    fn precedence_cli_over_env_over_file() {
        let e = [("DKE_HOSTNAME", "env"), ("ENV_INPUT_EBPF_INTERVAL", "80s")];
        let c = file_cfg(
            "prec1.conf",
            PREC_FILE,
            &["--hostname", "cli", "--interval", "90s"],
            &e,
        )
        .unwrap();
        assert_eq!(c.hostname, "cli");
        assert_eq!(c.interval, Duration::from_secs(90));
        assert_eq!(c.service, "file");
    }

    #[test]
    fn precedence_env_over_file() {
        let e = [("DKE_HOSTNAME", "env"), ("ENV_INPUT_EBPF_INTERVAL", "80s")];
        let c = file_cfg("prec2.conf", PREC_FILE, &[], &e).unwrap();
        assert_eq!(c.hostname, "env");
        assert_eq!(c.interval, Duration::from_secs(80));
    }

    #[test]
    fn precedence_cli_over_env() {
        let c = cfg_env(
            &["x", "run", "--hostname", "cli"],
            &[("DKE_HOSTNAME", "env")],
        )
        .unwrap();
        assert_eq!(c.hostname, "cli");
    }

    #[test]
    fn precedence_cli_over_file() {
        let c = file_cfg("prec3.conf", PREC_FILE, &["--interval", "2m"], &[]).unwrap();
        assert_eq!(
            (c.hostname.as_str(), c.interval),
            ("file", Duration::from_secs(120))
        );
    }

    #[test]
    fn precedence_file_over_defaults() {
        let c = file_cfg("prec4.conf", PREC_FILE, &[], &[]).unwrap();
        assert_eq!(
            (c.hostname.as_str(), c.interval),
            ("file", Duration::from_secs(70))
        );
    }

    #[test]
    fn precedence_within_the_file_and_tag_merge() {
        let text = r#"
[[inputs.ebpf]]
  args = ["--datakit-apiserver", "10.0.0.2:9529", "--hostname", "args", "--interval", "75s", "--tags", "a=args;b=args"]
  envs = ["DKE_HOSTNAME=envs", "ENV_INPUT_EBPF_INTERVAL=85s", "HOST_ROOT=/envs", "DKE_TAGS=c=envs"]
  hostname = "keys"
  [inputs.ebpf.tags]
    b = "keys"
"#;
        let real_env = [("HOST_ROOT", "/real"), ("DKE_TAGS", "c=real")];
        let c = file_cfg("prec5.conf", text, &["--tags", "a=cli"], &real_env).unwrap();
        assert_eq!(c.datakit_base_url, "http://10.0.0.2:9529");
        assert_eq!(c.hostname, "keys");
        assert_eq!(c.interval, Duration::from_secs(75));
        assert_eq!(c.host_root, PathBuf::from("/real"));
        assert_eq!(
            c.tags,
            [
                ("c".into(), "real".into()),
                ("a".into(), "cli".into()),
                ("b".into(), "keys".into())
            ]
        );
    }

    #[test]
    fn full_file() {
        let text = r#"
[[inputs.ebpf]]
  daemon = true
  name = 'ebpf'
  cmd = "/usr/local/datakit/externals/datakit-ebpf"
  args = ["--datakit-apiserver", "0.0.0.0:9529"]
  envs = []
  kubernetes_url = "https://kubernetes.default:443"
  bearer_token = "/run/secrets/kubernetes.io/serviceaccount/token"
  bearer_token_string = "abc"
  workload_labels = ["app", "tier"]
  workload_label_prefix = "p_"
  enabled_plugins = ["ebpf-net", "ebpf-bash"]
  l7net_enabled = ["httpflow"]
  l7net_disabled = []
  ipv6_disabled = true
  ephemeral_port = -1
  interval = "1m30s"
  election = false
  netlog_metric_only = true
  output = "-"
  datakit_apiserver = "127.0.0.1:9529"
  service = "svc"
  log = "/tmp/x.log"
  log_level = "debug"
  pidfile = ""
  min_interval = "10s"
  batch_size = 100
  queue_capacity = 1000
  gzip = false
  bash_paths = ["/bin/bash", "/usr/bin/bash"]
  btf = "/tmp/btf"
  pprof_port = 6061
[inputs.ebpf.tags]
  host = "taghost"
  env = "prod"
"#;
        let c = file_cfg("full.conf", text, &[], &[]).unwrap();
        assert_eq!(c.output, Output::Stdout);
        assert_eq!(c.datakit_base_url, "http://127.0.0.1:9529");
        assert_eq!(c.hostname, "taghost");
        assert_eq!(c.tags, [("env".into(), "prod".into())]);
        assert_eq!(c.enabled, [Plugin::Net, Plugin::Bash]);
        assert_eq!(c.l7net, [L7Protocol::HttpFlow]);
        assert!(c.ipv6_disabled);
        assert_eq!(c.ephemeral_port, None);
        assert_eq!(
            (c.interval, c.min_interval),
            (Duration::from_secs(90), Duration::from_secs(10))
        );
        assert_eq!(
            (c.log.as_deref(), c.pidfile.as_deref()),
            (Some(Path::new("/tmp/x.log")), None)
        );
        assert_eq!((c.batch_size, c.queue_capacity, c.gzip), (100, 1000, false));
        assert_eq!(c.bash_paths.len(), 2);
        assert_eq!(
            c.k8s.bearer_token_path,
            Some(PathBuf::from(
                "/run/secrets/kubernetes.io/serviceaccount/token"
            ))
        );
        assert_eq!(c.k8s.bearer_token.as_deref(), Some("abc"));
        assert_eq!(c.k8s.workload_labels, ["app", "tier"]);
        assert_eq!(c.pprof_port.as_deref(), Some("6061"));
    }

    #[test]
    fn sample_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/ebpf.conf.sample");
        let argv = ["datakit-ebpf", "--config", path.to_str().unwrap()];
        let inv = parse_cli(argv.map(OsString::from)).unwrap();
        assert_eq!(inv.command, cli::Command::Run);
        let c = load_with(&inv, &HashMap::new(), &sys(false)).unwrap();
        assert_eq!(c.enabled, [Plugin::Net, Plugin::Bash]);
        assert_eq!(c.l7net, [L7Protocol::HttpFlow]);
        assert_eq!(c.datakit_base_url, "http://0.0.0.0:9529");
        assert_eq!(c.interval, Duration::from_secs(60));
    }

    #[test]
    fn file_error_unknown_key_line_7() {
        let text = "# ebpf\n[[inputs.ebpf]]\n  daemon = true\n  name = 'ebpf'\n  enabled_plugins = [\"ebpf-net\"]\n\n  intervall = \"60s\"\n";
        assert_eq!(
            file_err(text),
            format!(
                "ebpf.conf:7:3: key `intervall`: unknown key; did you mean `interval`? valid keys are: {}",
                FILE_KEYS.join(", ")
            )
        );
    }

    #[test]
    fn file_error_bad_duration() {
        assert_eq!(
            file_err("[[inputs.ebpf]]\ninterval = \"abc\"\n"),
            "ebpf.conf:2:12: key `interval`: invalid duration `abc`: expected a number followed by a unit (ns, us, \
             ms, s, m, h), e.g. `60s` or `1m30s`"
        );
    }

    #[test]
    fn file_error_unknown_plugin() {
        assert_eq!(
            file_err("[[inputs.ebpf]]\nenabled_plugins = [\"ebpf-net\", \"ebpf-nett\"]\n"),
            "ebpf.conf:2:32: key `enabled_plugins`: unknown plugin `ebpf-nett`; valid plugins are: ebpf-net, \
             ebpf-bash, ebpf-conntrack, ebpf-trace, bpf-netlog"
        );
    }

    #[test]
    fn file_error_batch_size_zero() {
        assert_eq!(
            file_err("[[inputs.ebpf]]\n  batch_size = 0\n"),
            "ebpf.conf:2:16: key `batch_size`: must be between 1 and 10000, found 0"
        );
    }

    #[test]
    fn file_error_syntax() {
        assert_eq!(
            file_err("[[inputs.ebpf]]\ninterval = \"60s\n"),
            "ebpf.conf:2:16: TOML syntax error: invalid basic string, expected `\"`"
        );
    }

    #[test]
    fn file_error_wrong_type_and_structure() {
        assert_eq!(
            file_err("[[inputs.ebpf]]\nipv6_disabled = \"yes\"\n"),
            "ebpf.conf:2:17: key `ipv6_disabled`: expected a boolean, found string"
        );
        assert_eq!(
            file_err("[[inputs.ebpf]]\n[inputs.ebpf.tags]\nk = 1\n"),
            "ebpf.conf:3:5: key `tags.k`: expected a string, found integer"
        );
        assert_eq!(
            file_err("[[inputs.ebpf]]\nephemeral_port = 65536\n"),
            "ebpf.conf:2:18: key `ephemeral_port`: must be between 0 and 65535, found 65536"
        );
        assert_eq!(
            file_err("[[inputs.ebpf]]\nargs = [\"--interval\", \"x\"]\n"),
            "ebpf.conf:2:8: key `args`: `--interval`: invalid duration `x`: expected a number followed by a unit \
             (ns, us, ms, s, m, h), e.g. `60s` or `1m30s`"
        );
        assert!(
            file_err("[[inputs.ebpf]]\nargs = [\"--bogus\"]\n")
                .starts_with("ebpf.conf:2:8: key `args`: unexpected argument")
        );
        assert_eq!(
            file_err("[[inputs.ebpf]]\nenvs = [\"HOST_ROOT\"]\n"),
            "ebpf.conf:2:9: key `envs`: `HOST_ROOT` is not `NAME=value`"
        );
        assert_eq!(
            file_err("# empty\n"),
            "ebpf.conf:1:1: key `inputs.ebpf`: no [[inputs.ebpf]] table in the file"
        );
        assert_eq!(
            file_err("[[inputs.ebpf]]\n[[inputs.ebpf]]\n"),
            "ebpf.conf:2:1: key `inputs.ebpf`: 2 [[inputs.ebpf]] tables; exactly one is supported"
        );
        assert!(file_err("[global]\n").starts_with("ebpf.conf:1:2: key `global`: unknown key"));
    }

    #[test]
    fn unreadable_file() {
        let err = cfg_env(&["x", "run", "--config", "/nonexistent/ebpf.conf"], &[]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/ebpf.conf: cannot read the config file: "),
            "{err}"
        );
    }
}
