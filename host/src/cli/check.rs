//! `weir policy check`: load a module the way the proxy would, configure it, run one
//! `update` on a synthetic service and a few `select`s, and say what it did.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use weir_sdk::{Connection, Endpoint, IpFamily, Node, Protocol, Scope, Service};

use crate::metrics::PolicyMetrics;
use crate::policy::{
    CallError, FailureMode, HostDecision, Limits, LoadError, PolicyEngine, PolicyRuntime,
    ServiceInput,
};

/// What `check` found; `Err` from [`check`] means the module is unusable.
pub struct CheckReport {
    pub text: String,
}

/// Why a module is unusable, naming the file and the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot start the policy engine: {0}")]
    Engine(String),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{file}: {error}")]
    Configure { file: String, error: CallError },
    #[error("{file}: update on a synthetic service failed: {error}")]
    Update { file: String, error: CallError },
    #[error("{file}: select for {scope:?} traffic failed; see the log above")]
    Select { file: String, scope: Scope },
}

/// The module's size as `deploy/build-policies.sh` ships it: gzipped (`NAME.wasm.gz`).
fn gzipped_size(path: &Path) -> usize {
    use std::io::Write;
    let Ok(bytes) = std::fs::read(path) else {
        return 0;
    };
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return bytes.len();
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let _ = encoder.write_all(&bytes);
    encoder.finish().map_or(0, |gzip| gzip.len())
}

/// Checks one module file with `config` as its configuration.
pub fn check(path: &Path, config: &str) -> Result<CheckReport, CheckError> {
    let file = path.display().to_string();
    let metrics = Arc::new(PolicyMetrics::default());
    let engine = PolicyEngine::new(Limits::relaxed(), None, metrics.clone())
        .map_err(|e| CheckError::Engine(format!("{e:#}")))?;
    let compiled = engine.load_file(path)?;
    let mut text = String::new();
    let _ = writeln!(text, "policy:       {}", compiled.name);
    let _ = writeln!(text, "file:         {}", path.display());
    let shipped = gzipped_size(path);
    let _ = writeln!(
        text,
        "size:         {} bytes ({} KiB); gzipped {} KiB, {:.0}% of the 1 MiB a ConfigMap holds",
        compiled.size,
        compiled.size.div_ceil(1024),
        shipped.div_ceil(1024),
        shipped as f64 * 100.0 / f64::from(1u32 << 20)
    );
    let _ = writeln!(text, "sha256:       {}", compiled.sha256);
    let _ = writeln!(
        text,
        "compile time: {:.1} ms",
        compiled.compile_time.as_secs_f64() * 1e3
    );
    let _ = writeln!(text, "exports:      {}", compiled.exports.join(", "));
    let _ = writeln!(text, "imports:      {}", compiled.imports.join(", "));

    let runtime =
        PolicyRuntime::new(engine.clone(), compiled.clone(), config).map_err(|error| {
            CheckError::Configure {
                file: file.clone(),
                error,
            }
        })?;
    let _ = writeln!(text, "configure:    ok");

    let input = synthetic_service();
    let answer = runtime.update(1, input.clone());
    if let Some(error) = answer.failure {
        return Err(CheckError::Update { file, error });
    }
    let show = |ids: &[u32]| {
        ids.iter()
            .filter_map(|id| input.endpoints.iter().find(|e| e.id == *id))
            .map(|e| e.address.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        text,
        "update:       ok (internal: [{}] else {:?}; external: [{}] else {:?})",
        show(&answer.eligibility.internal.endpoints),
        answer.eligibility.internal.when_empty,
        show(&answer.eligibility.external.endpoints),
        answer.eligibility.external.when_empty,
    );
    for scope in [Scope::Internal, Scope::External] {
        let connection = Connection {
            client: "198.18.100.1:40000".parse().expect("literal"),
            destination: "127.0.0.10:80".parse().expect("literal"),
            scope,
        };
        let decision = runtime.select(1, &connection);
        if metrics.failures_total(&compiled.name) > 0 {
            return Err(CheckError::Select { file, scope });
        }
        let shown = match decision {
            HostDecision::Forward { address, .. } => format!("forward to {address}"),
            HostDecision::Reject => "reject".into(),
            HostDecision::Drop => "drop".into(),
        };
        let _ = writeln!(text, "select:       {scope:?} -> {shown}");
    }
    Ok(CheckReport { text })
}

/// A NodePort service with eTP=Local: two ready endpoints (one on this node), one
/// terminating.
fn synthetic_service() -> ServiceInput {
    let endpoint = |id: u32, address: &str, local: bool, ready: bool| Endpoint {
        id,
        address: address.parse::<SocketAddr>().expect("literal"),
        ready,
        serving: true,
        terminating: !ready,
        node_name: Some(if local { "check-node" } else { "other-node" }.to_string()),
        zone: None,
        is_local: local,
        zone_hints: Vec::new(),
        node_hints: Vec::new(),
    };
    ServiceInput {
        service: Service {
            namespace: "default".into(),
            name: "check".into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
            ip_family: IpFamily::V4,
            cluster_ip: "127.0.0.10".parse().expect("literal"),
            port: 80,
            node_port: 30080,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            internal_traffic_local: false,
            external_traffic_local: true,
            session_affinity_timeout: None,
            config: None,
        },
        node: Arc::new(Node {
            name: "check-node".into(),
            labels: Vec::new(),
        }),
        endpoints: vec![
            endpoint(1, "198.18.0.1:8080", true, true),
            endpoint(2, "198.18.0.2:8080", false, true),
            endpoint(3, "198.18.0.3:8080", false, false),
        ],
        failure_mode: FailureMode::Closed,
        memory_mib: None,
    }
}
