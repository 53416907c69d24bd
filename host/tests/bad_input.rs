//! Bad input gets a message naming the file, the object and the problem, and loses
//! nothing that was good.

use std::path::Path;
use std::process::{Command, Output};

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .output()
        .expect("run weir")
}

fn explain(dir: &Path) -> Output {
    weir(&[
        "explain",
        "--objects",
        dir.to_str().unwrap(),
        "--node",
        "node-a",
        "-o",
        "json",
    ])
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const GOOD_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: good}\nspec: {clusterIP: 127.0.0.10, ports: [{name: http, port: 80}]}\n";

#[test]
fn malformed_yaml_names_the_file_and_line_and_exits_65() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.yaml"), GOOD_SERVICE).unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n   namespace: x\n",
    )
    .unwrap();
    let output = explain(dir.path());
    assert_eq!(output.status.code(), Some(65));
    let text = stderr(&output);
    assert!(text.contains("broken.yaml"), "{text}");
    assert!(text.contains("malformed YAML/JSON at line"), "{text}");
    assert!(
        !text.contains("good.yaml"),
        "the good file is not blamed: {text}"
    );
}

#[test]
fn wrong_field_type_names_object_and_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 127.0.0.10, ports: [{name: http, port: eighty}]}\n",
    )
    .unwrap();
    let output = explain(dir.path());
    assert_eq!(output.status.code(), Some(65));
    let text = stderr(&output);
    assert!(
        text.contains("svc.yaml: Service shop/web: field `spec.ports[0].port`"),
        "{text}"
    );
}

#[test]
fn unknown_kinds_are_skipped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("all.yaml"),
        format!("{GOOD_SERVICE}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings}}\ndata: {{a: b}}\n"),
    )
    .unwrap();
    let output = explain(dir.path());
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(
        text.contains("warning: ")
            && text.contains("all.yaml (document 2): ConfigMap default/settings: skipped"),
        "{text}"
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["services"][0]["service"], "default/good",
        "the good object still counts"
    );
}

#[test]
fn service_without_ports_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: portless}\nspec: {clusterIP: 127.0.0.10}\n",
    )
    .unwrap();
    let output = explain(dir.path());
    assert!(output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("svc.yaml: Service default/portless: has no ports"),
        "{text}"
    );
}

#[test]
fn service_without_cluster_ip_is_reported_as_headless() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: nocip}\nspec: {ports: [{port: 80}]}\n",
    )
    .unwrap();
    let text = stderr(&explain(dir.path()));
    assert!(
        text.contains("Service default/nocip: has no clusterIP"),
        "{text}"
    );
}

#[test]
fn endpoint_slice_without_service_name_label_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("slice.yaml"),
        format!(
            "{GOOD_SERVICE}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: orphan}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [198.18.0.1]}}]\n"
        ),
    )
    .unwrap();
    let output = explain(dir.path());
    assert!(output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("slice.yaml (document 2): EndpointSlice default/orphan: has no `kubernetes.io/service-name` label"),
        "{text}"
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["services"][0]["internal"]["action"], "reject");
}

#[test]
fn missing_objects_path_is_an_error() {
    let output = weir(&[
        "explain",
        "--objects",
        "/nonexistent/objects",
        "--node",
        "n",
    ]);
    assert_eq!(output.status.code(), Some(65));
    assert!(stderr(&output).contains("/nonexistent/objects: cannot read"));
}

fn check(bytes: &[u8], name: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    weir(&["policy", "check", path.to_str().unwrap()])
}

#[test]
fn non_wasm_policy_file_is_refused() {
    let output = check(b"#!/bin/sh\necho hi\n", "script.wasm");
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("script.wasm: not a WebAssembly file"),
        "{text}"
    );
}

#[test]
fn core_module_is_refused_with_the_fix() {
    // The smallest valid core module: magic and version 1.
    let output = check(b"\0asm\x01\0\0\0", "core.wasm");
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("core.wasm: a core WebAssembly module, not a component"),
        "{text}"
    );
    assert!(text.contains("wasm32-wasip2"), "{text}");
}

#[test]
fn wrong_contract_version_names_both_versions() {
    let output = weir(&[
        "policy",
        "check",
        weir::test_helpers::guest_path("wrong-version")
            .to_str()
            .unwrap(),
    ]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("exports `weir:policy/policy@0.9.0`"),
        "{text}"
    );
    assert!(
        text.contains("expects `weir:policy/policy@0.1.0`"),
        "{text}"
    );
}

#[test]
fn bad_module_in_policies_dir_is_reported_and_others_load() {
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("broken.wasm"), b"not wasm").unwrap();
    std::fs::copy(
        weir::test_helpers::guest_path("round-robin"),
        policies.path().join("round-robin.wasm"),
    )
    .unwrap();
    let objects = tempfile::tempdir().unwrap();
    std::fs::write(
        objects.path().join("svc.yaml"),
        GOOD_SERVICE.replace(
            "name: good}",
            "name: good, annotations: {weir.dev/policy: broken}}",
        ),
    )
    .unwrap();
    let output = weir(&[
        "explain",
        "--objects",
        objects.path().to_str().unwrap(),
        "--node",
        "node-a",
        "--policies",
        policies.path().to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("broken.wasm: not a WebAssembly file"));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let failure = report["services"][0]["policyFailure"].as_str().unwrap();
    assert!(
        failure.contains("policy `broken` was rejected"),
        "{failure}"
    );
}

#[test]
fn policy_check_accepts_a_good_module() {
    let path = weir::test_helpers::guest_path("round-robin");
    let output = weir(&["policy", "check", path.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("exports:      weir:policy/policy@0.1.0"),
        "{text}"
    );
    assert!(text.contains("compile time:"), "{text}");
    assert!(
        text.contains("select:       External -> forward to 198.18.0.1:8080"),
        "{text}"
    );
}

#[test]
fn policy_check_reports_a_failing_module() {
    let path = weir::test_helpers::guest_path("hostile");
    let output = weir(&[
        "policy",
        "check",
        path.to_str().unwrap(),
        "--config",
        "refuse",
    ]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("refused on purpose"),
        "{}",
        stderr(&output)
    );
}
