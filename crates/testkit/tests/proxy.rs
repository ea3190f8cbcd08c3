//! The proxy must shape and fault what it is told to, or the benchmarks and reliability tests
//! built on it measure nothing. Timing checks here are lower bounds only (a slow machine passes).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use lazylayer_testkit::proxy::{Fault, FaultProxy, Rule, Shaping};

/// A tiny HTTP server answering every request with `body`, keep-alive.
fn serve(body: Vec<u8>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let body = body.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut byte = [0u8; 1];
                loop {
                    buf.clear();
                    while !buf.ends_with(b"\r\n\r\n") {
                        if stream.read(&mut byte).unwrap_or(0) == 0 {
                            return;
                        }
                        buf.push(byte[0]);
                    }
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    if stream.write_all(head.as_bytes()).is_err()
                        || stream.write_all(&body).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `requests` GETs on one connection; returns the bodies (or the error that ended it).
fn get(addr: std::net::SocketAddr, requests: usize) -> std::io::Result<Vec<Vec<u8>>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut bodies = Vec::new();
    for _ in 0..requests {
        stream.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let len: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map(|v| v.trim().parse().unwrap())
            .unwrap();
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body)?;
        bodies.push(body);
    }
    Ok(bodies)
}

#[test]
fn bandwidth_and_latency_are_applied() {
    let body = vec![42u8; 2_000_000];
    let upstream = serve(body.clone());
    // 40 Mbit/s = 5 MB/s: 2 MB twice takes at least 0.8 s; 4 requests add 4 x 100 ms latency.
    let proxy = FaultProxy::start(upstream, Shaping::link(40, 100)).unwrap();
    let started = Instant::now();
    let bodies = get(proxy.addr(), 2).unwrap();
    assert!(bodies.iter().all(|b| *b == body));
    assert!(
        started.elapsed() >= Duration::from_millis(750),
        "{:?}",
        started.elapsed()
    );
    // Shaping changes on the fly: no bandwidth cap, 100 ms per connection and per request.
    proxy.set_shaping(Shaping {
        bytes_per_second: None,
        latency: Duration::from_millis(100),
    });
    let started = Instant::now();
    get(proxy.addr(), 4).unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "connection + 4 requests: {:?}",
        started.elapsed()
    );
}

#[test]
fn a_fast_link_is_not_slowed_by_timer_granularity() {
    // 400 Mbit/s = 50 MB/s: 16 MB takes 0.32 s. Sleeping after every 16 KiB piece with
    // millisecond timers would cap the link near 16 MB/s (1 s or more).
    let body = vec![7u8; 16_000_000];
    let proxy = FaultProxy::start(serve(body.clone()), Shaping::link(400, 0)).unwrap();
    let started = Instant::now();
    let bodies = get(proxy.addr(), 1).unwrap();
    let elapsed = started.elapsed();
    assert!(bodies[0] == body);
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(700),
        "16 MB at 400 Mbit/s took {elapsed:?}"
    );
}

#[test]
fn faults_hit_the_requests_they_name() {
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let proxy = FaultProxy::start(serve(body.clone()), Shaping::default()).unwrap();
    proxy.add_rule(Rule::new(Fault::CorruptAt { at: 500 }).times(1));
    let bodies = get(proxy.addr(), 2).unwrap();
    assert_eq!(bodies[0][500], body[500] ^ 0xff);
    assert_eq!(bodies[0][..500], body[..500]);
    assert_eq!(bodies[1], body, "only the first request was corrupted");

    proxy.add_rule(Rule::new(Fault::TruncateAfter { after: 1000 }));
    assert!(get(proxy.addr(), 1).is_err(), "truncated body");
    proxy.add_rule(Rule::new(Fault::ResetAfter { after: 10 }));
    assert!(get(proxy.addr(), 1).is_err(), "reset");
    proxy.add_rule(Rule::new(Fault::Status {
        code: 503,
        retry_after: Some(7),
    }));
    let mut stream = TcpStream::connect(proxy.addr()).unwrap();
    stream
        .write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("Retry-After: 7"),
        "{answer}"
    );
    assert_eq!(get(proxy.addr(), 1).unwrap()[0], body, "rules are used up");
    let statuses: Vec<u16> = proxy.exchanges().iter().map(|e| e.status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 200, 503, 200]);
    assert_eq!(proxy.faults_injected(), 4);

    proxy.set_down(true);
    assert!(get(proxy.addr(), 1).is_err(), "outage");
    proxy.set_down(false);
    assert!(get(proxy.addr(), 1).is_ok(), "back up");
}
