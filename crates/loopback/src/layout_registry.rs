//! A read-only registry embedded in the process: it serves one OCI image layout over the OCI
//! distribution protocol on 127.0.0.1 (manifests by tag or digest, blobs with Range), enough for
//! `lazylayer` and skopeo to pull from it. `lazylayer demo` uses it so that it needs no registry
//! installed; tests can use it where a real registry is not the point.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::background::{self, Background};
use crate::http_wire::Conn;

/// A running embedded registry; stops when dropped.
pub struct LayoutRegistry {
    addr: SocketAddr,
    _server: Background,
}

impl LayoutRegistry {
    /// Serves the OCI layout at `layout` (any repository name maps to it).
    pub fn start(layout: &Path) -> io::Result<LayoutRegistry> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let layout = Arc::new(layout.to_path_buf());
        let server = background::spawn("layout-registry", move |_stop| async move {
            let Ok(listener) = TcpListener::from_std(listener) else {
                return;
            };
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    let layout = layout.clone();
                    tokio::spawn(async move {
                        let _ = serve(&layout, Conn::new(stream)).await;
                    });
                }
            }
        })?;
        Ok(LayoutRegistry {
            addr,
            _server: server,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn blob_path(layout: &Path, digest: &str) -> Option<PathBuf> {
    let (algorithm, hex) = digest.split_once(':')?;
    let valid = matches!(algorithm, "sha256" | "sha512")
        && !hex.is_empty()
        && hex.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| layout.join("blobs").join(algorithm).join(hex))
}

/// The descriptor of a tag in index.json (digest, media type).
fn tag(layout: &Path, tag: &str) -> Option<(String, String)> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).ok()?).ok()?;
    index["manifests"].as_array()?.iter().find_map(|m| {
        (m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .then(|| {
                Some((
                    m["digest"].as_str()?.to_string(),
                    m["mediaType"].as_str()?.to_string(),
                ))
            })
            .flatten()
    })
}

async fn respond(
    conn: &mut Conn,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let mut text = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nDocker-Distribution-Api-Version: registry/2.0\r\n",
        body.len()
    );
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    conn.write_all(text.as_bytes()).await?;
    if !head_only {
        conn.write_all(body).await?;
    }
    Ok(())
}

async fn not_found(conn: &mut Conn, head_only: bool) -> io::Result<()> {
    let body = br#"{"errors":[{"code":"NAME_UNKNOWN","message":"not found"}]}"#;
    respond(
        conn,
        "404 Not Found",
        &[("Content-Type", "application/json".into())],
        body,
        head_only,
    )
    .await
}

async fn serve(layout: &Path, mut conn: Conn) -> io::Result<()> {
    while let Some(request) = conn.read_head().await? {
        let (method, target) = request.method_and_target();
        let head_only = method == "HEAD";
        let path = target.split('?').next().unwrap_or("");
        if path == "/v2/" || path == "/v2" {
            respond(
                &mut conn,
                "200 OK",
                &[("Content-Type", "application/json".into())],
                b"{}",
                head_only,
            )
            .await?;
            continue;
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            not_found(&mut conn, head_only).await?;
            continue;
        };
        if let Some((_, reference)) = rest.rsplit_once("/manifests/") {
            let found = if reference.contains(':') {
                blob_path(layout, reference).map(|p| (p, String::new(), reference.to_string()))
            } else {
                tag(layout, reference).and_then(|(digest, media_type)| {
                    Some((blob_path(layout, &digest)?, media_type, digest))
                })
            };
            match found.and_then(|(path, media_type, digest)| {
                Some((std::fs::read(path).ok()?, media_type, digest))
            }) {
                Some((bytes, media_type, digest)) => {
                    let media_type = if media_type.is_empty() {
                        serde_json::from_slice::<serde_json::Value>(&bytes)
                            .ok()
                            .and_then(|v| v["mediaType"].as_str().map(str::to_string))
                            .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into())
                    } else {
                        media_type
                    };
                    let headers = [
                        ("Content-Type", media_type),
                        ("Docker-Content-Digest", digest),
                    ];
                    respond(&mut conn, "200 OK", &headers, &bytes, head_only).await?;
                }
                None => not_found(&mut conn, head_only).await?,
            }
        } else if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
            let Some(file) = blob_path(layout, digest).and_then(|p| std::fs::File::open(p).ok())
            else {
                not_found(&mut conn, head_only).await?;
                continue;
            };
            let size = file.metadata()?.len();
            let range = request.header("range").and_then(|r| {
                let (start, end) = r.strip_prefix("bytes=")?.split_once('-')?;
                let start: u64 = start.parse().ok()?;
                let end: u64 = if end.is_empty() {
                    size.checked_sub(1)?
                } else {
                    end.parse::<u64>().ok()?.min(size.checked_sub(1)?)
                };
                (start <= end).then_some((start, end))
            });
            let (status, start, end) = match range {
                Some((start, end)) => ("206 Partial Content", start, end + 1),
                None => ("200 OK", 0, size),
            };
            let mut headers = vec![
                ("Content-Type", "application/octet-stream".to_string()),
                ("Docker-Content-Digest", digest.to_string()),
            ];
            if range.is_some() {
                headers.push(("Content-Range", format!("bytes {start}-{}/{size}", end - 1)));
            }
            let mut text = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", end - start);
            for (name, value) in &headers {
                text.push_str(&format!("{name}: {value}\r\n"));
            }
            text.push_str("\r\n");
            conn.write_all(text.as_bytes()).await?;
            if !head_only {
                let mut position = start;
                let mut buffer = vec![0u8; 256 << 10];
                while position < end {
                    let n = ((end - position) as usize).min(buffer.len());
                    file.read_exact_at(&mut buffer[..n], position)?;
                    conn.write_all(&buffer[..n]).await?;
                    position += n as u64;
                }
            }
        } else {
            not_found(&mut conn, head_only).await?;
        }
    }
    Ok(())
}
