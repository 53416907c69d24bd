//! `weir explain` against YAML fixtures: each `tests/fixtures/explain/<case>/objects.yaml`
//! must produce exactly `expected.json` on node `node-a`. The expected files were checked
//! by hand against shared/kube-proxy-semantics.md; the comment at the top of each
//! objects.yaml says what the case shows.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn weir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/explain")
}

fn explain_json(args: &[&str]) -> Value {
    let output = weir()
        .arg("explain")
        .args(args)
        .args(["-o", "json"])
        .output()
        .expect("run weir");
    assert!(
        output.status.success(),
        "weir explain {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("explain prints JSON")
}

fn golden(case: &str) {
    let dir = fixtures().join(case);
    let objects = dir.join("objects.yaml");
    let actual = explain_json(&["--objects", objects.to_str().unwrap(), "--node", "node-a"]);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert_eq!(
        actual,
        expected,
        "{case}: got\n{}",
        serde_json::to_string_pretty(&actual).unwrap()
    );
}

#[test]
fn cluster_ip_service_forwards_to_ready_endpoints() {
    golden("basic");
}

#[test]
fn external_traffic_policy_local_and_health_check_node_port() {
    golden("etp-local");
}

#[test]
fn internal_traffic_policy_local_drops_without_local_endpoints() {
    golden("itp-local");
}

#[test]
fn no_usable_endpoints_rejects_every_destination() {
    golden("no-endpoints");
}

#[test]
fn serving_terminating_endpoints_take_over_when_none_is_ready() {
    golden("terminating-fallback");
}

#[test]
fn zone_hints_filter_cluster_endpoints() {
    golden("topology-hints");
}

#[test]
fn dual_stack_service_has_one_entry_per_family() {
    golden("dual-stack");
}

#[test]
fn kubectl_list_output_is_read_as_is() {
    golden("kubectl-list");
}

#[test]
fn duplicate_endpoints_across_slices_prefer_the_running_one() {
    golden("dedup");
}

#[test]
fn external_ips_and_vip_ingress_make_a_port_external() {
    golden("external-ips-lb");
}

#[test]
fn slice_ports_match_by_name_and_protocol() {
    golden("affinity-and-named-ports");
}

#[test]
fn output_shape_is_the_documented_one() {
    let dir = fixtures().join("etp-local/objects.yaml");
    let report = explain_json(&["--objects", dir.to_str().unwrap(), "--node", "node-a"]);
    assert_eq!(report["node"], "node-a");
    let first = &report["services"][0];
    for key in [
        "service",
        "port",
        "protocol",
        "policy",
        "internal",
        "external",
        "healthCheckNodePort",
    ] {
        assert!(first.get(key).is_some(), "missing {key} in {first}");
    }
    assert_eq!(first["healthCheckNodePort"]["status"], 200);
    assert_eq!(first["healthCheckNodePort"]["localEndpoints"], 2);
}

#[test]
fn node_without_local_endpoints_sees_the_other_side() {
    let dir = fixtures().join("etp-local/objects.yaml");
    let report = explain_json(&["--objects", dir.to_str().unwrap(), "--node", "node-b"]);
    let remote = &report["services"][2];
    assert_eq!(remote["service"], "default/lb-remote");
    assert_eq!(remote["external"]["action"], "forward");
    assert_eq!(remote["external"]["endpoints"][0], "198.18.0.20:8080");
    assert_eq!(remote["healthCheckNodePort"]["status"], 200);
}

#[test]
fn policy_annotation_selects_a_module_from_the_policies_dir() {
    let policies = tempfile::tempdir().unwrap();
    std::fs::copy(
        weir::test_helpers::guest_path("round-robin"),
        policies.path().join("round-robin.wasm"),
    )
    .unwrap();
    let objects = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixtures().join("basic/objects.yaml"))
        .unwrap()
        .replace(
            "metadata: {name: web, namespace: shop}",
            "metadata: {name: web, namespace: shop, annotations: {weir.dev/policy: round-robin}}",
        );
    std::fs::write(objects.path().join("objects.yaml"), text).unwrap();
    let report = explain_json(&[
        "--objects",
        objects.path().to_str().unwrap(),
        "--node",
        "node-a",
        "--policies",
        policies.path().to_str().unwrap(),
    ]);
    let web = &report["services"][0];
    assert_eq!(web["policy"], "round-robin");
    assert!(web.get("policyFailure").is_none(), "{web}");
    assert_eq!(web["internal"]["endpoints"].as_array().unwrap().len(), 2);
}

#[test]
fn missing_policy_follows_the_failure_mode() {
    let objects = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixtures().join("basic/objects.yaml")).unwrap();
    let open = text.replace(
        "metadata: {name: web, namespace: shop}",
        "metadata: {name: web, namespace: shop, annotations: {weir.dev/policy: nowhere}}",
    );
    std::fs::write(objects.path().join("objects.yaml"), &open).unwrap();
    let args = [
        "--objects",
        objects.path().to_str().unwrap(),
        "--node",
        "node-a",
    ];
    let web = explain_json(&args)["services"][0].clone();
    assert_eq!(web["policy"], "nowhere");
    assert_eq!(
        web["internal"]["action"], "forward",
        "open: kube-default's answer"
    );
    assert!(
        web["policyFailure"]
            .as_str()
            .unwrap()
            .contains("nowhere.wasm"),
        "{web}"
    );

    let closed = open.replace(
        "weir.dev/policy: nowhere}",
        "weir.dev/policy: nowhere, weir.dev/failure-mode: closed}",
    );
    std::fs::write(objects.path().join("objects.yaml"), closed).unwrap();
    let web = explain_json(&args)["services"][0].clone();
    assert_eq!(
        web["internal"]["action"], "reject",
        "closed: nothing is eligible"
    );
}

#[test]
fn table_output_has_one_row_per_service_port() {
    let dir = fixtures().join("etp-local/objects.yaml");
    let output = weir()
        .args([
            "explain",
            "--objects",
            dir.to_str().unwrap(),
            "--node",
            "node-a",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("default/")).collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert!(
        rows[2].contains("drop") && rows[2].contains("503"),
        "{}",
        rows[2]
    );
}

/// HTTP ports are marked (`appProtocol: grpc` is h2c to endpoints, `http` HTTP/1.1, and
/// `weir.dev/protocol: http` makes a port without one HTTP); the rest stay L4.
#[test]
fn http_ports_are_marked() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects.yaml");
    std::fs::write(
        &objects,
        "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\n\
         spec:\n  clusterIP: 127.0.0.10\n  ports:\n  - {name: grpc, port: 9000, appProtocol: grpc}\n  \
         - {name: web, port: 80, appProtocol: http}\n  - {name: raw, port: 7000}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: old, namespace: shop, annotations: {weir.dev/protocol: http}}\n\
         spec:\n  clusterIP: 127.0.0.11\n  ports: [{name: web, port: 80}]\n",
    )
    .unwrap();
    let report = explain_json(&["--objects", objects.to_str().unwrap(), "--node", "node-a"]);
    let expect = |service: &str, port: &str, http: Value| {
        assert!(
            http_contains(&http_list(&report), service, port, &http),
            "{service} {port}: {report:#}"
        )
    };
    expect("shop/api", "grpc", Value::from("h2c"));
    expect("shop/api", "web", Value::from("http"));
    expect("shop/api", "raw", Value::Null);
    expect("shop/old", "web", Value::from("http"));
    let table = weir()
        .args([
            "explain",
            "--objects",
            objects.to_str().unwrap(),
            "--node",
            "node-a",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("TCP/h2c"));
}

fn http_list(report: &Value) -> Vec<(String, String, Value)> {
    report["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap().to_string(),
                s["port"].as_str().unwrap().to_string(),
                s["http"].clone(),
            )
        })
        .collect()
}

fn http_contains(
    list: &[(String, String, Value)],
    service: &str,
    port: &str,
    http: &Value,
) -> bool {
    list.iter()
        .any(|(s, p, h)| s == service && p == port && h == http)
}
