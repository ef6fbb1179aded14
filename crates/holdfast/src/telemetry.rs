//! Logging setup: human-readable lines by default, JSON by option. Access-log lines
//! use the target `holdfast::access`, so a filter can keep or drop them.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(log: &LogConfig) {
    let mut filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    if !log.access_log
        && let Ok(d) = "holdfast::access=off".parse()
    {
        filter = filter.add_directive(d);
    }
    use std::io::IsTerminal;
    // Colour only for a person at a terminal, never into log files or pipes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if installed.is_ok() {
        // Same shape as this subscriber's lines, without its per-field cost.
        crate::proxy::access_log::write_directly(log.format);
    }
}
