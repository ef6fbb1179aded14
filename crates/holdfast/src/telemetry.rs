//! Logging setup: human-readable lines by default, JSON by option. Access-log lines
//! use the target `holdfast::access`, so a filter can keep or drop them.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Swaps the filter of the installed subscriber (set by [`init`]).
type Reloader = Box<dyn Fn(EnvFilter) + Send + Sync>;
static RELOAD: std::sync::OnceLock<Reloader> = std::sync::OnceLock::new();

fn filter_for(log: &LogConfig) -> EnvFilter {
    let mut filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    if !log.access_log
        && let Ok(d) = "holdfast::access=off".parse()
    {
        filter = filter.add_directive(d);
    }
    filter
}

/// Keeps the installed subscriber's filter handle for [`reload`].
fn keep_reloader<S: 'static>(handle: tracing_subscriber::reload::Handle<EnvFilter, S>) {
    let _ = RELOAD.set(Box::new(move |f| {
        let _ = handle.reload(f);
    }));
}

/// Applies a reloaded `[log]` table's `level` and `access_log` (the format stays:
/// it changes on upgrade).
pub fn reload(log: &LogConfig) {
    if let Some(apply) = RELOAD.get() {
        apply(filter_for(log));
    }
}

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(log: &LogConfig) {
    let filter = filter_for(log);
    use std::io::IsTerminal;
    // Colour only for a person at a terminal, never into log files or pipes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match log.format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map(|()| keep_reloader(handle))
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map(|()| keep_reloader(handle))
        }
    };
    if installed.is_ok() {
        // Same shape as this subscriber's lines, without its per-field cost.
        crate::proxy::access_log::write_directly(log.format);
    }
}
