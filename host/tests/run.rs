//! `weir run` as users run it: the real binary, its config errors and exit codes, and its
//! signal handling. Addresses: 127.31.0.0/16.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::test_helpers::{Backend, Ep, connect, greet, http_get, service_yaml, slice_yaml};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

fn run_config(dir: &Path, text: &str) -> (i32, String) {
    let path = dir.join("weir.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(WEIR)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_exit_64_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("objects")).unwrap();
    let good = "[node]\nname = \"node-a\"\n[source]\nkind = \"files\"\npaths = [\"objects\"]\n";
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unknown key",
            format!("{good}[admin]\nadress = \"127.0.0.1:0\"\n"),
            &["line 7", "unknown field `adress`", "`address`", "README.md"],
        ),
        (
            "malformed TOML",
            format!("{good}[proxy\nworkers = 2\n"),
            &["line 6", "weir.toml"],
        ),
        (
            "bad duration",
            format!("{good}[proxy]\nshutdown_grace_period = 30\n"),
            &["line 7", "shutdown_grace_period"],
        ),
        (
            "bad duration unit",
            format!("{good}[proxy]\nconnect_timeout = \"2 fortnights\"\n"),
            &["line 7", "invalid duration `2 fortnights`", "\"250ms\""],
        ),
        (
            "bad address",
            format!("{good}[admin]\naddress = \"localhost\"\n"),
            &["line 7", "address"],
        ),
        (
            "value out of range",
            format!("{good}[proxy]\nconnect_attempts = 0\n"),
            &["line 7", "proxy.connect_attempts", "at least 1"],
        ),
        (
            "missing section",
            "[source]\nkind = \"files\"\npaths = [\"objects\"]\n".to_string(),
            &["missing field `node`"],
        ),
        (
            "unreadable objects path",
            good.replace("\"objects\"", "\"no-such-dir\""),
            &["source.paths", "no-such-dir", "No such file"],
        ),
        (
            "missing policies dir",
            format!("{good}[policies]\ndir = \"no-policies\"\n"),
            &["policies.dir", "no-policies", "create it"],
        ),
        (
            "unknown source kind",
            good.replace("\"files\"", "\"etcd\""),
            &["line 4", "unknown variant `etcd`", "`files`"],
        ),
    ];
    for (what, text, expected) in cases {
        let (code, stderr) = run_config(dir.path(), text);
        assert_eq!(code, 64, "{what}: exit code; stderr:\n{stderr}");
        for needle in *expected {
            assert!(
                stderr.contains(needle),
                "{what}: no {needle:?} in:\n{stderr}"
            );
        }
    }
    let output = Command::new(WEIR)
        .args(["run", "--config", "/nonexistent/weir.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read the config file"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    fn signal(&self, signal: Signal) {
        kill_process(Pid::from_child(&self.0), signal).expect("signal sent");
    }

    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let end = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < end, "weir did not exit within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts the binary on one Service and waits until it is ready. The Service's address
/// follows the backend's (127.31.X.Y → 127.31.(100+X).Y): tests run side by side, and two
/// weirs on one address would take each other's connections.
async fn start(dir: &Path, backend: &Backend) -> (Process, SocketAddr, SocketAddr) {
    start_with(dir, backend, "", "").await
}

/// As [`start`], with the Service's `annotations` and `config` appended to weir.toml.
async fn start_with(
    dir: &Path,
    backend: &Backend,
    annotations: &str,
    config: &str,
) -> (Process, SocketAddr, SocketAddr) {
    let IpAddr::V4(backend_ip) = backend.address.ip() else {
        panic!("an IPv4 backend");
    };
    let [_, _, x, y] = backend_ip.octets();
    let service_ip = IpAddr::from([127, 31, 100 + x, y]);
    std::fs::create_dir_all(dir.join("objects")).unwrap();
    std::fs::write(
        dir.join("objects/web.yaml"),
        service_yaml("web", service_ip, 8000, "", annotations)
            + "---\n"
            + &slice_yaml(
                "web",
                backend.address.port(),
                &[Ep::ready(backend.address.ip(), "node-a")],
            ),
    )
    .unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(
        dir.join("weir.toml"),
        format!(
            "[node]\nname = \"node-a\"\naddresses = [\"127.31.0.1\"]\n[source]\nkind = \"files\"\npaths = [\"objects\"]\n[admin]\naddress = \"{admin}\"\n{config}"
        ),
    )
    .unwrap();
    let child = Command::new(WEIR)
        .args(["run", "--config"])
        .arg(dir.join("weir.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child);
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = http_get(admin, "/readyz").await
            && response.starts_with("HTTP/1.1 200")
        {
            break;
        }
        assert!(Instant::now() < end, "weir never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (process, SocketAddr::new(service_ip, 8000), admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_a_second_signal_exits_at_once() {
    let backend = Backend::start("127.31.1.1:0".parse().unwrap(), "b1")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    // SIGTERM: no new connections, the open one finishes, then a clean exit.
    let (mut weir, service, _) = start(dir.path(), &backend).await;
    let mut stream = connect(service, None).await.unwrap();
    assert_eq!(greet(&mut stream).await.unwrap(), "b1");
    weir.signal(Signal::TERM);
    let end = Instant::now() + Duration::from_secs(10);
    while connect(service, None).await.is_ok() {
        assert!(Instant::now() < end, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        weir.0.try_wait().unwrap().is_none(),
        "waits for the open connection"
    );
    stream.write_all(b"after the signal\n").await.unwrap();
    let mut echoed = [0u8; 17];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"after the signal\n");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(weir.exit_code(Duration::from_secs(10)).await, Some(0));

    // A second signal during the drain: out at once.
    let (mut weir, service, _) = start(dir.path(), &backend).await;
    let mut stream = connect(service, None).await.unwrap();
    greet(&mut stream).await.unwrap();
    weir.signal(Signal::TERM);
    let end = Instant::now() + Duration::from_secs(10);
    while connect(service, None).await.is_ok() {
        assert!(Instant::now() < end, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    weir.signal(Signal::INT);
    assert_eq!(weir.exit_code(Duration::from_secs(5)).await, Some(130));
}

/// The value of the first metric sample starting with `sample` on the admin port.
async fn metric(admin: SocketAddr, sample: &str) -> f64 {
    let page = http_get(admin, "/metrics").await.unwrap_or_default();
    page.lines()
        .find(|l| l.starts_with(sample))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_workers_start_and_policies_swap_through_the_child_compiler() {
    let backend = Backend::start("127.31.2.1:0".parse().unwrap(), "b2")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let module = |name: &str| weir::test_helpers::guest_bytes(name);
    std::fs::write(policies.join("web-policy.wasm"), module("round-robin")).unwrap();
    // Instances are not pooled: no worker count or number of swaps can run out of slots.
    let (_weir, service, admin) = start_with(
        dir.path(),
        &backend,
        "weir.dev/policy: web-policy",
        "[policies]\ndir = \"policies\"\npoll_interval = \"50ms\"\ncache_dir = \"\"\n[proxy]\nworkers = 200\n",
    )
    .await;
    let accepted = "weir_reloads_total{what=\"web-policy\",result=\"accepted\"}";
    assert_eq!(metric(admin, accepted).await, 1.0);
    for (round, next) in ["maglev", "random"].into_iter().enumerate() {
        let tmp = policies.join(".web-policy.tmp");
        std::fs::write(&tmp, module(next)).unwrap();
        std::fs::rename(&tmp, policies.join("web-policy.wasm")).unwrap();
        let end = Instant::now() + Duration::from_secs(60);
        while metric(admin, accepted).await < round as f64 + 2.0 {
            assert!(Instant::now() < end, "{next} was never swapped in");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut stream = connect(service, None).await.unwrap();
        assert_eq!(greet(&mut stream).await.unwrap(), "b2", "served by {next}");
    }
    assert_eq!(metric(admin, "weir_policy_failures_total").await, 0.0);
}

/// Starts the binary on the objects in `dir` under `ulimit <flag> 256` (`-Sn`: the soft
/// limit only; `-n`: soft and hard), and waits until it is ready. Returns the admin port.
async fn start_limited(dir: &Path, flag: &str) -> (Process, SocketAddr) {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = dir.join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"node-a\"\naddresses = [\"127.31.0.1\"]\n[source]\nkind = \"files\"\npaths = [\"objects\"]\n[admin]\naddress = \"{admin}\"\n"
        ),
    )
    .unwrap();
    let script = format!("ulimit {flag} 256 && exec \"$0\" run --config \"$1\"");
    let child = Command::new("sh")
        .args(["-c", &script, WEIR])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child);
    let end = Instant::now() + Duration::from_secs(60);
    while !http_get(admin, "/readyz")
        .await
        .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    {
        assert!(Instant::now() < end, "weir never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (process, admin)
}

/// Started with a low soft limit on open files (a shell's `ulimit -Sn 256`), weir raises
/// it to the hard limit: every connection and UDP flow holds a descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("objects")).unwrap();
    let (process, _admin) = start_limited(dir.path(), "-Sn").await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", process.0.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_ne!(soft, "256", "{line}");
    assert_eq!(soft, hard, "{line}");
}

/// As many clients as the admin port serves at once send half a request line: they are
/// closed once the header timeout passes, and the probes are answered meanwhile (from
/// the reserved slots) and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_do_not_hold_the_admin_port() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(SocketAddr::from(([127, 31, 1, 3], 8080)), "b")
        .await
        .unwrap();
    let (_weir, _service, admin) = start(dir.path(), &backend).await;
    let mut slow = Vec::new();
    for _ in 0..weir::admin::ADMIN_CONNECTIONS {
        let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
        stream.write_all(b"GET /heal").await.unwrap();
        slow.push(stream);
    }
    let response = http_get(admin, "/livez")
        .await
        .expect("answered beside them");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // Each is closed by weir: a read ends (0 bytes, or an error) within the timeout.
    let deadline = weir::admin::HEADER_READ_TIMEOUT + Duration::from_secs(5);
    for mut stream in slow {
        let mut byte = [0u8; 64];
        let read = tokio::time::timeout(deadline, stream.read(&mut byte)).await;
        assert!(
            read.is_ok(),
            "a slow client was still open after {deadline:?}"
        );
    }
}

/// With 256 open files (soft and hard), 200 silent clients of a Service whose endpoint
/// never answers took every descriptor: every other Service and the probes timed out.
/// Now that Service's connections are capped (three quarters of what the descriptors
/// allow), its listener waits, and the rest of the node is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_silent_clients_cannot_starve_the_node() {
    let silent = tokio::net::TcpListener::bind("127.31.3.1:0").await.unwrap();
    let silent_address = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let backend = Backend::start("127.31.3.2:0".parse().unwrap(), "b3")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("objects")).unwrap();
    let service = |name: &str, ip: u8, endpoint: SocketAddr| {
        service_yaml(name, IpAddr::from([127, 31, 3, ip]), 8000, "", "")
            + "---\n"
            + &slice_yaml(name, endpoint.port(), &[Ep::ready(endpoint.ip(), "node-a")])
    };
    std::fs::write(
        dir.path().join("objects/silent.yaml"),
        service("silent", 20, silent_address),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("objects/web.yaml"),
        service("web", 21, backend.address),
    )
    .unwrap();
    let (_process, admin) = start_limited(dir.path(), "-n").await;

    let silent_service = SocketAddr::from(([127, 31, 3, 20], 8000));
    let mut clients = Vec::new();
    for _ in 0..200 {
        if let Ok(stream) = connect(silent_service, None).await {
            clients.push(stream);
        }
    }
    let reached =
        "weir_connection_limit_reached_total{service=\"default/silent:http\",limit=\"service\"}";
    let end = Instant::now() + Duration::from_secs(30);
    while metric(admin, reached).await < 1.0 {
        assert!(
            Instant::now() < end,
            "the silent Service's cap was never reached"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The rest of the node: another Service and the probes.
    let web = SocketAddr::from(([127, 31, 3, 21], 8000));
    for _ in 0..5 {
        let mut stream = connect(web, None).await.expect("the other Service accepts");
        assert_eq!(greet(&mut stream).await.expect("and answers"), "b3");
    }
    for probe in ["/readyz", "/livez", "/healthz"] {
        let response = http_get(admin, probe)
            .await
            .expect("the admin port answers");
        assert!(response.starts_with("HTTP/1.1 200"), "{probe}: {response}");
    }
    drop(clients);
    holder.abort();
}
