//! The signals holdfast acts on, held (blocked) from the first moments of `run` and
//! `proxy` until [`super::run`] has its handlers in place. Until then each would take
//! its default action and kill the process: SIGHUP and SIGUSR2 too, and the start
//! (reading the config, binding, resolving upstream names) can take seconds with a slow
//! resolver, while `systemctl kill -s HUP` or `pkill -HUP holdfast` signals every
//! holdfast, a successor still starting included. A blocked signal waits, pending, and
//! [`release`] takes it. The only `unsafe` here is the libc calls on a `sigset_t`.

#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use libc::c_int;

/// What holdfast acts on (see the table in `process.rs`).
const HELD: [c_int; 5] = [
    libc::SIGTERM,
    libc::SIGQUIT,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR2,
];

fn set_of(signals: &[c_int]) -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given; sigaddset takes an
    // initialised one and a valid signal number.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        let mut set = set.assume_init();
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// The signals [`hold`] blocks, as a set: a process started by one of our threads
/// inherits the mask, and `server::inherit` unblocks these in the new binary.
pub fn set() -> libc::sigset_t {
    set_of(&HELD)
}

/// Blocks the signals holdfast acts on in the calling thread and so in every thread it
/// starts afterwards (the runtime's, which keep them blocked: [`release`] unblocks them
/// only in the thread that runs `process::run`, which the handlers are then delivered
/// to). Call first thing in `main`, before any thread starts. A process started from
/// one of these threads inherits the mask: see [`set`].
pub fn hold() {
    let set = set_of(&HELD);
    // SAFETY: a valid, initialised set; the old mask is not asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Takes each held signal that arrived since [`hold`] (once: a standard signal pending
/// twice is pending once), then unblocks them in the calling thread, so that from now
/// on they reach the handlers, which must be installed already. Without [`hold`]
/// before, returns nothing.
pub fn release() -> Vec<c_int> {
    let mut arrived = Vec::new();
    let mut pending = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigpending fills the set it is given.
    let pending = unsafe {
        libc::sigemptyset(pending.as_mut_ptr());
        libc::sigpending(pending.as_mut_ptr());
        pending.assume_init()
    };
    for s in HELD {
        // SAFETY: an initialised set and a valid signal number.
        if unsafe { libc::sigismember(&pending, s) } != 1 {
            continue;
        }
        let one = set_of(&[s]);
        let mut got: c_int = 0;
        // SAFETY: a valid set and a place for the number. It is pending and blocked in
        // every thread, so no other thread takes it: this returns at once.
        if unsafe { libc::sigwait(&one, &mut got) } == 0 {
            arrived.push(got);
        }
    }
    let set = set_of(&HELD);
    // SAFETY: a valid, initialised set.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    arrived
}

/// A held signal's name, for the log.
pub fn name(signal: c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR2 => "SIGUSR2",
        _ => "signal",
    }
}
