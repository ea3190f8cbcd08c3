//! Servers on loopback (the layout registry, the proxy, the test kit's token issuer) run on
//! their own thread and runtime, so that their caller may block (on a child process, say)
//! while they keep answering.

use std::future::Future;
use std::thread::JoinHandle;

use tokio_util::sync::CancellationToken;

/// A server running on its own thread; stopped and joined when dropped.
pub struct Background {
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

/// Runs the future `make(stop)` on a new thread with a single-threaded runtime, until it
/// returns or `stop` is cancelled.
pub fn spawn<F, Fut>(name: &str, make: F) -> std::io::Result<Background>
where
    F: FnOnce(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let stop = CancellationToken::new();
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("test server runtime");
            let cancelled = thread_stop.clone();
            runtime.block_on(async move {
                tokio::select! {
                    _ = cancelled.cancelled() => {}
                    _ = make(thread_stop) => {}
                }
            });
        })?;
    Ok(Background {
        stop,
        thread: Some(thread),
    })
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
