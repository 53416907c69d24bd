//! Kubernetes objects as the API server serves them (JSON), for the Kubernetes-mode tests
//! and the scale benchmark. Services listen on their port and target 8080.

use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{Value, json};

use super::apiserver::ApiServer;

/// Writes `dir/weir.toml` for Kubernetes mode against `api` (node `node-a`, namespace
/// `weir`) and returns its path. `node` adds lines to `[node]`; `rest` follows the
/// `[source]` table's lines (more of them, then other tables).
pub fn kubernetes_config(api: &ApiServer, dir: &Path, node: &str, rest: &str) -> PathBuf {
    let kubeconfig = api.kubeconfig(dir);
    let path = dir.join("weir.toml");
    let text = format!(
        "[node]\nname = \"node-a\"\n{node}\n\
         [source]\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespace = \"weir\"\n{rest}\n",
        kubeconfig.display()
    );
    std::fs::write(&path, text).expect("weir.toml written");
    path
}

/// Node `name` with `internal_ip` as its InternalIP, in zone z1.
pub fn node_json(name: &str, internal_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "z1"}},
        "status": {"addresses": [
            {"type": "InternalIP", "address": internal_ip},
            {"type": "Hostname", "address": name}
        ]}
    })
}

/// A ClusterIP Service in `default` with one TCP port `http`, annotated with `policy`.
pub fn service_json(name: &str, cluster_ip: &str, port: u16, policy: Option<&str>) -> Value {
    let mut service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "annotations": {}},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]}
    });
    if let Some(policy) = policy {
        service["metadata"]["annotations"]["weir.dev/policy"] = json!(policy);
    }
    service
}

/// The EndpointSlice of Service `service`: ready endpoints (address, node) on port 8080.
pub fn slice_json(service: &str, endpoints: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node)| {
            json!({"addresses": [ip], "nodeName": node,
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

/// The policies ConfigMap `weir/weir-policies`: `modules` as binaryData `NAME.wasm`,
/// `settings` as `policies.toml`.
pub fn policies_json(modules: &[(&str, Vec<u8>)], settings: Option<&str>) -> Value {
    let mut map = ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("weir-policies".into()),
            namespace: Some("weir".into()),
            ..Default::default()
        },
        binary_data: Some(
            modules
                .iter()
                .map(|(name, bytes)| {
                    // A gzipped module ships as NAME.wasm.gz, as build-policies.sh ships it.
                    let suffix = if bytes.starts_with(&[0x1f, 0x8b]) {
                        "wasm.gz"
                    } else {
                        "wasm"
                    };
                    (format!("{name}.{suffix}"), ByteString(bytes.clone()))
                })
                .collect(),
        ),
        ..Default::default()
    };
    if let Some(settings) = settings {
        map.data = Some([("policies.toml".to_string(), settings.to_string())].into());
    }
    let mut value = serde_json::to_value(map).expect("a ConfigMap serialises");
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("ConfigMap");
    value
}
