//! Kubernetes mode at scale: the real `weir` binary against the test API server holding
//! 10,000 Services and 100,000 endpoints. Prints the time to ready, weir's RSS, and the
//! time from one EndpointSlice change to the data plane using it (p50, p99), measured end
//! to end: the change is applied to the API server, and a client connects until the new
//! endpoint answers.
//!
//! `cargo bench -p weir --bench kube_scale` (release). SERVICES and CHANGES override the
//! sizes. Everything is on 127.0.0.0/8: ClusterIPs 127.40.0.0/16, endpoints 127.41.0.0/16,
//! the measured backends 127.42.0.1 and .2.

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir::test_helpers::apiserver::ApiServer;
use weir::test_helpers::kube_objects::{kubernetes_config, node_json, service_json};
use weir::test_helpers::{Backend, http_get, who};

const ENDPOINTS_PER_SERVICE: usize = 10;

fn cluster_ip(i: usize) -> IpAddr {
    IpAddr::from([127, 40, (i / 250) as u8, (i % 250 + 1) as u8])
}

/// Service `i`'s slice: `ready` first and ready, then unready filler up to ten endpoints.
fn slice(i: usize, ready: IpAddr) -> Value {
    let mut endpoints = vec![json!({
        "addresses": [ready.to_string()], "nodeName": "node-a",
        "conditions": {"ready": true, "serving": true, "terminating": false}
    })];
    for n in 1..ENDPOINTS_PER_SERVICE {
        let ip = IpAddr::from([127, 41, (i / 250) as u8, (n * 25 + i % 25) as u8]);
        endpoints.push(json!({
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
        "endpoints": endpoints
    })
}

/// Resident set size in MiB and MB.
fn rss(pid: u32) -> String {
    let mib = rss_mib(pid);
    format!("{mib:.0} MiB ({:.0} MB)", mib * 1.048_576)
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let services: usize = std::env::var("SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let changes: usize = std::env::var("CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a = IpAddr::from([127, 42, 0, 1]);
    let b = IpAddr::from([127, 42, 0, 2]);
    let _backends = runtime.block_on(async {
        (
            Backend::start(SocketAddr::new(a, 8080), "a").await.unwrap(),
            Backend::start(SocketAddr::new(b, 8080), "b").await.unwrap(),
        )
    });

    let api = ApiServer::start();
    api.apply(node_json("node-a", "127.0.0.1"));
    for i in 0..services {
        api.apply(service_json(
            &format!("svc-{i}"),
            &cluster_ip(i).to_string(),
            8000,
            None,
        ));
        api.apply(slice(i, a));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = kubernetes_config(
        &api,
        dir.path(),
        "capture_interface = \"\"",
        "[policies]\ncache_dir = \"\"\n[admin]\naddress = \"127.0.0.1:10299\"\n",
    );
    println!(
        "kube_scale: {services} Services, {} endpoints ({} ready), {changes} changes",
        services * ENDPOINTS_PER_SERVICE,
        services
    );
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", "--config"])
        .arg(&config)
        .env("WEIR_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("weir runs");
    let admin = SocketAddr::from(([127, 0, 0, 1], 10299));
    let ready = runtime.block_on(async {
        loop {
            if let Ok(response) = http_get(admin, "/readyz").await
                && response.starts_with("HTTP/1.1 200")
            {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "weir not ready after 2 min"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    println!("ready after {ready:.2?}; RSS {}", rss(child.id()));

    // One EndpointSlice change at a time, each on another Service: A <-> B.
    let mut latencies = Vec::with_capacity(changes);
    for change in 0..changes {
        let i = (change * 7919) % services;
        let address = SocketAddr::new(cluster_ip(i), 8000);
        let (to, name) = if runtime.block_on(who(address, None)).ok().as_deref() == Some("a") {
            (b, "b")
        } else {
            (a, "a")
        };
        let t0 = Instant::now();
        api.apply(slice(i, to));
        runtime.block_on(async {
            while who(address, None).await.ok().as_deref() != Some(name) {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "change {change} not applied"
                );
            }
        });
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    println!(
        "EndpointSlice change to data plane: p50 {:.1?}, p99 {:.1?}, max {:.1?}; RSS {}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
        rss(child.id())
    );
    println!(
        "targets: ready < 10 s, RSS < 300 MB, p99 < 50 ms; lists served: services {}, endpointslices {}",
        api.requests("services", false),
        api.requests("endpointslices", false)
    );
    let _ = child.kill();
    let _ = child.wait();
}
