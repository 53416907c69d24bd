//! What policies cost through weir's host, against the same logic compiled natively:
//! `select` (worker mutex, Wasm call under an epoch deadline, answer validation) for every
//! library policy at 4, 64 and 1024 endpoints, and `update` at 1024 and 10,000 endpoints.
//!
//! Also `select-request` (HTTP ports, contract 0.2.0) for maglev hashing a header and
//! round-robin, at 64 endpoints (`POLICIES=request` for those alone).
//!
//! Run: `cargo bench -p weir --bench policy` (all) or with a filter, e.g.
//! `POLICIES=maglev cargo bench -p weir --bench policy -- select-maglev` (POLICIES limits
//! which policies are set up at all). Prints criterion's numbers, then
//! tables of medians with the Wasm/native ratio.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion};
use weir::policy::{FailureMode, PolicyRuntime};
use weir::test_helpers::{connection, engine_with, guest_bytes, input, node, service};
use weir_sdk::{Driver, Endpoint, Policy};

const SELECT_SIZES: [u32; 3] = [4, 64, 1024];
const UPDATE_SIZES: [u32; 2] = [1024, 10_000];

fn endpoints(n: u32) -> Vec<Endpoint> {
    (1..=n)
        .map(|id| {
            let ip = IpAddr::from([198, 18, (id >> 8) as u8, id as u8]);
            Endpoint::ready(id, SocketAddr::new(ip, 8080))
        })
        .collect()
}

/// One library policy: its name, and how to bench its native build.
struct Subject {
    module: &'static str,
    native_select: fn(&mut Criterion, &str, u32),
    native_update: fn(&mut Criterion, &str, u32),
}

fn native_select<P: Policy>(c: &mut Criterion, group: &str, n: u32) {
    let mut driver = Driver::<P>::configure("").expect("configure");
    driver.update(1, service("bench", None), &node("node-a"), &endpoints(n));
    let conn = connection(7);
    c.benchmark_group(group)
        .bench_with_input(BenchmarkId::new("native", n), &n, |b, _| {
            b.iter(|| black_box(driver.select(1, black_box(&conn))))
        });
}

fn native_update<P: Policy>(c: &mut Criterion, group: &str, n: u32) {
    let mut driver = Driver::<P>::configure("").expect("configure");
    let eps = endpoints(n);
    let node = node("node-a");
    let mut group = c.benchmark_group(group);
    group.sample_size(10);
    group.bench_with_input(BenchmarkId::new("native", n), &n, |b, _| {
        b.iter(|| black_box(driver.update(1, service("bench", None), &node, &eps)))
    });
}

fn runtime(module: &str) -> (PolicyRuntime, std::sync::Arc<weir::metrics::PolicyMetrics>) {
    runtime_with(module, "")
}

fn runtime_with(
    module: &str,
    config: &str,
) -> (PolicyRuntime, std::sync::Arc<weir::metrics::PolicyMetrics>) {
    // Production limits, but an update deadline that 10,000 endpoints cannot miss: the
    // point is the cost, not the deadline.
    let limits = weir::policy::Limits {
        update_deadline: std::time::Duration::from_secs(5),
        ..weir::policy::Limits::default()
    };
    let (engine, metrics) = engine_with(limits);
    let compiled = engine
        .load(module, module, &guest_bytes(module))
        .expect("load");
    let runtime = PolicyRuntime::new(engine, compiled, config).expect("configure");
    (runtime, metrics)
}

/// `select-request` on an HTTP request (contract 0.2.0): maglev hashing the `x-user`
/// header, so each call reads one header through the host; and round-robin, which reads
/// nothing (the SDK's default asks its `select`).
fn wasm_select_request(c: &mut Criterion) {
    let (head, ()) = hyper::Request::get("/items?page=2")
        .header("host", "shop.example")
        .header("x-user", "alice")
        .header("accept", "*/*")
        .body(())
        .expect("a request")
        .into_parts();
    let head = std::sync::Arc::new(head);
    let conn = connection(7);
    for (module, config) in [
        ("maglev", r#"{"hash": "header", "header": "x-user"}"#),
        ("round-robin", ""),
    ] {
        let (runtime, metrics) = runtime_with(module, config);
        let answer = runtime.update(
            1,
            input(service("bench", None), endpoints(64), FailureMode::Open),
        );
        assert!(answer.failure.is_none(), "{module}: {:?}", answer.failure);
        c.benchmark_group("select-request").bench_with_input(
            BenchmarkId::new(module, 64),
            &64,
            |b, _| b.iter(|| black_box(runtime.select_request(1, black_box(&conn), &head))),
        );
        warn_on_failures(&metrics, module, "select-request", 64);
    }
}

/// A policy that failed during its run was measured on its failure mode: say so.
fn warn_on_failures(metrics: &weir::metrics::PolicyMetrics, module: &str, what: &str, n: u32) {
    let failures = metrics.failures_total(module);
    if failures > 0 {
        eprintln!(
            "WARNING: {module} {what} at {n} endpoints failed {failures} calls (a deadline missed on a busy machine?); its numbers include the failure mode"
        );
    }
}

fn wasm_select(c: &mut Criterion, group: &str, module: &str, n: u32) {
    let (runtime, metrics) = runtime(module);
    let answer = runtime.update(
        1,
        input(service("bench", None), endpoints(n), FailureMode::Open),
    );
    assert!(answer.failure.is_none(), "{module}: {:?}", answer.failure);
    let conn = connection(7);
    c.benchmark_group(group)
        .bench_with_input(BenchmarkId::new("wasm", n), &n, |b, _| {
            b.iter(|| black_box(runtime.select(1, black_box(&conn))))
        });
    warn_on_failures(&metrics, module, "select", n);
}

fn wasm_update(c: &mut Criterion, group: &str, module: &str, n: u32) {
    let (runtime, metrics) = runtime(module);
    let eps = endpoints(n);
    let mut group = c.benchmark_group(group);
    group.sample_size(10);
    group.bench_with_input(BenchmarkId::new("wasm", n), &n, |b, _| {
        b.iter(|| {
            let answer = runtime.update(
                1,
                input(service("bench", None), eps.clone(), FailureMode::Open),
            );
            assert!(answer.failure.is_none(), "{module}: {:?}", answer.failure);
            black_box(answer)
        })
    });
    drop(group);
    warn_on_failures(&metrics, module, "update", n);
}

fn output_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/criterion")
}

fn median_ns(group: &str, kind: &str, n: u32) -> Option<f64> {
    let path = output_dir()
        .join(group)
        .join(kind)
        .join(n.to_string())
        .join("new/estimates.json");
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    value["median"]["point_estimate"].as_f64()
}

macro_rules! subject {
    ($module:literal, $ty:ty) => {
        Subject {
            module: $module,
            native_select: native_select::<$ty>,
            native_update: native_update::<$ty>,
        }
    };
}

fn main() {
    let subjects = [
        subject!("kube-default", kube_default::KubeDefault),
        subject!("round-robin", round_robin::RoundRobin),
        subject!("random", random::Random),
        subject!("least-connections", least_connections::LeastConnections),
        subject!("p2c-ewma", p2c_ewma::P2cEwma),
        subject!("maglev", maglev::Maglev),
        subject!("ring-hash", ring_hash::RingHash),
        subject!("locality", locality::Locality),
        subject!("client-ip-affinity", client_ip_affinity::ClientIpAffinity),
    ];
    let mut c = Criterion::default()
        .output_directory(&output_dir())
        .configure_from_args()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    // POLICIES=maglev,round-robin: set up (compile, instantiate) only those.
    let only: Option<Vec<String>> = std::env::var("POLICIES")
        .ok()
        .map(|v| v.split(',').map(|p| p.trim().to_string()).collect());
    let wanted = |s: &&Subject| {
        only.as_ref()
            .is_none_or(|o| o.iter().any(|p| p == s.module))
    };
    for s in subjects.iter().filter(wanted) {
        let group = format!("select-{}", s.module);
        for n in SELECT_SIZES {
            (s.native_select)(&mut c, &group, n);
            wasm_select(&mut c, &group, s.module, n);
        }
        let group = format!("update-{}", s.module);
        for n in UPDATE_SIZES {
            (s.native_update)(&mut c, &group, n);
            wasm_update(&mut c, &group, s.module, n);
        }
    }
    if only.is_none() || std::env::var("POLICIES").is_ok_and(|p| p.contains("request")) {
        wasm_select_request(&mut c);
    }
    c.final_summary();

    for (what, sizes, unit, scale) in [
        ("select", &SELECT_SIZES[..], "ns", 1.0),
        ("update", &UPDATE_SIZES[..], "ms", 1e-6),
    ] {
        println!(
            "\n{what}, median {unit} per call: Wasm through the host vs the same logic native"
        );
        println!(
            "{:<20} {:>9} {:>10} {:>10} {:>7}",
            "policy", "endpoints", "wasm", "native", "ratio"
        );
        for s in &subjects {
            let group = format!("{what}-{}", s.module);
            for &n in sizes {
                match (median_ns(&group, "wasm", n), median_ns(&group, "native", n)) {
                    (Some(w), Some(nat)) => println!(
                        "{:<20} {n:>9} {:>10.2} {:>10.2} {:>6.1}x",
                        s.module,
                        w * scale,
                        nat * scale,
                        w / nat
                    ),
                    _ => println!("{:<20} {n:>9}  (not measured in this run)", s.module),
                }
            }
        }
    }
}
