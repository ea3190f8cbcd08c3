//! Stopping the lazylayer daemons tests start. The daemon is two processes (holder and worker,
//! see `lazylayer serve --help`), and a worker outlives a holder killed with SIGKILL on purpose:
//! a test that only kills the holder would leave the worker running, holding its loop
//! filesystem and the test's output pipe.

use std::process::Child;
use std::time::{Duration, Instant};

fn signal(pid: i32, signal: i32) {
    if pid > 0 {
        // SAFETY: sending a signal to a process id has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Stops a `lazylayer serve` the test spawned: SIGTERM (the holder stops its worker, then
/// itself), then SIGKILL if it has not exited within 10 s.
pub fn stop(child: &mut Child) {
    signal(child.id() as i32, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills both processes of the daemon `lazylayer status --json` described (if it was running).
pub fn kill_from_status(status: &serde_json::Value) {
    if status["daemon_running"] != true {
        return;
    }
    for key in ["pid", "worker_pid"] {
        signal(status[key].as_i64().unwrap_or(0) as i32, libc::SIGKILL);
    }
}
