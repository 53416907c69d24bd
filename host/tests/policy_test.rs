//! `weir policy test`: golden output on fixtures, and the exit status authors' CI relies on.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/policy-test")
}

fn policy_test(module: &str, extra: &[&str]) -> Output {
    let objects = fixtures().join("objects.yaml");
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["policy", "test"])
        .arg(weir::test_helpers::guest_path(module))
        .arg("--objects")
        .arg(objects)
        .args(["--node", "node-a"])
        .args(extra)
        .output()
        .expect("run weir")
}

/// The JSON report without what varies between runs: decision latency and the module path.
fn stable_json(output: &Output) -> Value {
    let mut report: Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    report["module"] = Value::from("<module>");
    for service in report["services"].as_array_mut().unwrap() {
        for scope in ["internal", "external"] {
            if let Some(s) = service.get_mut(scope).and_then(Value::as_object_mut) {
                s.remove("latencyNanos");
            }
        }
    }
    report
}

fn golden(module: &str) {
    let script = fixtures().join("script.yaml");
    let output = policy_test(
        module,
        &[
            "--connections",
            "200",
            "--script",
            script.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(
            fixtures().join(format!("expected/{}.json", module.replace('-', "_"))),
        )
        .unwrap(),
    )
    .unwrap();
    let actual = stable_json(&output);
    assert_eq!(
        actual,
        expected,
        "{module}: got\n{}",
        serde_json::to_string_pretty(&actual).unwrap()
    );
}

#[test]
fn maglev_report_is_the_golden_one() {
    golden("maglev");
}

#[test]
fn round_robin_report_is_the_golden_one() {
    golden("round-robin");
}

#[test]
fn table_output_shows_each_endpoint_share_and_the_steps() {
    let script = fixtures().join("script.yaml");
    let output = policy_test(
        "maglev",
        &["--connections", "100", "--script", script.to_str().unwrap()],
    );
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("default/web:http TCP IPv4"), "{text}");
    assert!(text.contains("198.18.0.1:8080"), "{text}");
    assert!(
        text.contains("step 1: remove 198.18.0.7 from default/web:"),
        "{text}"
    );
    assert!(
        text.contains("ok: no traps, timeouts or invalid answers"),
        "{text}"
    );
}

#[test]
fn a_misbehaving_module_fails_the_run() {
    let objects = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixtures().join("objects.yaml"))
        .unwrap()
        .replace(
            "metadata: {name: web, namespace: default}",
            "metadata: {name: web, namespace: default, annotations: {weir.dev/policy-config: panic-select}}",
        );
    std::fs::write(objects.path().join("objects.yaml"), text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["policy", "test"])
        .arg(weir::test_helpers::guest_path("hostile"))
        .arg("--objects")
        .arg(objects.path())
        .args(["--node", "node-a", "--connections", "10", "-o", "json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(
        report["failures"]["trap"], 1,
        "quarantined after its first trap"
    );
}

#[test]
fn bad_scripts_are_refused_with_an_example() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.yaml");
    std::fs::write(
        &script,
        "steps:\n  - delete: {service: default/web, address: 198.18.0.1}\n",
    )
    .unwrap();
    let output = policy_test("maglev", &["--script", script.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(65));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("unknown variant `delete`"), "{text}");
    assert!(text.contains("- remove:"), "{text}");
}

/// With `--seed`, WASI's randomness and clocks come from the seed and the test clock: a
/// policy that picks with them (the hostile guest's `wasi-select`) gives the same report
/// twice, and another seed gives another.
#[test]
fn wasi_randomness_and_clocks_follow_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let objects = fixtures().join("objects.yaml");
    let text = std::fs::read_to_string(&objects).unwrap().replace(
        "metadata: {name: web, namespace: default}",
        "metadata: {name: web, namespace: default, annotations: {weir.dev/policy-config: wasi-select}}",
    );
    assert!(
        text.contains("wasi-select"),
        "the fixture's web Service moved"
    );
    let objects = dir.path().join("objects.yaml");
    std::fs::write(&objects, text).unwrap();
    let run = |seed: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["policy", "test"])
            .arg(weir::test_helpers::guest_path("hostile"))
            .arg("--objects")
            .arg(&objects)
            .args(["--node", "node-a", "--connections", "100", "--seed", seed])
            .args(["-o", "json"])
            .output()
            .expect("run weir");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stable_json(&output)
    };
    let first = run("5");
    assert_eq!(first, run("5"), "the same seed, the same report");
    assert_ne!(first, run("6"), "another seed, another spread");
}
