//! Signals to one process by PID, its open-files limit, and what `/proc` says about
//! processes.
//!
//! The only module with `unsafe`: std has no safe `kill(2)` nor `prlimit(2)`. Every call is guarded so a
//! PID of 0, 1 or anything negative (a process group, init, every process) is refused.
#![allow(
    unsafe_code,
    reason = "kill(2) and prlimit(2) have no safe wrapper in std; PIDs are checked first"
)]

use std::io;

pub use libc::{SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, c_int};

/// `pid` as a `pid_t` that addresses exactly one process: not 0 (the caller's process
/// group), 1 (init), nor anything that does not fit (negative: a process group, or
/// -1: every process).
fn one_process(pid: u32, what: &str) -> io::Result<libc::pid_t> {
    libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to {what} pid {pid}"),
            )
        })
}

/// Sends `signal` to the single process `pid`.
///
/// # Errors
///
/// `InvalidInput` for a PID that would address more than one process (0, 1, or one that
/// does not fit `pid_t`); otherwise the `kill(2)` error (`ESRCH` if it is gone).
pub fn send_signal(pid: u32, signal: c_int) -> io::Result<()> {
    let pid = one_process(pid, "signal")?;
    // SAFETY: kill(2) takes two integers and shares no memory with us; a positive PID
    // (checked above) addresses exactly one process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the soft `RLIMIT_NOFILE` of the single process `pid` (a child under test) to
/// `soft`, its hard limit kept; returns the soft limit it had. Lowered below the
/// descriptors it has open, its next `accept` or `open` fails with `EMFILE`.
///
/// # Errors
///
/// `InvalidInput` for a PID that would address more than one process (as
/// [`send_signal`]); otherwise the `prlimit(2)` error.
pub fn set_open_files_limit(pid: u32, soft: u64) -> io::Result<u64> {
    let pid = one_process(pid, "limit")?;
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit(2) only writes the process's limits into `old`, which outlives
    // the call; a positive PID (checked above) addresses exactly one process.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let new = libc::rlimit {
        rlim_cur: soft.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above; prlimit(2) only reads `new`.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(old.rlim_cur)
}

/// Whether `pid` is a running process (not gone, not a zombie waiting to be reaped).
pub fn is_running(pid: u32) -> bool {
    match proc_stat(pid) {
        Some((state, _)) => state != 'Z' && state != 'X',
        None => false,
    }
}

/// PIDs of the running processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(
            |child| matches!(proc_stat(*child), Some((state, ppid)) if ppid == pid && state != 'Z'),
        )
        .collect()
}

/// State letter and parent PID from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}
