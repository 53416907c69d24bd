//! Fixtures shared by weir's integration tests and benches (feature `testing`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use weir_sdk::{Connection, Endpoint, Node, Scope, Service};

use crate::metrics::PolicyMetrics;
use crate::policy::{FailureMode, Limits, PolicyEngine, ServiceInput};

/// The component built from `host/tests/guests/<name>` (or `policies/<name>`) by build.rs.
pub fn guest_path(name: &str) -> PathBuf {
    PathBuf::from(env!("WEIR_GUEST_DIR")).join(format!("{}.wasm", name.replace('-', "_")))
}

/// The bytes of [`guest_path`].
pub fn guest_bytes(name: &str) -> Vec<u8> {
    let path = guest_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A policy engine with [`test_limits`], no disk cache, and its metrics.
pub fn engine() -> (Arc<PolicyEngine>, Arc<PolicyMetrics>) {
    engine_with(test_limits())
}

/// Deadlines are wall-clock time: on a loaded 2-core machine running tests in parallel, a
/// healthy 10 µs call can be descheduled past the 1 ms default and be "late". Tests that
/// are not about deadlines use these, so a failure they count is the policy's doing.
pub fn test_limits() -> Limits {
    Limits {
        select_deadline: std::time::Duration::from_millis(50),
        update_deadline: std::time::Duration::from_millis(500),
        ..Limits::default()
    }
}

pub fn engine_with(limits: Limits) -> (Arc<PolicyEngine>, Arc<PolicyMetrics>) {
    let metrics = Arc::new(PolicyMetrics::default());
    let engine = PolicyEngine::new(limits, None, metrics.clone()).expect("policy engine");
    (engine, metrics)
}

/// A ClusterIP service `default/<name>:http` on 127.0.0.10:80 with the given policy config.
pub fn service(name: &str, config: Option<&str>) -> Service {
    Service {
        config: config.map(str::to_string),
        ..Service::cluster_ip("default", name, "127.0.0.10".parse().expect("literal"), 80)
    }
}

/// `n` ready endpoints with ids `1..=n` at `198.18.<subnet>.<id>:8080`.
pub fn endpoints(subnet: u8, n: u32) -> Vec<Endpoint> {
    (1..=n)
        .map(|id| {
            let ip = IpAddr::from([198, 18, subnet, id as u8]);
            Endpoint::ready(id, SocketAddr::new(ip, 8080))
        })
        .collect()
}

pub fn node(name: &str) -> Arc<Node> {
    Arc::new(Node {
        name: name.into(),
        labels: Vec::new(),
    })
}

pub fn input(
    service: Service,
    endpoints: Vec<Endpoint>,
    failure_mode: FailureMode,
) -> ServiceInput {
    ServiceInput {
        service,
        node: node("node-a"),
        endpoints,
        failure_mode,
    }
}

/// A connection from `198.18.100.<client>:40000` to the clusterIP.
pub fn connection(client: u8) -> Connection {
    Connection {
        client: SocketAddr::new(IpAddr::from([198, 18, 100, client]), 40_000),
        destination: "127.0.0.10:80".parse().expect("literal"),
        scope: Scope::Internal,
    }
}

/// A TCP backend for proxy tests and the quickstart. It names itself: to an HTTP request
/// (`GET`, `HEAD`, `POST`...) it answers `200` with the body `<name>\n`, keeping the
/// connection alive; to anything else it writes `<name>\n` once it has read the client's
/// first bytes, then echoes every byte back until the client closes its side, and closes
/// its own.
pub struct Backend {
    pub address: SocketAddr,
    pub name: String,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Backend {
    /// Listens on `address` (port 0 for any) and answers as `name` (the address if empty).
    pub async fn start(address: SocketAddr, name: &str) -> std::io::Result<Backend> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let name = if name.is_empty() {
            address.to_string()
        } else {
            name.to_string()
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let (token, who) = (stop.clone(), name.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    () = token.cancelled() => return,
                };
                let who = who.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = answer(stream, &who) => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        Ok(Backend {
            address,
            name,
            stop,
        })
    }
}

async fn answer(mut stream: tokio::net::TcpStream, who: &str) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.set_nodelay(true);
    let mut buffer = vec![0u8; 16 << 10];
    let n = stream.read(&mut buffer).await?;
    if n == 0 {
        return Ok(());
    }
    let http = [&b"GET "[..], b"HEAD ", b"POST ", b"PUT "]
        .iter()
        .any(|m| buffer[..n].starts_with(m));
    if !http {
        stream.write_all(format!("{who}\n").as_bytes()).await?;
        stream.write_all(&buffer[..n]).await?;
        loop {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                return stream.shutdown().await;
            }
            stream.write_all(&buffer[..n]).await?;
        }
    }
    let body = format!("{who}\n");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut pending = buffer[..n].to_vec();
    loop {
        // One response per request head; bodies are not expected.
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            stream.write_all(response.as_bytes()).await?;
        }
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&buffer[..n]);
    }
}
