//! The php-fpm fixture itself: both addresses accept, restart and reload keep them,
//! and every process it started is gone after drop. (What php-fpm does with FastCGI
//! is tested through holdfast in `crates/holdfast/tests/fastcgi.rs`.)

use std::time::Duration;

use holdfast_test::{PhpFpm, PhpFpmOptions, sys};
use tokio::net::{TcpStream, UnixStream};

#[tokio::test]
async fn php_fpm_listens_restarts_reloads_and_stops_by_pid() {
    let mut fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 1,
        process_control_timeout: Duration::from_secs(1),
        ..PhpFpmOptions::default()
    })
    .await;
    let (addr, socket) = (fpm.addr(), fpm.socket_path().to_owned());
    TcpStream::connect(addr).await.expect("tcp pool accepts");
    UnixStream::connect(&socket)
        .await
        .expect("unix pool accepts");
    assert_eq!(fpm.workers().len(), 2, "one worker per pool");
    let script = fpm.script("a/b.php", "<?php echo 1;");
    assert!(script.starts_with(fpm.www()) && script.is_file());

    let first = fpm.pid();
    fpm.restart().await;
    assert_ne!(fpm.pid(), first, "a new master");
    assert!(!sys::is_running(first), "the old master is gone");
    assert_eq!((fpm.addr(), fpm.socket_path()), (addr, socket.as_path()));
    TcpStream::connect(addr)
        .await
        .expect("tcp pool accepts again");

    let before = fpm.workers();
    fpm.reload().await;
    let after = fpm.workers();
    assert_eq!(after.len(), 2);
    assert!(
        after.iter().all(|w| !before.contains(w)),
        "workers replaced"
    );

    let mut pids = fpm.workers();
    pids.push(fpm.pid());
    drop(fpm);
    for pid in pids {
        assert!(!sys::is_running(pid), "{pid} still runs after drop");
    }
}
