//! The `holdfast` binary: parse, load, run. No logic lives here.

mod allocator;
mod cli;

use std::process::ExitCode;

use clap::Parser;
use holdfast::config::Config;
use holdfast::process::{self, Origin};

// A proxy allocates small, short-lived buffers and header maps on every request;
// mimalloc's thread-local free lists make that markedly cheaper than glibc malloc
// (see the benchmark section of the README).
#[global_allocator]
static GLOBAL: allocator::MiMalloc = allocator::MiMalloc;

/// Exit status for a config that cannot be used (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if matches!(
        cli.command,
        cli::Command::Run { .. } | cli::Command::Proxy(_)
    ) {
        // Before anything else, before any thread: until `process::run` has its
        // handlers in, a SIGHUP, SIGUSR2 or stop signal waits instead of killing the
        // process (see `process::held`).
        process::held::hold();
    }
    let (config, origin) = match cli.command {
        cli::Command::Check { config } => {
            return match Config::load(&config) {
                Ok(c) => {
                    print!("{}", c.to_effective_toml());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    ExitCode::FAILURE
                }
            };
        }
        cli::Command::Probe(args) => {
            let (options, json) = args.into_options();
            return match runtime(1) {
                Ok(rt) => ExitCode::from(rt.block_on(holdfast::probe::run_cli(options, json))),
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        cli::Command::Demo { duration } => {
            return match runtime(0).and_then(|rt| rt.block_on(holdfast::demo::run(duration.get())))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        cli::Command::Run {
            config: path,
            pid_file,
        } => match Config::load(&path) {
            Ok(mut c) => {
                if pid_file.is_some() {
                    c.pid_file = pid_file;
                }
                (c, Origin::current(Some(path)))
            }
            Err(errors) => {
                eprintln!("{errors}");
                return ExitCode::from(EX_USAGE);
            }
        },
        cli::Command::Proxy(args) => match args.into_config() {
            Ok(c) => (c, Origin::current(None)),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EX_USAGE);
            }
        },
    };
    holdfast::telemetry::init(&config.log);
    let rt = match runtime(config.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(process::run(config, origin));
    process::shut_down(rt);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    // One worker: a current-thread runtime does the same work without cross-thread
    // wake-ups and work-stealing bookkeeping.
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b
    };
    b.enable_all().build()
}
