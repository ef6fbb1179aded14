//! How many bytes written to a TCP socket the peer has not acknowledged yet
//! (`SIOCOUTQ`, Linux): the one question about a socket that neither socket2 nor
//! rustix asks, so it is asked here, with `libc::ioctl`.

#![allow(unsafe_code)] // one ioctl that writes a c_int

use std::io;
use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

/// Bytes in the socket's send queue: written and not yet acknowledged by the peer
/// (sent or not). A reset empties the queue, after setting the socket's error.
pub(super) fn unacked_bytes(s: &TcpStream) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ's number) writes one c_int through the pointer,
    // which points at a live, aligned c_int; the descriptor is the stream's own,
    // open for the length of the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &raw mut n) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}
