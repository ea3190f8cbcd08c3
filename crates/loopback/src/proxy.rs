//! A TCP proxy for loopback HTTP that behaves like a bad network: it caps bandwidth, adds
//! latency, and injects faults into chosen requests (connection resets, stalls, truncated or
//! corrupted bodies, HTTP 500/503/429, ignored Range headers, whole outages).
//!
//! It understands HTTP/1.1 framing only as far as needed to tell requests apart on a kept-alive
//! connection, so faults apply per request, not per connection. Bandwidth is one shared link
//! (all connections together); latency is added once per request and once per new connection,
//! i.e. it acts as an added round-trip time. It runs on its own thread, so tests may block.
//!
//! Why one file of this size: one request loop, whose faults act on the byte stream it forwards.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::background::{self, Background};
use crate::http_wire::{Conn, Framing, Head, chunk_size};

/// How long a link must have been idle before its schedule restarts from now (shorter gaps are
/// timer slack, not idleness).
const IDLE_LINK: Duration = Duration::from_millis(5);
/// Bandwidth and latency of the simulated link.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shaping {
    /// Bytes per second from the server to the client (all connections together); `None` is
    /// unlimited.
    pub bytes_per_second: Option<u64>,
    /// Added round-trip time per request and per new connection.
    pub latency: Duration,
}

impl Shaping {
    /// A link of `mbit` megabits per second with `latency_ms` added round-trip time.
    pub fn link(mbit: u64, latency_ms: u64) -> Self {
        Shaping {
            bytes_per_second: Some(mbit * 1_000_000 / 8),
            latency: Duration::from_millis(latency_ms),
        }
    }
}

/// What goes wrong with a request that a [`Rule`] matches. Byte offsets count response body
/// bytes (after the head).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status (and `Retry-After` seconds) without asking the server.
    Status { code: u16, retry_after: Option<u64> },
    /// Reset the connection (RST) instead of answering.
    ResetBeforeResponse,
    /// Send the head and `after` body bytes, then reset the connection.
    ResetAfter { after: u64 },
    /// Send the head and `after` body bytes, then close the connection cleanly.
    TruncateAfter { after: u64 },
    /// Send the head and `after` body bytes, then send nothing for `pause` (forever if
    /// `None`) before going on.
    StallAfter { after: u64, pause: Option<Duration> },
    /// Send `after` body bytes, wait `pause`, then reset (a transfer that dies late).
    PauseThenReset { after: u64, pause: Duration },
    /// Flip the bits of body byte `at`.
    CorruptAt { at: u64 },
    /// Remove the Range header, so the server answers 200 with the whole blob.
    IgnoreRange,
}

/// When to inject a [`Fault`]: requests matching the method and path filters, a number of times.
#[derive(Clone, Debug)]
pub struct Rule {
    pub fault: Fault,
    pub method: Option<String>,
    pub path_contains: Option<String>,
    /// How many matching requests get the fault; `None` is every one.
    pub times: Option<u32>,
}

impl Rule {
    /// The fault, once, on the next request.
    pub fn new(fault: Fault) -> Self {
        Rule {
            fault,
            method: None,
            path_contains: None,
            times: Some(1),
        }
    }

    /// Only requests whose path contains `fragment` (e.g. `/blobs/`).
    pub fn on_path(mut self, fragment: &str) -> Self {
        self.path_contains = Some(fragment.to_string());
        self
    }

    /// Only requests with this method.
    pub fn on_method(mut self, method: &str) -> Self {
        self.method = Some(method.to_string());
        self
    }

    /// The first `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    /// Every matching request.
    pub fn always(mut self) -> Self {
        self.times = None;
        self
    }

    fn matches(&self, method: &str, target: &str) -> bool {
        self.times != Some(0)
            && self.method.as_deref().is_none_or(|m| m == method)
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| target.contains(p))
    }
}

/// One request that went through the proxy.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: String,
    pub target: String,
    /// The status the client saw (0 if none: reset or truncated head).
    pub status: u16,
    pub fault: Option<Fault>,
    /// The request's Range header, if it had one (a whole-blob download has none).
    pub range: Option<String>,
}

struct Shared {
    upstream: SocketAddr,
    rules: Mutex<Vec<Rule>>,
    shaping: Mutex<Shaping>,
    /// When the shared link is next free (bandwidth accounting).
    link_free_at: Mutex<Instant>,
    log: Mutex<Vec<Exchange>>,
    down: AtomicBool,
    /// Bytes passed from the server to clients.
    sent: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _server: Background,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 (a free port) in front of `upstream`, on its own thread.
    pub fn start(upstream: SocketAddr, shaping: Shaping) -> io::Result<FaultProxy> {
        Self::start_on("127.0.0.1:0".parse().expect("address"), upstream, shaping)
    }

    /// Starts a proxy listening on `listen`.
    pub fn start_on(
        listen: SocketAddr,
        upstream: SocketAddr,
        shaping: Shaping,
    ) -> io::Result<FaultProxy> {
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            rules: Mutex::new(Vec::new()),
            shaping: Mutex::new(shaping),
            link_free_at: Mutex::new(Instant::now()),
            sent: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        let server = background::spawn("fault-proxy", move |_stop| async move {
            let Ok(listener) = TcpListener::from_std(listener) else {
                return;
            };
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_connection(accept_shared.clone(), client));
            }
        })?;
        Ok(FaultProxy {
            addr,
            shared,
            _server: server,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, as used in image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Adds a fault rule; rules are tried in the order added.
    pub fn add_rule(&self, rule: Rule) {
        self.shared.rules.lock().expect("rules").push(rule);
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.shared.rules.lock().expect("rules").clear();
    }

    /// Changes bandwidth and latency from now on.
    pub fn set_shaping(&self, shaping: Shaping) {
        *self.shared.shaping.lock().expect("shaping") = shaping;
    }

    /// Simulates an outage: while down, every connection is reset.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Bytes passed from the server to clients so far (what a benchmark counts as fetched).
    pub fn bytes_sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Every request seen so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.shared.log.lock().expect("log").clone()
    }

    /// How many requests got a fault.
    pub fn faults_injected(&self) -> usize {
        self.exchanges()
            .iter()
            .filter(|e| e.fault.is_some())
            .count()
    }
}

impl Shared {
    fn take_fault(&self, method: &str, target: &str) -> Option<Fault> {
        let mut rules = self.rules.lock().expect("rules");
        let rule = rules.iter_mut().find(|r| r.matches(method, target))?;
        if let Some(times) = rule.times.as_mut() {
            *times -= 1;
        }
        Some(rule.fault.clone())
    }

    fn shaping(&self) -> Shaping {
        *self.shaping.lock().expect("shaping")
    }

    fn record(&self, head: &Head, status: u16, fault: Option<Fault>) {
        let (method, target) = head.method_and_target();
        self.log.lock().expect("log").push(Exchange {
            method,
            target,
            status,
            fault,
            range: head.header("range").map(str::to_string),
        });
    }

    /// Waits until the shared link has carried `n` more bytes at the configured rate.
    async fn pace(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        let Some(rate) = self.shaping().bytes_per_second else {
            return;
        };
        let now = Instant::now();
        let done_at = {
            let mut free_at = self.link_free_at.lock().expect("link");
            // A link idle for more than a moment starts afresh; otherwise the schedule goes on
            // from where it was, so that timer wake-ups (1 ms granularity, often late) do not
            // add up into a slower link than configured.
            let start = if *free_at + IDLE_LINK < now {
                now
            } else {
                *free_at
            };
            *free_at = start + Duration::from_secs_f64(n as f64 / rate as f64);
            *free_at
        };
        if done_at > now + Duration::from_millis(1) {
            tokio::time::sleep_until(done_at).await;
        }
    }
}

/// Resets a TCP connection (RST instead of FIN).
fn reset(conn: Conn) {
    let _ = conn.stream.set_zero_linger();
    drop(conn);
}

async fn serve_connection(shared: Arc<Shared>, client: TcpStream) {
    let _ = client.set_nodelay(true);
    let mut client = Conn::new(client);
    if shared.down.load(Ordering::SeqCst) {
        return reset(client);
    }
    tokio::time::sleep(shared.shaping().latency).await;
    let mut upstream: Option<Conn> = None;
    loop {
        let Ok(Some(mut request)) = client.read_head().await else {
            return;
        };
        if shared.down.load(Ordering::SeqCst) {
            shared.record(&request, 0, None);
            return reset(client);
        }
        let (method, target) = request.method_and_target();
        let fault = shared.take_fault(&method, &target);
        // A request without a length or chunked encoding has no body.
        let request_framing = match request.body_framing() {
            Framing::UntilClose => Framing::Length(0),
            framing => framing,
        };
        match &fault {
            Some(Fault::Status { code, retry_after }) => {
                let _ = client.discard_body(request_framing).await;
                let body = format!(
                    r#"{{"errors":[{{"code":"UNAVAILABLE","message":"injected HTTP {code}"}}]}}"#
                );
                let mut answer = format!(
                    "HTTP/1.1 {code} Injected\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                if let Some(seconds) = retry_after {
                    answer.push_str(&format!("Retry-After: {seconds}\r\n"));
                }
                answer.push_str("\r\n");
                answer.push_str(&body);
                tokio::time::sleep(shared.shaping().latency).await;
                let _ = client.write_all(answer.as_bytes()).await;
                shared.record(&request, *code, fault.clone());
                return;
            }
            Some(Fault::ResetBeforeResponse) => {
                let _ = client.discard_body(request_framing).await;
                shared.record(&request, 0, fault.clone());
                return reset(client);
            }
            Some(Fault::IgnoreRange) => request.remove("range"),
            _ => {}
        }
        if upstream.is_none() {
            match TcpStream::connect(shared.upstream).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    upstream = Some(Conn::new(stream));
                }
                Err(_) => {
                    shared.record(&request, 0, fault.clone());
                    return reset(client);
                }
            }
        }
        let server = upstream.as_mut().expect("connected above");
        tokio::time::sleep(shared.shaping().latency).await;
        if server.write_all(&request.to_bytes()).await.is_err()
            || copy_body(&mut client, server, request_framing, &shared, None)
                .await
                .is_err()
        {
            shared.record(&request, 0, fault.clone());
            return;
        }
        let Ok(Some(response)) = server.read_head().await else {
            shared.record(&request, 0, fault.clone());
            return;
        };
        let status = response.status();
        shared.record(&request, status, fault.clone());
        let head = response.to_bytes();
        shared.pace(head.len()).await;
        if client.write_all(&head).await.is_err() {
            return;
        }
        let no_body = method == "HEAD" || status == 204 || status == 304 || status < 200;
        let framing = if no_body {
            Framing::Length(0)
        } else {
            response.body_framing()
        };
        match copy_body(server, &mut client, framing, &shared, fault.as_ref()).await {
            Ok(BodyEnd::Complete) => {}
            Ok(BodyEnd::Close) | Err(_) => return,
            Ok(BodyEnd::Reset) => return reset(client),
        }
        if framing == Framing::UntilClose || response.wants_close() || request.wants_close() {
            return;
        }
    }
}

enum BodyEnd {
    Complete,
    Close,
    Reset,
}

/// Copies one message body from `from` to `to`, paced by the link and with `fault` applied to
/// its bytes.
async fn copy_body(
    from: &mut Conn,
    to: &mut Conn,
    framing: Framing,
    shared: &Shared,
    fault: Option<&Fault>,
) -> io::Result<BodyEnd> {
    let mut sink = FaultySink {
        to,
        shared,
        fault,
        sent: 0,
    };
    match framing {
        Framing::Length(len) => {
            if let Some(end) = forward_exact(from, &mut sink, len).await? {
                return Ok(end);
            }
        }
        Framing::Chunked => loop {
            let line = from.read_line().await?;
            let size = chunk_size(&line)?;
            if let Some(end) = sink.send(line).await? {
                return Ok(end);
            }
            if size == 0 {
                loop {
                    let trailer = from.read_line().await?;
                    let last = trailer == b"\r\n";
                    if let Some(end) = sink.send(trailer).await? {
                        return Ok(end);
                    }
                    if last {
                        return Ok(BodyEnd::Complete);
                    }
                }
            }
            // The chunk's data and its CRLF.
            if let Some(end) = forward_exact(from, &mut sink, size + 2).await? {
                return Ok(end);
            }
        },
        Framing::UntilClose => loop {
            let data = from.read_some(16 << 10).await?;
            if data.is_empty() {
                return Ok(BodyEnd::Close);
            }
            if let Some(end) = sink.send(data).await? {
                return Ok(end);
            }
        },
    }
    Ok(BodyEnd::Complete)
}

/// Forwards exactly `len` bytes; returns how the body ends early, if the fault ends it.
async fn forward_exact(
    from: &mut Conn,
    sink: &mut FaultySink<'_>,
    mut len: u64,
) -> io::Result<Option<BodyEnd>> {
    while len > 0 {
        let data = from.read_some(len.min(16 << 10) as usize).await?;
        if data.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        len -= data.len() as u64;
        if let Some(end) = sink.send(data).await? {
            return Ok(Some(end));
        }
    }
    Ok(None)
}

/// Writes body bytes to the client, applying a fault at its byte offset.
struct FaultySink<'a> {
    to: &'a mut Conn,
    shared: &'a Shared,
    fault: Option<&'a Fault>,
    sent: u64,
}

impl FaultySink<'_> {
    /// Sends `data`; returns how the body ends early, if the fault ends it.
    async fn send(&mut self, mut data: Vec<u8>) -> io::Result<Option<BodyEnd>> {
        let start = self.sent;
        let end = start + data.len() as u64;
        let len = data.len();
        let cut = |after: u64| (after.saturating_sub(start) as usize).min(len);
        match self.fault {
            Some(Fault::CorruptAt { at }) if (start..end).contains(at) => {
                data[(at - start) as usize] ^= 0xff;
            }
            Some(Fault::ResetAfter { after }) if end > *after => {
                let n = cut(*after);
                self.write(&data[..n]).await?;
                return Ok(Some(BodyEnd::Reset));
            }
            Some(Fault::TruncateAfter { after }) if end > *after => {
                let n = cut(*after);
                self.write(&data[..n]).await?;
                return Ok(Some(BodyEnd::Close));
            }
            Some(Fault::PauseThenReset { after, pause }) if end > *after => {
                let n = cut(*after);
                self.write(&data[..n]).await?;
                tokio::time::sleep(*pause).await;
                return Ok(Some(BodyEnd::Reset));
            }
            Some(Fault::StallAfter { after, pause })
                if (start..end).contains(after) || (start == end && start == *after) =>
            {
                let n = cut(*after);
                self.write(&data[..n]).await?;
                match pause {
                    Some(pause) => tokio::time::sleep(*pause).await,
                    None => std::future::pending::<()>().await,
                }
                self.write(&data[n..]).await?;
                return Ok(None);
            }
            _ => {}
        }
        self.write(&data).await?;
        Ok(None)
    }

    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        for piece in data.chunks(16 << 10) {
            self.shared.pace(piece.len()).await;
            self.to.write_all(piece).await?;
        }
        self.sent += data.len() as u64;
        Ok(())
    }
}
