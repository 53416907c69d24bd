//! weir on a node built from network namespaces: the real binary in a "node" namespace
//! against the test API server, pods on a bridge behind it, a "remote node" with a pod of
//! its own, and an external client. Addresses come from 198.18.0.0/15 only: pods
//! 198.18.1.0/24, the remote pod 198.18.2.13, the remote node link 198.18.3.0/24, the
//! client link 198.18.4.0/24 (the node is 198.18.4.1), ClusterIPs 198.19.0.0/24.
//!
//! Needs root and `ip netns`; skipped with a message where they are unavailable.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::test_helpers::apiserver::ApiServer;
use weir::test_helpers::kube_objects::{
    kubernetes_config, node_json, policies_json, service_json, slice_json,
};
use weir::test_helpers::{Backend, connect, guest_bytes, http_get, who};

const WAIT: Duration = Duration::from_secs(30);
const NODE_IP: &str = "198.18.4.1";

/// Network namespaces that are deleted when dropped.
struct Namespaces {
    prefix: String,
    names: Vec<String>,
}

impl Namespaces {
    fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    fn add(&mut self, short: &str) -> std::io::Result<String> {
        let name = self.name(short);
        run(&["netns", "add", &name])?;
        self.names.push(name.clone());
        run(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = run(&["netns", "del", name]);
        }
    }
}

fn run(args: &[&str]) -> std::io::Result<()> {
    let output = Command::new("ip").args(args).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn ip_batch(ns: &str, commands: &[String]) {
    for command in commands {
        let mut args = vec!["-n", ns];
        args.extend(command.split(' '));
        run(&args).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the namespace");
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .expect("setns");
}

/// Runs `f` on a runtime of its own, on a thread inside `ns`.
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

/// Namespaces for this test process, where root and `ip netns` are available.
fn topology_root() -> Result<Namespaces, String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root".into());
    }
    Ok(Namespaces {
        prefix: format!("weirt{}", std::process::id()),
        names: Vec::new(),
    })
}

/// Builds the namespaces, or says why it cannot.
fn topology() -> Result<Namespaces, String> {
    let mut namespaces = topology_root()?;
    let node = namespaces
        .add("node")
        .map_err(|e| format!("`ip netns` is unavailable: {e}"))?;
    let (pod1, pod2) = (
        namespaces.add("pod1").unwrap(),
        namespaces.add("pod2").unwrap(),
    );
    let remote = namespaces.add("remote").unwrap();
    let client = namespaces.add("client").unwrap();
    // Pods on a bridge; the node is their gateway.
    ip_batch(
        &node,
        &[
            "link add br0 type bridge".into(),
            "address add 198.18.1.1/24 dev br0".into(),
            "link set br0 up".into(),
        ],
    );
    for (pod, n) in [(&pod1, 11), (&pod2, 12)] {
        let veth = format!("vp{n}");
        ip_batch(
            &node,
            &[
                format!("link add {veth} type veth peer name eth0 netns {pod}"),
                format!("link set {veth} master br0"),
                format!("link set {veth} up"),
            ],
        );
        ip_batch(
            pod,
            &[
                format!("address add 198.18.1.{n}/24 dev eth0"),
                "link set eth0 up".into(),
                "route add default via 198.18.1.1".into(),
            ],
        );
    }
    // The remote node, with its pod 198.18.2.13.
    ip_batch(
        &node,
        &[
            format!("link add vremote type veth peer name eth0 netns {remote}"),
            "address add 198.18.3.1/24 dev vremote".into(),
            "link set vremote up".into(),
        ],
    );
    ip_batch(
        &remote,
        &[
            "address add 198.18.3.2/24 dev eth0".into(),
            "address add 198.18.2.13/32 dev eth0".into(),
            "link set eth0 up".into(),
            "route add default via 198.18.3.1".into(),
        ],
    );
    ip_batch(&node, &["route add 198.18.2.0/24 via 198.18.3.2".into()]);
    // The external client.
    ip_batch(
        &node,
        &[
            format!("link add vclient type veth peer name eth0 netns {client}"),
            format!("address add {NODE_IP}/24 dev vclient"),
            "link set vclient up".into(),
        ],
    );
    ip_batch(
        &client,
        &[
            "address add 198.18.4.2/24 dev eth0".into(),
            "link set eth0 up".into(),
            "route add default via 198.18.4.1".into(),
        ],
    );
    Ok(namespaces)
}

/// Whether `nft` (nftables) is installed, which `proxy.transparent` needs.
fn have_nft() -> bool {
    Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn addr(text: &str, port: u16) -> SocketAddr {
    SocketAddr::new(text.parse().unwrap(), port)
}

/// Starts backends (echo servers answering with their address) on port 8080 in `ns`,
/// until `stop`.
fn backend(ns: &str, ip: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    in_ns(ns, move || {
        Box::pin(async move {
            let _backend = Backend::start(addr(ip, 8080), "").await.expect("backend");
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    })
}

/// A server on port 8081 in `ns` that answers each connection with the address it came
/// from, until `stop`.
fn peer_echo(ns: &str, ip: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    in_ns(ns, move || {
        Box::pin(async move {
            let listener = tokio::net::TcpListener::bind(addr(ip, 8081))
                .await
                .expect("bind");
            while !stop.load(Ordering::Relaxed) {
                let accepted =
                    tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
                if let Ok(Ok((mut stream, peer))) = accepted {
                    let _ = stream.write_all(peer.to_string().as_bytes()).await;
                }
            }
        })
    })
}

/// The address a [`peer_echo`] at `target` saw for a connection from `ns`, and the
/// connection's own local address.
fn seen_as(ns: &str, target: SocketAddr) -> (String, String) {
    in_ns(ns, move || {
        Box::pin(async move {
            let mut stream = connect(target, None).await.expect("connects");
            let local = stream.local_addr().unwrap().to_string();
            let mut seen = String::new();
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut seen))
                .await
                .expect("an answer")
                .unwrap();
            (seen, local)
        })
    })
    .join()
    .unwrap()
}

/// What a [`udp_responder`] at `target` says a datagram from `ns` came from, and the
/// sending socket's own address.
fn udp_seen_as(ns: &str, target: SocketAddr) -> (String, String) {
    in_ns(ns, move || {
        Box::pin(async move {
            let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
            socket.connect(target).await.unwrap();
            socket.send(b"who-am-i").await.unwrap();
            let mut buffer = [0u8; 128];
            let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buffer))
                .await
                .expect("an answer")
                .unwrap();
            let local = socket.local_addr().unwrap();
            (
                String::from_utf8_lossy(&buffer[..n]).into_owned(),
                local.to_string(),
            )
        })
    })
    .join()
    .unwrap()
}

/// A UDP responder on port 8053 in `ns`, answering each datagram with its address,
/// until `stop`.
fn udp_responder(ns: &str, ip: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    in_ns(ns, move || {
        Box::pin(async move {
            let socket = tokio::net::UdpSocket::bind(addr(ip, 8053))
                .await
                .expect("bind");
            let mut buffer = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                let received =
                    tokio::time::timeout(Duration::from_millis(50), socket.recv_from(&mut buffer))
                        .await;
                if let Ok(Ok((n, from))) = received {
                    // "who-am-i": the sender's address as this pod sees it.
                    let answer = if &buffer[..n] == b"who-am-i" {
                        from.to_string()
                    } else {
                        format!("{ip}:8053")
                    };
                    let _ = socket.send_to(answer.as_bytes(), from).await;
                }
            }
        })
    })
}

/// Who answers one query from each of `count` sockets to `target` from `ns` (no answer
/// within a second: "error: …"); each reply must come from `target` itself.
fn udp_answers(ns: &str, target: SocketAddr, count: usize) -> Vec<String> {
    in_ns(ns, move || {
        Box::pin(async move {
            let mut seen = Vec::new();
            for _ in 0..count {
                let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
                socket.send_to(b"query", target).await.unwrap();
                let mut buffer = [0u8; 512];
                let answer =
                    tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buffer))
                        .await;
                seen.push(match answer {
                    Ok(Ok((n, from))) if from == target => {
                        String::from_utf8_lossy(&buffer[..n]).into_owned()
                    }
                    Ok(Ok((_, from))) => format!("error: answered from {from}"),
                    Ok(Err(e)) => format!("error: {e}"),
                    Err(_) => "error: no answer".to_string(),
                });
            }
            seen
        })
    })
    .join()
    .unwrap()
}

/// Who answers `count` connections to `target` from `ns` (errors as "error: …").
fn answers(ns: &str, target: SocketAddr, count: usize) -> Vec<String> {
    in_ns(ns, move || {
        Box::pin(async move {
            let mut seen = Vec::new();
            for _ in 0..count {
                seen.push(match who(target, None).await {
                    Ok(name) => name,
                    Err(e) => format!("error: {e}"),
                });
            }
            seen
        })
    })
    .join()
    .unwrap()
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` on `target` from `ns`: status code and body.
fn get(ns: &str, target: SocketAddr, path: &'static str) -> Option<(u16, String)> {
    in_ns(ns, move || {
        Box::pin(async move {
            let response = http_get(target, path).await.ok()?;
            let status = response.get(9..12)?.parse().ok()?;
            let body = response.split_once("\r\n\r\n")?.1.to_string();
            Some((status, body))
        })
    })
    .join()
    .unwrap()
}

fn distinct(answers: &[String]) -> std::collections::BTreeSet<&str> {
    answers.iter().map(String::as_str).collect()
}

struct Weir(Child, std::path::PathBuf);

impl Weir {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn node_in_network_namespaces() {
    let namespaces = match topology() {
        Ok(namespaces) => namespaces,
        Err(why) => {
            eprintln!("skipped: node tests need root and `ip netns` ({why})");
            return;
        }
    };
    let node = namespaces.name("node");
    let (pod1, pod2, remote, client) = (
        namespaces.name("pod1"),
        namespaces.name("pod2"),
        namespaces.name("remote"),
        namespaces.name("client"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let _backends = [
        backend(&pod1, "198.18.1.11", stop.clone()),
        backend(&pod2, "198.18.1.12", stop.clone()),
        backend(&remote, "198.18.2.13", stop.clone()),
    ];
    let (local, other, far) = ("198.18.1.11:8080", "198.18.1.12:8080", "198.18.2.13:8080");
    let _echo = peer_echo(&pod1, "198.18.1.11", stop.clone());
    let _responders = [
        udp_responder(&pod1, "198.18.1.11", stop.clone()),
        udp_responder(&remote, "198.18.2.13", stop.clone()),
    ];

    // The API server and weir live in the node namespace: this thread moves there.
    enter(&node);
    let api = ApiServer::start();
    let mut node_object = node_json("node-a", NODE_IP);
    node_object["spec"] = json!({"podCIDRs": ["198.18.1.0/24"]});
    api.apply(node_object);
    let endpoints = [("198.18.1.11", "node-a"), ("198.18.2.13", "node-b")];
    let cluster_ip = |n: u8| format!("198.19.0.{n}");
    let mut local_only = service_json("local-only", &cluster_ip(10), 80, None);
    local_only["spec"]["internalTrafficPolicy"] = json!("Local");
    api.apply(local_only);
    api.apply(slice_json("local-only", &endpoints));
    api.apply(service_json("cluster", &cluster_ip(11), 80, Some("rr")));
    api.apply(slice_json(
        "cluster",
        &[endpoints[0], endpoints[1], ("198.18.1.12", "node-a")],
    ));
    let mut web = service_json("web", &cluster_ip(12), 80, None);
    // healthCheckNodePort: LoadBalancer Services with externalTrafficPolicy Local only.
    web["spec"]["type"] = json!("LoadBalancer");
    web["spec"]["externalTrafficPolicy"] = json!("Local");
    web["spec"]["healthCheckNodePort"] = json!(30256);
    web["spec"]["ports"][0]["nodePort"] = json!(30080);
    let mut away = web.clone();
    // A link-local externalIP (the cloud metadata address) is refused, not captured.
    web["spec"]["externalIPs"] = json!(["198.19.1.2", "169.254.169.254"]);
    web["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.19.1.1"}]}});
    api.apply(web);
    api.apply(slice_json("web", &endpoints));
    away["metadata"]["name"] = json!("away");
    away["spec"]["clusterIP"] = json!(cluster_ip(13));
    away["spec"]["clusterIPs"] = json!([cluster_ip(13)]);
    away["spec"]["healthCheckNodePort"] = json!(30257);
    away["spec"]["ports"][0]["nodePort"] = json!(30081);
    api.apply(away);
    api.apply(slice_json("away", &[endpoints[1]]));
    // No endpoints: no listener, but the address stays local, so connections are refused
    // at once (kube-proxy's REJECT) rather than routed off the node.
    api.apply(service_json("empty", &cluster_ip(14), 80, None));
    api.apply(slice_json("empty", &[]));
    // Cluster DNS: 53/UDP and 53/TCP on one clusterIP; and a UDP NodePort with
    // externalTrafficPolicy Local.
    let mut dns = service_json("dns", &cluster_ip(15), 53, None);
    dns["spec"]["ports"] = json!([
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 8053},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 8080},
    ]);
    let mut udp_local = dns.clone();
    api.apply(dns);
    let dns_ports = json!([
        {"name": "dns", "port": 8053, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 8080, "protocol": "TCP"},
    ]);
    let mut slice = slice_json("dns", &endpoints);
    slice["ports"] = dns_ports.clone();
    api.apply(slice);
    udp_local["metadata"]["name"] = json!("udp-local");
    udp_local["spec"]["clusterIP"] = json!(cluster_ip(16));
    udp_local["spec"]["clusterIPs"] = json!([cluster_ip(16)]);
    udp_local["spec"]["type"] = json!("NodePort");
    udp_local["spec"]["externalTrafficPolicy"] = json!("Local");
    udp_local["spec"]["ports"] = json!([{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 8053, "nodePort": 30053}]);
    api.apply(udp_local);
    let mut slice = slice_json("udp-local", &endpoints);
    slice["ports"] = json!([dns_ports[0]]);
    api.apply(slice);
    // Who connected, as the pod sees it: a NodePort with externalTrafficPolicy Local.
    let mut seen = service_json("seen", &cluster_ip(17), 80, None);
    seen["spec"]["type"] = json!("NodePort");
    seen["spec"]["externalTrafficPolicy"] = json!("Local");
    seen["spec"]["ports"][0]["targetPort"] = json!(8081);
    seen["spec"]["ports"][0]["nodePort"] = json!(30090);
    api.apply(seen);
    let mut slice = slice_json("seen", &[endpoints[0]]);
    slice["ports"][0]["port"] = json!(8081);
    api.apply(slice);
    let round_robin = guest_bytes("round-robin");
    let maglev = guest_bytes("maglev");
    api.apply(policies_json(&[("rr", round_robin.clone())], None));

    let dir = tempfile::tempdir().unwrap();
    let config = kubernetes_config(
        &api,
        dir.path(),
        "",
        &format!(
            "[policies]\ncache_dir = \"{}\"\n\
             [admin]\naddress = \"127.0.0.1:10256\"\n\
             [proxy]\nshutdown_grace_period = \"10s\"\ndrop_timeout = \"1s\"\ntransparent = true\n",
            dir.path().join("cache").display()
        ),
    );
    // What a previous run left on weir0 goes: 198.19.0.99 is no Service's.
    if run(&["link", "add", "weir0", "type", "dummy"]).is_err() {
        run(&["link", "add", "weir0", "type", "bridge"]).unwrap();
    }
    run(&["address", "add", "198.19.0.99/32", "dev", "weir0"]).unwrap();
    let log = dir.path().join("weir.log");
    let child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("weir runs");
    let mut weir = Weir(child, log);
    let admin = addr("127.0.0.1", 10256);
    let ready = || get(&node, admin, "/readyz").is_some_and(|(status, _)| status == 200);
    let end = Instant::now() + WAIT;
    while !ready() {
        assert!(
            Instant::now() < end,
            "weir never got ready:\n{}",
            weir.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The ClusterIPs are on weir0, and a pod reaches them per internalTrafficPolicy.
    let addresses = Command::new("ip")
        .args(["-o", "address", "show", "dev", "weir0"])
        .output()
        .unwrap();
    let addresses = String::from_utf8_lossy(&addresses.stdout);
    for n in 10..=17 {
        assert!(
            addresses.contains(&format!("198.19.0.{n}/32")),
            "{addresses}"
        );
    }
    assert!(!addresses.contains("198.19.0.99"), "stale: {addresses}");
    assert!(
        !addresses.contains("169.254.169.254"),
        "link-local captured: {addresses}"
    );
    wait_for("an AddressRefused Event", || {
        api.events().iter().any(|e| e["reason"] == "AddressRefused")
    });
    let refused = api
        .events()
        .into_iter()
        .find(|e| e["reason"] == "AddressRefused")
        .unwrap();
    assert_eq!(refused["regarding"]["name"], "web");
    assert!(
        refused["note"]
            .as_str()
            .unwrap()
            .contains("169.254.169.254 is a link-local address")
    );
    assert!(addresses.contains("198.19.0.14/32"), "{addresses}");
    let refused = in_ns(&pod2, || {
        Box::pin(async {
            let started = Instant::now();
            let error = who(addr("198.19.0.14", 80), None).await.unwrap_err();
            (error.kind(), started.elapsed())
        })
    })
    .join()
    .unwrap();
    assert_eq!(
        refused.0,
        std::io::ErrorKind::ConnectionRefused,
        "{refused:?}"
    );
    assert!(
        refused.1 < Duration::from_secs(1),
        "refused at once: {refused:?}"
    );
    let seen = answers(&pod2, addr(&cluster_ip(10), 80), 20);
    assert_eq!(
        distinct(&seen),
        [local].into(),
        "iTP Local: this node's endpoint only"
    );
    let seen = answers(&pod2, addr(&cluster_ip(11), 80), 30);
    assert_eq!(
        distinct(&seen),
        [local, other, far].into(),
        "iTP Cluster: every endpoint"
    );

    // NodePort from outside per externalTrafficPolicy Local, and its health check.
    let seen = answers(&client, addr(NODE_IP, 30080), 20);
    assert_eq!(
        distinct(&seen),
        [local].into(),
        "eTP Local: the local endpoint only"
    );
    // proxy.transparent: the local pod sees the external client's own address and port,
    // as kube-proxy shows it; weir put its policy routing in place for that.
    let transparent = have_nft();
    if transparent {
        let (seen, client_address) = seen_as(&client, addr(NODE_IP, 30090));
        assert_eq!(
            seen,
            client_address,
            "the pod saw weir, not the client:\n{}",
            weir.log()
        );
        assert!(seen.starts_with("198.18.4.2:"), "{seen}");
        let rules = Command::new("ip").args(["rule", "list"]).output().unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
        assert!(rules.contains("lookup 2597"), "{rules}");
    } else {
        eprintln!(
            "skipped the proxy.transparent checks: `nft` is not installed (apt-get install -y nftables)"
        );
    }
    // The LoadBalancer IP and the externalIP are on weir0 too, and serve the same way.
    for ip in ["198.19.1.1", "198.19.1.2"] {
        assert!(addresses.contains(&format!("{ip}/32")), "{addresses}");
        let seen = answers(&client, addr(ip, 80), 10);
        assert_eq!(distinct(&seen), [local].into(), "{ip}: eTP Local");
    }
    let (status, body) = get(&client, addr(NODE_IP, 30256), "/")
        .unwrap_or_else(|| panic!("no health check answer:\n{}", weir.log()));
    assert_eq!(status, 200);
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
    let (status, body) = get(&client, addr(NODE_IP, 30257), "/")
        .unwrap_or_else(|| panic!("no health check answer:\n{}", weir.log()));
    assert_eq!(status, 503, "no local endpoint: {body}");
    assert!(body.contains("\"localEndpoints\": 0"), "{body}");
    let seen = answers(&client, addr(NODE_IP, 30081), 2);
    assert!(
        seen.iter().all(|s| s.starts_with("error")),
        "dropped: {seen:?}"
    );

    // UDP: cluster DNS from a pod reaches every endpoint, replies from the Service
    // address; TCP on the same address and port is served beside it.
    let (udp_local_pod, udp_far) = ("198.18.1.11:8053", "198.18.2.13:8053");
    let seen = udp_answers(&pod2, addr(&cluster_ip(15), 53), 30);
    assert_eq!(
        distinct(&seen),
        [udp_local_pod, udp_far].into(),
        "UDP ClusterIP: every endpoint\n{}",
        weir.log()
    );
    // Random per connection: 24 of them all on one of two endpoints is one run in 8 million.
    let seen = answers(&pod2, addr(&cluster_ip(15), 53), 24);
    assert_eq!(distinct(&seen), [local, far].into(), "53/TCP beside 53/UDP");
    // A UDP NodePort from outside with eTP Local: this node's endpoint only.
    let seen = udp_answers(&client, addr(NODE_IP, 30053), 20);
    assert_eq!(
        distinct(&seen),
        [udp_local_pod].into(),
        "UDP NodePort, eTP Local\n{}",
        weir.log()
    );
    // proxy.transparent for UDP too: the pod sees the client's address and port.
    if transparent {
        let (seen, sender) = udp_seen_as(&client, addr(NODE_IP, 30053));
        assert_eq!(seen, sender, "the pod saw another sender");
        assert!(seen.starts_with("198.18.4.2:"), "the pod saw {seen}");
    }

    // A Service deleted takes its address off weir0.
    assert!(api.delete("Service", Some("default"), "away"));
    wait_for("198.19.0.13 leaves weir0", || {
        let output = Command::new("ip")
            .args(["-o", "address", "show", "dev", "weir0"])
            .output()
            .unwrap();
        !String::from_utf8_lossy(&output.stdout).contains("198.19.0.13/")
    });

    // The policies ConfigMap updated 10 times under a client loop: no failed connection.
    let (failures, served, looping) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(true)),
    );
    let client_loop = in_ns(&pod2, {
        let (failures, served, looping) = (failures.clone(), served.clone(), looping.clone());
        let target = addr(&cluster_ip(11), 80);
        move || {
            Box::pin(async move {
                while looping.load(Ordering::Relaxed) {
                    match who(target, None).await {
                        Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        }
    });
    for swap in 0..10 {
        let module = if swap % 2 == 0 { &maglev } else { &round_robin };
        let before = api.events().len();
        api.apply(policies_json(&[("rr", module.clone())], None));
        let sha = weir::policy::sha256_hex(module);
        let end = Instant::now() + WAIT;
        while !api.events()[before..].iter().any(|e| {
            e["reason"] == "PolicyLoaded" && e["note"].as_str().is_some_and(|n| n.contains(&sha))
        }) {
            assert!(
                Instant::now() < end,
                "swap {swap} was not announced:\n{}",
                weir.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let count = served.load(Ordering::Relaxed);
        wait_for("traffic after a swap", || {
            served.load(Ordering::Relaxed) > count + 5
        });
    }
    looping.store(false, Ordering::Relaxed);
    client_loop.join().unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed connections across swaps"
    );

    // SIGTERM: an open connection is drained, then weir exits 0.
    let (go, mut wait_go) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (established, is_established) = std::sync::mpsc::channel::<()>();
    let transfer = in_ns(&pod2, {
        let target = addr(&cluster_ip(10), 80);
        move || {
            Box::pin(async move {
                let mut stream = connect(target, None).await.expect("connects");
                stream.write_all(b"before ").await.unwrap();
                let mut first = vec![0u8; 64];
                let n = stream.read(&mut first).await.unwrap();
                assert!(n > 0);
                established.send(()).unwrap();
                wait_go.recv().await;
                stream.write_all(b"after").await.unwrap();
                stream.shutdown().await.unwrap();
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).await.unwrap();
                String::from_utf8_lossy(&first[..n]).into_owned() + &String::from_utf8_lossy(&rest)
            })
        }
    });
    is_established
        .recv_timeout(WAIT)
        .expect("a connection through weir");
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&weir.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    wait_for("weir stops being ready", || {
        get(&node, admin, "/readyz").is_none_or(|(status, _)| status != 200)
    });
    go.send(()).unwrap();
    let echoed = transfer.join().expect("the drained connection completes");
    assert!(
        echoed.contains("before") && echoed.contains("after"),
        "{echoed}"
    );
    let end = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = weir.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < end, "weir did not exit:\n{}", weir.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}:\n{}", weir.log());
    if transparent {
        // And its policy routing went with it.
        let rules = Command::new("ip").args(["rule", "list"]).output().unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
        assert!(!rules.contains("lookup 2597"), "{rules}");
        let tables = Command::new("nft")
            .args(["list", "tables"])
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&tables.stdout).contains("weir_transparent"));
    }
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn the_capture_interface_is_weirs_own() {
    let mut namespaces = match topology_root() {
        Ok(namespaces) => namespaces,
        Err(why) => {
            eprintln!("skipped: node tests need root and `ip netns` ({why})");
            return;
        }
    };
    let ns = namespaces.add("capture").expect("a namespace");
    std::thread::spawn(move || {
        enter(&ns);
        let wanted: std::collections::BTreeSet<std::net::IpAddr> =
            ["198.19.9.9".parse().unwrap()].into();
        // lo (or eth0) is refused: weir would remove the addresses it did not add.
        let error = weir::capture::Capture::new("lo".into())
            .reconcile(&wanted, true)
            .unwrap_err();
        assert!(
            matches!(&error, weir::capture::CaptureError::NotOurs { interface, .. } if interface == "lo"),
            "{error:?}"
        );
        assert!(error.to_string().contains("not an interface weir may own"), "{error}");
        let lo = Command::new("ip")
            .args(["-o", "address", "show", "dev", "lo"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&lo.stdout).contains("127.0.0.1/8"));
        assert!(!String::from_utf8_lossy(&lo.stdout).contains("198.19.9.9"));
        // Its own is created, filled and emptied.
        let mut capture = weir::capture::Capture::new("weir0".into());
        capture.reconcile(&wanted, true).unwrap();
        let show = || {
            let output = Command::new("ip")
                .args(["-o", "address", "show", "dev", "weir0"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        assert!(show().contains("198.19.9.9/32"), "{}", show());
        capture.reconcile(&Default::default(), true).unwrap();
        assert!(!show().contains("198.19.9.9"), "{}", show());
    })
    .join()
    .unwrap();
}
