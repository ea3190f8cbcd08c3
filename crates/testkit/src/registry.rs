//! Debian's `docker-registry` (CNCF distribution 2.8) as a child process on 127.0.0.1 (or
//! another address of this machine): a free port, storage in a temporary directory, optional
//! htpasswd or token authentication, and optional HTTPS with a certificate from a test CA.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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

/// Where and how a registry listens, beyond its authentication.
pub struct RegistryOptions<'a> {
    /// How clients authenticate.
    pub auth: RegistryAuth<'a>,
    /// The address to listen on (a free port is picked).
    pub ip: IpAddr,
    /// Serve HTTPS with a certificate for `ip` from a CA made for this registry
    /// ([`TestRegistry::ca_cert`]).
    pub tls: bool,
}

/// A running registry; killed when dropped.
pub struct TestRegistry {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    tls: bool,
}

impl TestRegistry {
    /// Starts a plain-HTTP registry on 127.0.0.1 and waits until it answers.
    pub fn start(auth: RegistryAuth<'_>) -> std::io::Result<TestRegistry> {
        Self::start_with(RegistryOptions {
            auth,
            ip: Ipv4Addr::LOCALHOST.into(),
            tls: false,
        })
    }

    /// Starts a registry as `options` say and waits until it answers.
    pub fn start_with(options: RegistryOptions<'_>) -> std::io::Result<TestRegistry> {
        require_tool("docker-registry");
        remove_orphaned_storage();
        let dir = tempfile::Builder::new().prefix(STORAGE_PREFIX).tempdir()?;
        std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())?;
        if options.tls {
            write_tls_files(dir.path(), options.ip)?;
        }
        let mut last_error = None;
        for _ in 0..3 {
            match Self::try_start(&options, &dir) {
                Ok((child, addr)) => {
                    return Ok(TestRegistry {
                        child,
                        addr,
                        dir,
                        tls: options.tls,
                    });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("three attempts"))
    }

    fn try_start(
        options: &RegistryOptions<'_>,
        dir: &tempfile::TempDir,
    ) -> std::io::Result<(Child, SocketAddr)> {
        let addr = free_port(options.ip)?;
        let tls_section = if options.tls {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.path().join("server.pem").display(),
                dir.path().join("server-key.pem").display()
            )
        } else {
            String::new()
        };
        let auth_section = match &options.auth {
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
             http:\n  addr: {addr}\n  secret: lazylayer-test-secret\n{tls_section}{auth_section}",
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

    /// `IP:PORT` (e.g. `127.0.0.1:PORT`), as used in image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The PEM certificate of the CA that signed the registry's certificate (HTTPS only).
    pub fn ca_cert(&self) -> Option<PathBuf> {
        self.tls.then(|| self.dir.path().join("ca.pem"))
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

/// Prefix of each registry's storage directory under the temporary directory.
const STORAGE_PREFIX: &str = "lazylayer-registry.";
/// The file in a registry's storage naming the process that started it.
const OWNER_FILE: &str = "owner.pid";

/// Removes the storage of registries whose test process is gone. The shared registry of a test
/// binary lives in a static, which is never dropped, and a killed test run drops nothing: each
/// run would otherwise leave a copy of every fixture image (about 400 MiB) behind.
fn remove_orphaned_storage() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(STORAGE_PREFIX)
        {
            continue;
        }
        let path = entry.path();
        // Without an owner file, a registry may be starting right now: left alone.
        let Ok(owner) = std::fs::read_to_string(path.join(OWNER_FILE)) else {
            continue;
        };
        let alive = owner
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn free_port(ip: IpAddr) -> std::io::Result<SocketAddr> {
    TcpListener::bind((ip, 0))?.local_addr()
}

/// Writes `ca.pem` (a CA made for one registry), and `server.pem` and `server-key.pem` (a
/// certificate for `ip` it signed) into `dir`.
fn write_tls_files(dir: &Path, ip: IpAddr) -> std::io::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let other = |e: rcgen::Error| std::io::Error::other(e.to_string());
    let ca_key = KeyPair::generate().map_err(other)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "lazylayer test registry CA");
    std::fs::write(
        dir.join("ca.pem"),
        ca.self_signed(&ca_key).map_err(other)?.pem(),
    )?;
    let key = KeyPair::generate().map_err(other)?;
    let mut server = CertificateParams::new(vec![ip.to_string()]).map_err(other)?;
    server.is_ca = IsCa::ExplicitNoCa;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server
        .distinguished_name
        .push(DnType::CommonName, ip.to_string());
    let cert = server
        .signed_by(&key, &Issuer::new(ca, &ca_key))
        .map_err(other)?;
    std::fs::write(dir.join("server.pem"), cert.pem())?;
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem())?;
    Ok(())
}

/// The first IPv4 address of this machine that is not loopback: a registry there is reached
/// over HTTPS unless it is named with `--insecure-registry`. Panics if there is none.
pub fn non_loopback_ipv4() -> Ipv4Addr {
    let mut found = None;
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that freeifaddrs releases below.
    let listed = unsafe { libc::getifaddrs(&mut list) };
    assert_eq!(listed, 0, "getifaddrs: {}", std::io::Error::last_os_error());
    let mut entry = list;
    while !entry.is_null() && found.is_none() {
        // SAFETY: `entry` is a non-null node of the list getifaddrs returned, not yet freed;
        // an AF_INET ifa_addr points at a sockaddr_in.
        unsafe {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let sin = &*(addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !ip.is_unspecified() {
                    found = Some(ip);
                }
            }
            entry = (*entry).ifa_next;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found.expect(
        "this machine has no non-loopback IPv4 address: the HTTPS and --insecure-registry tests \
         need one (lazylayer always speaks plain HTTP to loopback registries)",
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_of_registries_whose_process_is_gone_is_removed() {
        let storage = |owner: Option<u32>| {
            let dir = tempfile::Builder::new()
                .prefix(STORAGE_PREFIX)
                .tempdir()
                .unwrap()
                .keep();
            if let Some(pid) = owner {
                std::fs::write(dir.join(OWNER_FILE), pid.to_string()).unwrap();
            }
            dir
        };
        let mut exited = Command::new("true").spawn().unwrap();
        let gone = exited.id();
        exited.wait().unwrap();
        let orphaned = storage(Some(gone));
        let ours = storage(Some(std::process::id()));
        let starting = storage(None);
        remove_orphaned_storage();
        assert!(!orphaned.exists());
        assert!(ours.exists() && starting.exists());
        for dir in [ours, starting] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
