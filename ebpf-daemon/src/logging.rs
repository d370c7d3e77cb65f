//! Logging through `tracing`, to the `--log` file (appending, as the reference does) or stderr.

use std::{fs::OpenOptions, path::Path, sync::Mutex};

use anyhow::Context as _;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is one of trace|debug|info|warn|error.
pub fn init(log: Option<&Path>, level: &str) -> anyhow::Result<()> {
    // aya logs every map and program it creates at debug; keep that out unless asked for.
    let filter = EnvFilter::try_new(format!(
        "{level},aya=warn,aya_obj=warn,reqwest=warn,hyper=warn"
    ))
    .with_context(|| format!("bad log level {level:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match log {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating log directory {}", dir.display()))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(Mutex::new(file))
                .init();
        }
        None => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            builder.with_ansi(ansi).with_writer(std::io::stderr).init();
        }
    }
    Ok(())
}
