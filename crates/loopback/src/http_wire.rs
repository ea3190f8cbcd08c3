//! Just enough HTTP/1.1 framing for the proxy and the token issuer: message heads, bodies by
//! Content-Length or chunked encoding, over a TCP stream with a read buffer.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_HEAD: usize = 64 << 10;

/// A request or response head: the first line and the headers, with the raw bytes.
#[derive(Clone, Debug)]
pub struct Head {
    pub first_line: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    fn parse(raw: &[u8]) -> io::Result<Head> {
        let text = String::from_utf8_lossy(raw);
        let mut lines = text.split("\r\n");
        let first_line = lines.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad header line"))?;
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
        Ok(Head {
            first_line,
            headers,
        })
    }

    /// The first value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Removes every header called `name`.
    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    /// The head as bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.first_line.clone().into_bytes();
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Request method and target, from a request line.
    pub fn method_and_target(&self) -> (String, String) {
        let mut parts = self.first_line.split(' ');
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        (method, target)
    }

    /// Response status, from a status line.
    pub fn status(&self) -> u16 {
        self.first_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// How the body that follows is framed.
    pub fn body_framing(&self) -> Framing {
        if self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked
        } else if let Some(len) = self.header("content-length").and_then(|v| v.parse().ok()) {
            Framing::Length(len)
        } else {
            Framing::UntilClose
        }
    }

    /// Whether either side asked to close the connection after this message.
    pub fn wants_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// A TCP stream with a read-ahead buffer.
pub struct Conn {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Self {
        Conn {
            stream,
            buf: BytesMut::with_capacity(16 << 10),
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 << 10];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads a message head; `None` on a clean end of stream before any byte of it. A stream
    /// that does not start as HTTP does (a method or `HTTP/`) fails at once: a client trying
    /// TLS first (podman with `--tls-verify=false`) must see the connection close, not wait
    /// for a head that never comes.
    pub async fn read_head(&mut self) -> io::Result<Option<Head>> {
        loop {
            if self.buf.first().is_some_and(|b| !b.is_ascii_alphabetic()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not HTTP (a TLS handshake?)",
                ));
            }
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let raw = self.buf.split_to(end + 4);
                return Head::parse(&raw[..end]).map(Some);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
            }
            if self.fill().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    /// Reads one line, CRLF included.
    pub async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                return Ok(self.buf.split_to(end + 2).to_vec());
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads up to `max` bytes; empty at end of stream.
    pub async fn read_some(&mut self, max: usize) -> io::Result<Vec<u8>> {
        if self.buf.is_empty() && self.fill().await? == 0 {
            return Ok(Vec::new());
        }
        let n = max.min(self.buf.len());
        let out = self.buf[..n].to_vec();
        self.buf.advance(n);
        Ok(out)
    }

    /// Writes everything.
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data).await
    }

    /// Reads and forgets a body framed by `framing` (used when answering without forwarding).
    pub async fn discard_body(&mut self, framing: Framing) -> io::Result<()> {
        match framing {
            Framing::Length(len) => self.discard(len).await,
            Framing::Chunked => loop {
                let line = self.read_line().await?;
                let size = chunk_size(&line)?;
                if size == 0 {
                    while self.read_line().await? != b"\r\n" {}
                    return Ok(());
                }
                self.discard(size + 2).await?;
            },
            // Requests without a length have no body.
            Framing::UntilClose => Ok(()),
        }
    }

    async fn discard(&mut self, mut len: u64) -> io::Result<()> {
        while len > 0 {
            let data = self.read_some(len.min(64 << 10) as usize).await?;
            if data.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            len -= data.len() as u64;
        }
        Ok(())
    }
}

/// Parses the size of a chunk from its size line.
pub fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let text = String::from_utf8_lossy(line);
    let hex = text.trim().split(';').next().unwrap_or("").trim();
    u64::from_str_radix(hex, 16)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn conn_reading(bytes: &'static [u8]) -> Conn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(bytes).await.unwrap();
            // Keep the connection open, as a client waiting for an answer does.
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        });
        Conn::new(listener.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn a_tls_handshake_is_refused_at_once() {
        // The start of a TLS ClientHello record: no CRLF CRLF ever follows.
        let mut conn = conn_reading(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read_head())
            .await
            .expect("read_head answered without waiting for more bytes");
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn an_http_request_is_read() {
        let mut conn = conn_reading(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let head = conn.read_head().await.unwrap().unwrap();
        assert_eq!(
            head.method_and_target(),
            ("GET".to_string(), "/v2/".to_string())
        );
    }
}
