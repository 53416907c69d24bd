//! Fixtures shared by weir's integration tests and benches (feature `testing`).

pub mod apiserver;
pub mod kube_objects;
pub mod peers;
pub mod scale;

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
        memory_mib: None,
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

/// `count` backends on 127.`test`.1.n:8080 (n = 1..=count), each answering with its
/// address.
pub async fn backends(test: u8, count: u8) -> Vec<Backend> {
    let mut out = Vec::new();
    for n in 1..=count {
        out.push(
            Backend::start(SocketAddr::new(IpAddr::from([127, test, 1, n]), 8080), "")
                .await
                .expect("backend"),
        );
    }
    out
}

/// weir running in process on files in a temporary directory, for proxy tests.
pub struct Weir {
    pub app: Option<crate::app::App>,
    pub dir: tempfile::TempDir,
}

/// One endpoint in an EndpointSlice written by [`slice_yaml`].
#[derive(Clone, Debug)]
pub struct Ep {
    pub ip: IpAddr,
    pub node: &'static str,
    pub ready: bool,
    pub terminating: bool,
}

impl Ep {
    pub fn ready(ip: IpAddr, node: &'static str) -> Self {
        Ep {
            ip,
            node,
            ready: true,
            terminating: false,
        }
    }

    pub fn terminating(ip: IpAddr, node: &'static str) -> Self {
        Ep {
            ip,
            node,
            ready: false,
            terminating: true,
        }
    }
}

/// A Service named `name` in `default` with one TCP port named `http`; `spec` adds lines
/// to its spec (indented two spaces), `annotations` to its metadata.
pub fn service_yaml(
    name: &str,
    cluster_ip: IpAddr,
    port: u16,
    spec: &str,
    annotations: &str,
) -> String {
    let mut yaml =
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n");
    if !annotations.is_empty() {
        yaml.push_str("  annotations:\n");
        for line in annotations.lines() {
            yaml.push_str(&format!("    {line}\n"));
        }
    }
    yaml.push_str(&format!(
        "spec:\n  clusterIP: {cluster_ip}\n  ports:\n  - name: http\n    port: {port}\n    protocol: TCP\n"
    ));
    for line in spec.lines() {
        yaml.push_str(&format!("  {line}\n"));
    }
    yaml
}

/// A Service `name` on `cluster_ip`:8000 whose port has `app_protocol` (an HTTP port for
/// `http`, `kubernetes.io/h2c` or `grpc`), round-robin, and its slice: `endpoints` on
/// port 8080, ready on `node-a`.
pub fn http_service_yaml(
    name: &str,
    cluster_ip: IpAddr,
    app_protocol: &str,
    endpoints: &[IpAddr],
) -> String {
    let eps: Vec<Ep> = endpoints
        .iter()
        .map(|ip| Ep::ready(*ip, "node-a"))
        .collect();
    service_yaml(name, cluster_ip, 8000, "", "weir.dev/policy: round-robin").replace(
        "    protocol: TCP\n",
        &format!("    protocol: TCP\n    appProtocol: {app_protocol}\n"),
    ) + "---\n"
        + &slice_yaml(name, 8080, &eps)
}

/// An EndpointSlice for Service `service`, port `http` = `port`.
pub fn slice_yaml(service: &str, port: u16, endpoints: &[Ep]) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n- name: http\n  port: {port}\n  protocol: TCP\nendpoints:\n"
    );
    if endpoints.is_empty() {
        yaml.push_str("[]\n");
        yaml = yaml.replace("endpoints:\n[]\n", "endpoints: []\n");
    }
    for e in endpoints {
        yaml.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: {}, serving: true, terminating: {}}}\n",
            e.ip, e.node, e.ready, e.terminating
        ));
    }
    yaml
}

impl Weir {
    /// Writes `objects` (file name, YAML) and `policies` (policy name, module bytes) and
    /// starts weir on them as node `node-a` with NodePorts on `node_address`; returns once
    /// it is ready. `config` is appended to the generated weir.toml, right after its
    /// `[admin]` table (so it may start with admin keys); a `[policies]` table in it is
    /// merged into the generated one.
    pub async fn start(
        node_address: IpAddr,
        objects: &[(&str, String)],
        policies: &[(&str, Vec<u8>)],
        config: &str,
    ) -> Weir {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::create_dir(dir.path().join("objects")).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        let weir = Weir { app: None, dir };
        for (name, yaml) in objects {
            weir.write_objects(name, yaml);
        }
        for (name, bytes) in policies {
            weir.write_policy(name, bytes);
        }
        let (mut policies, config) = take_table(config, "[policies]");
        // Compiled modules are cached for the test's life, as `weir run` caches them.
        if !policies.contains("cache_dir") {
            policies.push_str("cache_dir = \"cache\"\n");
        }
        let text = format!(
            "[node]\nname = \"node-a\"\naddresses = [\"{node_address}\"]\n\
             [source]\nkind = \"files\"\npaths = [\"objects\"]\npoll_interval = \"50ms\"\n\
             [policies]\ndir = \"policies\"\npoll_interval = \"50ms\"\n{policies}\
             [admin]\naddress = \"127.0.0.1:0\"\n\
             {config}\n"
        );
        let text = if text.contains("[limits]") {
            text
        } else {
            format!("{text}[limits]\nselect_deadline = \"50ms\"\nupdate_deadline = \"500ms\"\n")
        };
        let path = weir.dir.path().join("weir.toml");
        std::fs::write(&path, text).unwrap();
        let mut config = crate::config::Config::load(&path).expect("valid test config");
        // Policy modules compile in a child `weir`, as `weir run` does.
        config.compiler = weir_binary();
        let app = crate::app::App::start(config).expect("weir starts");
        let mut weir = weir;
        weir.app = Some(app);
        let app = weir.app();
        wait_until("weir is ready", std::time::Duration::from_secs(30), || {
            app.pending().is_empty()
        })
        .await;
        weir
    }

    pub fn app(&self) -> &crate::app::App {
        self.app.as_ref().expect("running")
    }

    /// Replaces an objects file atomically (write, then rename), as editors and kubectl do.
    pub fn write_objects(&self, name: &str, yaml: &str) {
        atomic_write(&self.dir.path().join("objects").join(name), yaml.as_bytes());
    }

    /// Deletes an objects file.
    pub fn remove_objects(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join("objects").join(name)).expect("removed");
    }

    /// Replaces a policy module atomically.
    pub fn write_policy(&self, name: &str, bytes: &[u8]) {
        atomic_write(
            &self
                .dir
                .path()
                .join("policies")
                .join(format!("{name}.wasm")),
            bytes,
        );
    }

    /// `GET path` on the admin port: status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let response = http_get(self.app().admin_address(), path)
            .await
            .expect("admin answers");
        let status = response[9..12].parse().expect("status code");
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    pub fn metrics(&self) -> String {
        self.app().metrics().encode()
    }

    /// The value of the metric sample whose line starts with `sample` (name and labels),
    /// 0 when there is none.
    pub fn metric(&self, sample: &str) -> u64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(sample))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// Shuts down gracefully.
    pub async fn shutdown(mut self) -> crate::app::Drained {
        self.app.take().expect("running").shutdown().await
    }
}

/// The `weir` binary cargo built beside the test executable (`target/<profile>/weir`),
/// which compiles policy modules for an in-process weir as it does for `weir run`.
pub fn weir_binary() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let dir = if dir.ends_with("deps") {
        dir.parent()?
    } else {
        dir
    };
    Some(dir.join("weir")).filter(|p| p.is_file())
}

/// Splits the lines of TOML table `header` (without the header) out of `text`.
fn take_table(text: &str, header: &str) -> (String, String) {
    let (mut table, mut rest) = (String::new(), String::new());
    let mut inside = false;
    for line in text.lines() {
        if line.trim_start().starts_with('[') {
            inside = line.trim() == header;
            if inside {
                continue;
            }
        }
        let out = if inside { &mut table } else { &mut rest };
        out.push_str(line);
        out.push('\n');
    }
    (table, rest)
}

fn atomic_write(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits for `condition`, checking every 10 ms; panics naming `what` after `deadline`.
pub async fn wait_until(
    what: &str,
    deadline: std::time::Duration,
    mut condition: impl FnMut() -> bool,
) {
    let end = std::time::Instant::now() + deadline;
    while !condition() {
        assert!(
            std::time::Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Connects to `address` (from `source` when given), sends `who` and closes its side,
/// then reads to the end: returns the name of the backend that answered (its first line).
/// Closing cleanly matters: a client that closes with unread data sends a reset.
pub async fn who(address: SocketAddr, source: Option<IpAddr>) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = connect(address, source).await?;
    stream.write_all(b"who\n").await?;
    stream.shutdown().await?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut answer),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 5 s"))??;
    let answer = String::from_utf8_lossy(&answer);
    match answer.split_once('\n') {
        Some((name, "who\n")) => Ok(name.to_string()),
        _ if answer.is_empty() => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        )),
        _ => Err(std::io::Error::other(format!(
            "unexpected answer {answer:?}"
        ))),
    }
}

/// A TCP connection to `address`, from `source` if given.
pub async fn connect(
    address: SocketAddr,
    source: Option<IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    tokio::time::timeout(std::time::Duration::from_secs(5), socket.connect(address))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// A raw HTTP/1.1 GET; returns the whole response (the server closes after it).
pub async fn http_get(address: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = connect(address, None).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut response),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response"))??;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// On an open connection to a [`Backend`]: sends `who` and reads the answer and the echo,
/// leaving nothing unread. Returns the backend's name.
pub async fn greet(stream: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"who\n").await?;
    let mut answer = Vec::new();
    let mut buffer = [0u8; 256];
    while !(answer.ends_with(b"\nwho\n")) {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 5 s"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        answer.extend_from_slice(&buffer[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    Ok(text.split('\n').next().unwrap_or_default().to_string())
}
