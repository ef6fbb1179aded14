//! Child processes: config in a temp dir, captured output, signals and exit by PID.

use std::path::Path;
use std::time::Duration;

use holdfast_test::{HoldfastProcess, read_pid_file, sys, wait_until};

const SH: &str = "/bin/sh";

#[tokio::test]
async fn config_is_written_and_output_captured() {
    let mut p = HoldfastProcess::spawn(
        Path::new(SH),
        &[
            "-c",
            "echo config at $1; cat \"$1\"; echo oops >&2",
            "sh",
            "{config}",
        ],
        Some("listen = \"127.0.0.1:0\"\npid_file = \"{dir}/holdfast.pid\"\n"),
    );
    let status = p
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("sh exits");
    assert!(status.success());
    assert!(p.wait_for_log("oops", Duration::from_secs(5)).await);
    let logs = p.logs();
    let config = p.config_path().unwrap().display().to_string();
    assert!(logs.contains(&format!("config at {config}")), "{logs}");
    assert!(
        logs.contains(&format!(
            "pid_file = \"{}/holdfast.pid\"",
            p.dir().display()
        )),
        "{logs}"
    );
}

#[tokio::test]
async fn signal_and_wait_exit() {
    let mut p = HoldfastProcess::spawn(
        Path::new(SH),
        &[
            "-c",
            "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
        ],
        None,
    );
    assert!(p.wait_for_log("ready", Duration::from_secs(5)).await);
    p.signal(sys::SIGTERM).unwrap();
    let status = p
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits on TERM");
    assert_eq!(status.code(), Some(3));
    assert!(p.logs().contains("got TERM"));
    assert!(p.signal(sys::SIGTERM).is_err(), "no signal to a reaped pid");
}

#[tokio::test]
async fn drop_kills_by_pid() {
    let p = HoldfastProcess::spawn(Path::new("/bin/sleep"), &["30"], None);
    let pid = p.pid();
    assert!(sys::is_running(pid));
    drop(p);
    assert!(!sys::is_running(pid));
}

#[tokio::test]
async fn pid_files_are_polled() {
    let p = HoldfastProcess::spawn(
        Path::new(SH),
        &[
            "-c",
            "sleep 0.1; echo $$ > {dir}/tmp.pid; mv {dir}/tmp.pid {dir}/x.pid; exec sleep 30",
        ],
        None,
    );
    let pid_file = p.dir().join("x.pid");
    assert_eq!(read_pid_file(&pid_file), None);
    assert!(
        wait_until(Duration::from_secs(10), || read_pid_file(&pid_file)
            .is_some())
        .await
    );
    assert_eq!(read_pid_file(&pid_file), Some(p.pid()));
    assert!(!wait_until(Duration::from_millis(20), || false).await);
}
