//! Talking to the daemon, and starting it when nobody answers.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::protocol::{Request, Response};

/// Sends one request to the daemon serving `socket`.
pub async fn request(socket: &Path, request: &Request) -> std::io::Result<Response> {
    let stream = UnixStream::connect(socket).await?;
    let (reader, mut writer) = stream.into_split();
    let mut line = serde_json::to_string(request).expect("request serialises");
    line.push('\n');
    // A daemon that turns the connection away answers before reading, then closes: the
    // request may not get through (EPIPE) while the answer is already there to read.
    let written = writer.write_all(line.as_bytes()).await;
    let mut answer = String::new();
    let read = BufReader::new(reader).read_line(&mut answer).await;
    if answer.is_empty() {
        written?;
        read?;
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without answering",
        ));
    }
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

/// A duplicate of the daemon's fanotify group fd (for a keeper: see `crate::keeper`).
pub fn group_fd(socket: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(&Request::GroupFd).expect("request serialises");
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = [0u8; 4096];
    let (fd, _) = crate::keeper::recv_fd(std::os::fd::AsFd::as_fd(&stream), &mut answer)?;
    Ok(fd)
}

/// Whether a daemon answers on `socket`.
pub async fn is_running(socket: &Path) -> bool {
    UnixStream::connect(socket).await.is_ok()
}

/// What [`ensure_running`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    /// A daemon answers on the socket.
    Answering,
    /// The daemon started and left cleanly before it answered: it found no lazy layer to
    /// serve (a worker looks for idleness a second after it starts, so this is rare).
    ExitedIdle,
}

/// Starts `exe serve --exit-when-idle` for `root` in the background (its own session, logging
/// to `root/serve.log`) unless one answers already, and waits until it does or leaves.
pub async fn ensure_running(
    root: &Path,
    socket: &Path,
    exe: &Path,
    extra_args: &[String],
) -> std::io::Result<Started> {
    if is_running(socket).await {
        return Ok(Started::Answering);
    }
    std::fs::create_dir_all(root)?;
    let log_path = lazylayer_store::Store::new(root).serve_log();
    // The log names images and files: root's, whatever the umask (and tightened if older).
    let log = std::os::unix::fs::OpenOptionsExt::mode(
        std::fs::OpenOptions::new().create(true).append(true),
        0o600,
    )
    .open(&log_path)?;
    std::fs::set_permissions(
        &log_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("--root")
        .arg(root)
        .arg("serve")
        .arg("--exit-when-idle")
        .args(extra_args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no Rust state; the daemon gets its own
    // session so that it outlives the command that started it and its terminal.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    // A daemon answers some 20-40 ms after it starts: look often at first (each look is one
    // connect), then every 50 ms.
    let mut pause = Duration::from_millis(2);
    while Instant::now() < deadline {
        if is_running(socket).await {
            return Ok(Started::Answering);
        }
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(Started::ExitedIdle);
            }
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(std::io::Error::other(format!(
                "lazylayer serve exited ({status}): {}",
                last.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Err(std::io::Error::other(
        "lazylayer serve did not start within 20 s (see serve.log under the root)",
    ))
}
