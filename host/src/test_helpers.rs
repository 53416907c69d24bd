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
