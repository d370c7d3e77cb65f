//! datakit-ebpf: eBPF network and bash collector for DataKit.
//!
//! Start-up order matters: the configuration is validated completely before anything touches the
//! kernel, so a bad config file costs nothing and names the file, line and key.

mod btf;
mod check;
mod cli;
mod clock;
mod config;
mod kernel;
mod lifecycle;
mod lineproto;
mod logging;
mod plugins;
mod sender;
mod users;

use std::{collections::HashMap, process::ExitCode, sync::Arc, time::Duration};

use tracing::{error, info, warn};

use crate::{
    cli::Command,
    config::{Config, Output, Plugin},
    plugins::{GlobalTags, PluginContext},
    sender::{OutputTarget, Sender, SenderOptions},
};

/// Exit status for configuration and command-line errors.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let invocation = match config::parse_cli(std::env::args_os()) {
        Ok(invocation) => invocation,
        // --help/--version display (exit 0) or a usage error (exit 2).
        Err(err) => err.exit(),
    };
    match invocation.command {
        Command::Version => {
            println!(
                "datakit-ebpf version {} {}",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::ARCH
            );
            return ExitCode::SUCCESS;
        }
        Command::Help => {
            println!("{}", cli::help_text());
            return ExitCode::SUCCESS;
        }
        Command::Run | Command::Check => {}
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match config::load(&invocation, &env) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("datakit-ebpf: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if invocation.command == Command::Check {
        return run_check(&config);
    }
    if let Err(err) = logging::init(config.log.as_deref(), &config.log_level) {
        eprintln!("datakit-ebpf: {err:#}");
        return ExitCode::from(EXIT_USAGE);
    }
    for warning in &config.warnings {
        warn!("{warning}");
    }
    // One worker thread runs the plugins' tasks while the main thread loads the next plugin:
    // loading is synchronous (and takes tens of seconds on slow machines), and on a
    // current-thread runtime no plugin would drain its buffers or start its interval until the
    // last one had loaded.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("datakit-ebpf-worker")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            error!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let config = Arc::new(config);
    match runtime.block_on(run(config.clone())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("fatal: {err:#}");
            let message = format!("{err:#}");
            let _ = runtime.block_on(sender::report_last_error(
                &config.datakit_base_url,
                "ebpf",
                &message,
            ));
            ExitCode::FAILURE
        }
    }
}

/// Probes the kernel once: features, and BTF when `need_btf` (parsing it costs 0.2 s and tens
/// of MB; only ebpf-net uses it).
fn probe_kernel(
    config: &Config,
    tracefs: Option<&std::path::Path>,
    need_btf: bool,
) -> plugins::Kernel {
    let btf = if need_btf {
        btf::KernelBtf::load(config.btf.as_deref()).map_err(|err| format!("{err:#}"))
    } else {
        Err("not read: ebpf-net is not enabled".into())
    };
    let trampoline_target = btf
        .as_ref()
        .ok()
        .and_then(|btf| btf.function_id(btf::TRAMPOLINE_PROBE).ok());
    plugins::Kernel {
        features: kernel::KernelFeatures::probe(tracefs, config.btf.as_deref(), trampoline_target),
        btf,
    }
}

fn run_check(config: &Config) -> ExitCode {
    let tracefs = lifecycle::ensure_tracefs();
    // check reports every plugin, enabled or not.
    let kernel = probe_kernel(config, tracefs.as_deref(), true);
    let (report, ok) = check::report(config, &kernel);
    print!("{report}");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run(config: Arc<Config>) -> anyhow::Result<()> {
    info!(
        "datakit-ebpf {} starting: plugins {:?}, interval {:?}",
        env!("CARGO_PKG_VERSION"),
        config.enabled.iter().map(|p| p.name()).collect::<Vec<_>>(),
        config.interval
    );
    let _pidfile = config
        .pidfile
        .as_deref()
        .map(lifecycle::PidFile::acquire)
        .transpose()?;
    raise_memlock_limit();
    let tracefs = lifecycle::ensure_tracefs();
    if let Some(tracefs) = &tracefs {
        lifecycle::remove_stale_probe_events(tracefs);
    }
    let kernel = probe_kernel(
        &config,
        tracefs.as_deref(),
        config.enabled.contains(&Plugin::Net),
    );

    let sender = Sender::start(SenderOptions {
        target: match &config.output {
            Output::Stdout => OutputTarget::Stdout,
            Output::DataKit { base_url } => OutputTarget::DataKit {
                base_url: base_url.clone(),
            },
        },
        batch_size: config.batch_size,
        queue_capacity: config.queue_capacity,
        gzip: config.gzip,
        log_every: config.interval,
        request_timeout: Duration::from_secs(30),
        max_backoff: Duration::from_secs(30),
    });
    let shutdown = lifecycle::shutdown_signal()?;
    let ctx = PluginContext {
        config: config.clone(),
        tags: Arc::new(GlobalTags::new(&config)),
        sender: sender.clone(),
        interval: config.interval,
        shutdown: shutdown.clone(),
    };

    let mut tasks = tokio::task::JoinSet::new();
    let mut failures = Vec::new();
    for &plugin in &config.enabled {
        let availability = plugins::availability(plugin, &kernel, &config);
        if !availability.can_run {
            error!("{}: cannot run: {}", plugin.name(), availability.reason);
            failures.push(format!("{}: {}", plugin.name(), availability.reason));
            continue;
        }
        match start_plugin(plugin, &config, &kernel, ctx.clone(), &mut tasks) {
            Ok(()) => info!("{}: running via {}", plugin.name(), availability.mechanism),
            Err(err) => {
                error!("{}: failed to start: {err:#}", plugin.name());
                failures.push(format!("{}: {err:#}", plugin.name()));
            }
        }
    }
    if tasks.is_empty() {
        anyhow::bail!("no plugin could start: {}", failures.join("; "));
    }
    // Parsing the kernel's BTF (ours and aya's) takes tens of MB that are freed once the
    // programs are loaded; give them back to the system instead of keeping them as RSS.
    drop(kernel);
    lifecycle::return_free_memory();
    if !failures.is_empty() {
        // Keep running what works, and tell DataKit about the rest.
        let _ =
            sender::report_last_error(&config.datakit_base_url, "ebpf", &failures.join("; ")).await;
    }

    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) => error!("plugin stopped: {err:#}"),
            Err(err) => error!("plugin task failed: {err}"),
        }
    }
    let stats = sender.shutdown(Duration::from_secs(5)).await;
    info!(
        "stopped: {} points queued, {} sent in {} requests ({} retries), {} dropped (queue full or \
         undelivered at exit), {} rejected by DataKit, {} invalid",
        stats.queued,
        stats.sent_points,
        stats.sent_requests,
        stats.retries,
        stats.dropped_queue_full,
        stats.rejected_points,
        stats.invalid_points
    );
    Ok(())
}

fn start_plugin(
    plugin: Plugin,
    config: &Config,
    kernel: &plugins::Kernel,
    ctx: PluginContext,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    match plugin {
        Plugin::Bash => {
            let collector = plugins::bash::BashCollector::load(config)?;
            tasks.spawn(collector.run(ctx));
            Ok(())
        }
        Plugin::Net => plugins::net::start(config, kernel, ctx, tasks),
        other => anyhow::bail!("{} is not supported", other.name()),
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones use memcg and ignore it, so
/// a failure here is only a warning.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        warn!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels 5.11+",
            std::io::Error::last_os_error()
        );
    }
}
