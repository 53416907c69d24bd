//! Policies at cluster scale: the real `weir` binary, in Kubernetes mode against the test
//! API server, with 100 / 1,000 / 10,000 Services on one policy (the built-in
//! kube-default, round-robin.wasm, maglev.wasm shipped in the policies ConfigMap) and 2 or
//! 8 data-plane workers. For each it prints the time to ready, weir's RSS, the policy
//! failures and fallbacks counted, and the time one EndpointSlice change takes to reach
//! the data plane (median of a few, end to end: a client connects until the new endpoint
//! answers); then the cost of a Service on a Wasm policy over the built-in one.
//!
//! `cargo bench -p weir --bench policy_scale` (release). Filters: SIZES=100,1000
//! POLICIES=maglev WORKERS=8 CHANGES=10. Everything is on 127.0.0.0/8: ClusterIPs
//! 127.40.0.0/16, unready endpoints 127.41.0.0/16, the measured backends 127.42.0.1 and .2.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use weir::test_helpers::apiserver::ApiServer;
use weir::test_helpers::kube_objects::{kubernetes_config, policies_json};
use weir::test_helpers::scale::{
    fill, rss_mib, spawn_weir, start_backends, time_changes, wait_ready,
};
use weir::test_helpers::{guest_bytes, http_get};

const ENDPOINTS_PER_SERVICE: usize = 4;
const ADMIN: u16 = 10298;

/// The sum of every sample of a metric family in a Prometheus text page.
fn metric_sum(page: &str, family: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

fn list<T: std::str::FromStr + Clone>(name: &str, default: &[T]) -> Vec<T> {
    match std::env::var(name) {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => default.to_vec(),
    }
}

struct Run {
    ready: Duration,
    rss: f64,
    failures: f64,
    fallbacks: f64,
    change: Duration,
}

fn run(policy: &str, services: usize, workers: usize, changes: usize) -> Run {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _backends = runtime.block_on(start_backends());
    let api = ApiServer::start();
    let modules: Vec<(&str, Vec<u8>)> = ["round-robin", "maglev"]
        .into_iter()
        .map(|name| (name, guest_bytes(name)))
        .collect();
    api.apply(policies_json(&modules, None));
    let annotation = (policy != "kube-default").then_some(policy);
    fill(&api, services, annotation, ENDPOINTS_PER_SERVICE);
    let dir = tempfile::tempdir().unwrap();
    let config = kubernetes_config(
        &api,
        dir.path(),
        "capture_interface = \"\"",
        &format!(
            "[policies]\ncache_dir = \"\"\n[admin]\naddress = \"127.0.0.1:{ADMIN}\"\n[proxy]\nworkers = {workers}\n"
        ),
    );
    let (mut child, started) = spawn_weir(env!("CARGO_BIN_EXE_weir"), &config, "error");
    let admin = SocketAddr::from(([127, 0, 0, 1], ADMIN));
    let ready = runtime.block_on(wait_ready(admin, started, Duration::from_secs(180)));
    let rss = rss_mib(child.id());

    let latencies = time_changes(&runtime, &api, services, changes, ENDPOINTS_PER_SERVICE);
    let page = runtime
        .block_on(http_get(admin, "/metrics"))
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    Run {
        ready,
        rss,
        failures: metric_sum(&page, "weir_policy_failures_total"),
        fallbacks: metric_sum(&page, "weir_policy_fallbacks_total"),
        change: latencies
            .get(latencies.len() / 2)
            .copied()
            .unwrap_or_default(),
    }
}

fn main() {
    let sizes: Vec<usize> = list("SIZES", &[100, 1_000, 10_000]);
    let policies: Vec<String> = list(
        "POLICIES",
        &[
            "kube-default".to_string(),
            "round-robin".to_string(),
            "maglev".to_string(),
        ],
    );
    let workers: Vec<usize> = list("WORKERS", &[2, 8]);
    let changes: usize = std::env::var("CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    println!(
        "policy_scale: {ENDPOINTS_PER_SERVICE} endpoints per Service (1 ready), {changes} changes per run"
    );
    println!(
        "{:<13} {:>8} {:>7} {:>9} {:>10} {:>9} {:>9} {:>10}",
        "policy", "services", "workers", "ready", "RSS MiB", "failures", "fallback", "change p50"
    );
    let mut rss = BTreeMap::new();
    for &size in &sizes {
        for policy in &policies {
            for &w in &workers {
                let r = run(policy, size, w, changes);
                println!(
                    "{:<13} {:>8} {:>7} {:>8.2}s {:>10.1} {:>9} {:>9} {:>9.1?}",
                    policy,
                    size,
                    w,
                    r.ready.as_secs_f64(),
                    r.rss,
                    r.failures,
                    r.fallbacks,
                    r.change
                );
                rss.insert((policy.clone(), size, w), r.rss);
            }
        }
    }
    println!();
    for &size in &sizes {
        for &w in &workers {
            let Some(base) = rss.get(&("kube-default".to_string(), size, w)) else {
                continue;
            };
            for policy in policies.iter().filter(|p| *p != "kube-default") {
                if let Some(r) = rss.get(&(policy.clone(), size, w)) {
                    println!(
                        "{policy} over kube-default at {size} Services, {w} workers: {:.0} KiB per Service",
                        (r - base) * 1024.0 / size as f64
                    );
                }
            }
        }
    }
    println!(
        "targets: maglev 1,000 Services / 8 workers ready < 10 s, RSS < 50 MiB + 0.75 MiB per Service, 0 failures; round-robin 10,000 ready < 10 s, < 100 KiB per Service"
    );
}
