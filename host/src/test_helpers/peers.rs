//! Real receivers of the PROXY protocol, run as child processes for a test: HAProxy with
//! `accept-proxy` and nginx with `proxy_protocol`, each answering every HTTP request with
//! the client address and port the header gave it (`ip:port\n`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A peer process, killed when dropped.
pub struct Peer {
    child: Child,
    _dir: tempfile::TempDir,
    pub address: SocketAddr,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `program` can be run (it is installed).
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

impl Peer {
    /// HAProxy on `address`, `mode http`, `bind ... accept-proxy`.
    pub fn haproxy(address: SocketAddr) -> Peer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = format!(
            "global\n  maxconn 256\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
             frontend proxied\n  bind {address} accept-proxy\n  \
             http-request return status 200 content-type text/plain lf-string \"%[src]:%[src_port]\\n\"\n"
        );
        std::fs::write(dir.path().join("haproxy.cfg"), config).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(dir.path().join("haproxy.cfg"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts");
        Peer::ready(child, dir, address)
    }

    /// nginx on `address`, `listen ... proxy_protocol`.
    pub fn nginx(address: SocketAddr) -> Peer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().display();
        let config = format!(
            "daemon off;\nmaster_process off;\npid {path}/nginx.pid;\nerror_log {path}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {path}/body;\n  proxy_temp_path {path}/proxy;\n  \
             fastcgi_temp_path {path}/fastcgi;\n  uwsgi_temp_path {path}/uwsgi;\n  scgi_temp_path {path}/scgi;\n  \
             server {{\n    listen {address} proxy_protocol;\n    \
             location / {{ return 200 \"$proxy_protocol_addr:$proxy_protocol_port\\n\"; }}\n  }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), config).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        Peer::ready(child, dir, address)
    }

    fn ready(mut child: Child, dir: tempfile::TempDir, address: SocketAddr) -> Peer {
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                panic!("the peer on {address} exited ({status}) before listening: {log}");
            }
            assert!(Instant::now() < end, "the peer never listened on {address}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Peer {
            child,
            _dir: dir,
            address,
        }
    }
}

/// `GET /` over `stream` (HTTP/1.0), after `prefix` (a PROXY header, or nothing); the
/// response's body.
pub async fn get(mut stream: tokio::net::TcpStream, prefix: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = prefix.to_vec();
    request.extend_from_slice(b"GET / HTTP/1.0\r\nHost: weir\r\n\r\n");
    stream.write_all(&request).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 5 s"))??;
    let response = String::from_utf8_lossy(&response).into_owned();
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.trim_end().to_string())
        }
        _ => Err(std::io::Error::other(format!("not a 200: {response:?}"))),
    }
}

/// Whether the peers a test needs are here; says so when they are not.
pub fn available(programs: &[&str], test: &str) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        eprintln!(
            "skipped {test}: {} not installed (.ci/run installs them: apt-get install -y haproxy nginx)",
            missing.join(", ")
        );
    }
    missing.is_empty()
}
