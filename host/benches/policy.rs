//! The cost of one `select` through weir's host (worker mutex, Wasm call under an epoch
//! deadline, answer validation) against the same policy logic compiled natively, for
//! kube-default and round-robin at 4, 64 and 1024 endpoints.
//!
//! Run: `cargo bench -p weir --bench policy`. Prints criterion's numbers, then a table of
//! medians with the Wasm/native ratio.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion};
use kube_default::KubeDefault;
use round_robin::RoundRobin;
use weir::policy::{FailureMode, PolicyRuntime};
use weir::test_helpers::{connection, engine_with, guest_bytes, input, service};
use weir_sdk::{Driver, Endpoint, Policy};

const SIZES: [u32; 3] = [4, 64, 1024];

fn endpoints(n: u32) -> Vec<Endpoint> {
    (1..=n)
        .map(|id| {
            let ip = std::net::IpAddr::from([198, 18, (id >> 8) as u8, id as u8]);
            Endpoint::ready(id, std::net::SocketAddr::new(ip, 8080))
        })
        .collect()
}

fn native<P: Policy>(c: &mut Criterion, group: &str, n: u32) {
    let mut driver = Driver::<P>::configure("").expect("configure");
    let node = weir::test_helpers::node("node-a");
    driver.update(1, service("bench", None), &node, &endpoints(n));
    let conn = connection(7);
    c.benchmark_group(group)
        .bench_with_input(BenchmarkId::new("native", n), &n, |b, _| {
            b.iter(|| black_box(driver.select(1, black_box(&conn))))
        });
}

fn wasm(c: &mut Criterion, group: &str, module: &str, n: u32) {
    // The production limits: the deadline machinery is part of what is measured.
    let (engine, _) = engine_with(weir::policy::Limits::default());
    let compiled = engine
        .load(module, module, &guest_bytes(module))
        .expect("load");
    let runtime = PolicyRuntime::new(engine, compiled, "", 1).expect("configure");
    let answer = runtime.update(
        1,
        input(service("bench", None), endpoints(n), FailureMode::Open),
    );
    assert!(answer.failure.is_none());
    let conn = connection(7);
    c.benchmark_group(group)
        .bench_with_input(BenchmarkId::new("wasm", n), &n, |b, _| {
            b.iter(|| black_box(runtime.select(0, 1, black_box(&conn))))
        });
}

fn median_ns(group: &str, kind: &str, n: u32) -> Option<f64> {
    let path = output_dir()
        .join(group)
        .join(kind)
        .join(n.to_string())
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["median"]["point_estimate"].as_f64()
}

fn output_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/criterion")
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&output_dir())
        .configure_from_args()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    for n in SIZES {
        native::<KubeDefault>(&mut c, "select-kube-default", n);
        wasm(&mut c, "select-kube-default", "kube-default", n);
        native::<RoundRobin>(&mut c, "select-round-robin", n);
        wasm(&mut c, "select-round-robin", "round-robin", n);
    }
    c.final_summary();

    println!("\nselect, median ns per call (wasm through the host vs the same logic native)");
    println!(
        "{:<14} {:>9} {:>10} {:>10} {:>7}",
        "policy", "endpoints", "wasm", "native", "ratio"
    );
    for (group, policy) in [
        ("select-kube-default", "kube-default"),
        ("select-round-robin", "round-robin"),
    ] {
        for n in SIZES {
            match (median_ns(group, "wasm", n), median_ns(group, "native", n)) {
                (Some(w), Some(nat)) => println!(
                    "{policy:<14} {n:>9} {w:>10.1} {nat:>10.1} {:>6.1}x",
                    w / nat
                ),
                _ => println!("{policy:<14} {n:>9}  (not measured in this run)"),
            }
        }
    }
}
