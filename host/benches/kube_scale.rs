//! Kubernetes mode at scale: the real `weir` binary against the test API server holding
//! 10,000 Services and 100,000 endpoints. Prints the time to ready, weir's RSS, and the
//! time from one EndpointSlice change to the data plane using it (p50, p99), measured end
//! to end: the change is applied to the API server, and a client connects until the new
//! endpoint answers.
//!
//! `cargo bench -p weir --bench kube_scale` (release). SERVICES and CHANGES override the
//! sizes. Everything is on 127.0.0.0/8: ClusterIPs 127.40.0.0/16, endpoints 127.41.0.0/16,
//! the measured backends 127.42.0.1 and .2.

use std::net::SocketAddr;
use std::time::Duration;

use weir::test_helpers::apiserver::ApiServer;
use weir::test_helpers::kube_objects::kubernetes_config;
use weir::test_helpers::scale::{
    fill, rss_mib, spawn_weir, start_backends, time_changes, wait_ready,
};

const ENDPOINTS_PER_SERVICE: usize = 10;

/// Resident set size in MiB and MB.
fn rss(pid: u32) -> String {
    let mib = rss_mib(pid);
    format!("{mib:.0} MiB ({:.0} MB)", mib * 1.048_576)
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
    let _backends = runtime.block_on(start_backends());

    let api = ApiServer::start();
    fill(&api, services, None, ENDPOINTS_PER_SERVICE);
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
    let (mut child, started) = spawn_weir(env!("CARGO_BIN_EXE_weir"), &config, "warn");
    let admin = SocketAddr::from(([127, 0, 0, 1], 10299));
    let ready = runtime.block_on(wait_ready(admin, started, Duration::from_secs(120)));
    println!("ready after {ready:.2?}; RSS {}", rss(child.id()));

    // One EndpointSlice change at a time, each on another Service: A <-> B.
    let latencies = time_changes(&runtime, &api, services, changes, ENDPOINTS_PER_SERVICE);
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
