//! What the scale benchmarks share: N Services' objects on 127.40.0.0/16, weir's resident
//! memory, waiting for `/readyz`, and the end-to-end time of one EndpointSlice change.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::apiserver::ApiServer;
use super::kube_objects::{node_json, service_json};
use super::{Backend, http_get, who};

/// The two backends the benches move Services between, answering "a" and "b".
pub const BACKENDS: (IpAddr, IpAddr) = (
    IpAddr::V4(std::net::Ipv4Addr::new(127, 42, 0, 1)),
    IpAddr::V4(std::net::Ipv4Addr::new(127, 42, 0, 2)),
);

/// Starts [`BACKENDS`] on port 8080.
pub async fn start_backends() -> (Backend, Backend) {
    let (a, b) = BACKENDS;
    (
        Backend::start(SocketAddr::new(a, 8080), "a")
            .await
            .expect("backend a"),
        Backend::start(SocketAddr::new(b, 8080), "b")
            .await
            .expect("backend b"),
    )
}

/// Node `node-a` and `services` Services (`svc-N`, annotated with `policy` when given),
/// each with a slice of `endpoints` whose ready one is backend "a".
pub fn fill(api: &ApiServer, services: usize, policy: Option<&str>, endpoints: usize) {
    api.apply(node_json("node-a", "127.0.0.1"));
    for i in 0..services {
        api.apply(service_json(
            &format!("svc-{i}"),
            &cluster_ip(i).to_string(),
            8000,
            policy,
        ));
        api.apply(slice(i, BACKENDS.0, endpoints));
    }
}

/// Service `i`'s clusterIP.
pub fn cluster_ip(i: usize) -> IpAddr {
    IpAddr::from([127, 40, (i / 250) as u8, (i % 250 + 1) as u8])
}

/// Service `i`'s slice of `endpoints`: `ready` first and ready, then unready filler on
/// 127.41.0.0/16.
pub fn slice(i: usize, ready: IpAddr, endpoints: usize) -> Value {
    let mut list = vec![json!({
        "addresses": [ready.to_string()], "nodeName": "node-a",
        "conditions": {"ready": true, "serving": true, "terminating": false}
    })];
    for n in 1..endpoints {
        let ip = IpAddr::from([127, 41, (i / 250) as u8, (n * 25 + i % 25) as u8]);
        list.push(json!({
            "addresses": [ip.to_string()], "nodeName": "node-b",
            "conditions": {"ready": false, "serving": false, "terminating": false}
        }));
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": list
    })
}

/// A process's resident set size in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Waits for `/readyz` to answer 200; returns the time since `started`.
pub async fn wait_ready(admin: SocketAddr, started: Instant, within: Duration) -> Duration {
    loop {
        if let Ok(response) = http_get(admin, "/readyz").await
            && response.starts_with("HTTP/1.1 200")
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "weir not ready after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Moves Service `i` between the backends `a` and `b` (named "a" and "b") and times the
/// change end to end: from the write to the API server until a client connecting to the
/// clusterIP (port 8000) reaches the other one.
pub async fn time_one_change(
    api: &ApiServer,
    i: usize,
    (a, b): (IpAddr, IpAddr),
    endpoints: usize,
) -> Duration {
    let address = SocketAddr::new(cluster_ip(i), 8000);
    let (to, name) = if who(address, None).await.ok().as_deref() == Some("a") {
        (b, "b")
    } else {
        (a, "a")
    };
    let started = Instant::now();
    api.apply(slice(i, to, endpoints));
    while who(address, None).await.ok().as_deref() != Some(name) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the change to svc-{i} was not applied"
        );
    }
    started.elapsed()
}

/// Starts `weir run --config config` (the binary `exe`: the bench's `CARGO_BIN_EXE_weir`)
/// with `WEIR_LOG=log`; returns it with the moment it started.
pub fn spawn_weir(
    exe: &str,
    config: &std::path::Path,
    log: &str,
) -> (std::process::Child, Instant) {
    let started = Instant::now();
    let child = std::process::Command::new(exe)
        .args(["run", "--config"])
        .arg(config)
        .env("WEIR_LOG", log)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("weir runs");
    (child, started)
}

/// Times `count` EndpointSlice changes, each on another of the `services` Services;
/// returns the durations sorted.
pub fn time_changes(
    runtime: &tokio::runtime::Runtime,
    api: &ApiServer,
    services: usize,
    count: usize,
    endpoints: usize,
) -> Vec<Duration> {
    let mut latencies: Vec<Duration> = (0..count)
        .map(|change| {
            let i = (change * 7919) % services;
            runtime.block_on(time_one_change(api, i, BACKENDS, endpoints))
        })
        .collect();
    latencies.sort();
    latencies
}
