//! Debian's `docker-registry` (CNCF distribution 2.8) as a child process on 127.0.0.1: a free
//! port, storage in a temporary directory, and optional htpasswd or token authentication.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require_tool;
use crate::token_issuer::{ISSUER, SERVICE, TokenIssuer};

/// How the registry authenticates clients.
pub enum RegistryAuth<'a> {
    /// Anyone may pull and push.
    Anonymous,
    /// HTTP Basic against an htpasswd file with one user.
    Htpasswd { user: &'a str, password: &'a str },
    /// Bearer tokens from `issuer`.
    Token(&'a TokenIssuer),
}

/// A running registry; killed when dropped.
pub struct TestRegistry {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts a registry and waits until it answers.
    pub fn start(auth: RegistryAuth<'_>) -> std::io::Result<TestRegistry> {
        require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("lazylayer-registry.")
            .tempdir()?;
        let mut last_error = None;
        for _ in 0..3 {
            match Self::try_start(&auth, &dir) {
                Ok((child, addr)) => return Ok(TestRegistry { child, addr, dir }),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("three attempts"))
    }

    fn try_start(
        auth: &RegistryAuth<'_>,
        dir: &tempfile::TempDir,
    ) -> std::io::Result<(Child, SocketAddr)> {
        let addr = free_port()?;
        let auth_section = match auth {
            RegistryAuth::Anonymous => String::new(),
            RegistryAuth::Htpasswd { user, password } => {
                require_tool("htpasswd");
                let file = dir.path().join("htpasswd");
                let output = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()?;
                if !output.status.success() {
                    return Err(std::io::Error::other("htpasswd failed"));
                }
                std::fs::write(&file, output.stdout)?;
                format!(
                    "auth:\n  htpasswd:\n    realm: lazylayer-test\n    path: {}\n",
                    file.display()
                )
            }
            RegistryAuth::Token(issuer) => format!(
                "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                issuer.realm(),
                issuer.cert_bundle().display()
            ),
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n  secret: lazylayer-test-secret\n{auth_section}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let mut command = Command::new("docker-registry");
        command
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no Rust state; it makes
        // the registry die with the test process even if a test aborts without running Drop.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                let log =
                    std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
                return Err(std::io::Error::other(format!(
                    "docker-registry exited ({status}): {log}"
                )));
            }
            if answers_http(addr) {
                return Ok((child, addr));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        Err(std::io::Error::other(
            "docker-registry did not start within 20 s",
        ))
    }

    /// The registry's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, as used in image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The registry's log so far (for failing tests).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The storage directory (to damage blobs on purpose).
    pub fn storage(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

fn answers_http(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream
        .write_all(b"GET /v2/ HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = [0u8; 12];
    stream.read_exact(&mut answer).is_ok() && answer.starts_with(b"HTTP/1.")
}
