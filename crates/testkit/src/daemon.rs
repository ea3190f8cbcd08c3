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

/// Stops a `lazylayer serve` the test spawned, once the test is done with its layers: SIGTERM
/// twice (told once, a daemon first fills and detaches its lazy layers, which can take the
/// rest of an image from the shared registry; told again, it stops now), then SIGKILL if it
/// has not exited within 10 s.
pub fn stop(child: &mut Child) {
    signal(child.id() as i32, libc::SIGTERM);
    // The second signal counts once the first has been taken in.
    std::thread::sleep(Duration::from_millis(100));
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

/// Kills both processes of the daemon `lazylayer status --json` described (if it was running)
/// and waits (up to 5 s) until they are gone. Not SIGTERM: a daemon told to stop once fills
/// and detaches its lazy layers first, and would share the link with what runs next.
pub fn kill_from_status(status: &serde_json::Value) {
    if status["daemon_running"] != true {
        return;
    }
    let pids: Vec<i32> = ["pid", "worker_pid"]
        .iter()
        .map(|key| status[key].as_i64().unwrap_or(0) as i32)
        .filter(|&pid| pid > 0)
        .collect();
    for &pid in &pids {
        signal(pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a process that has not been reaped and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: `Z` for a zombie.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
