//! `weir policy new` writes a crate that passes its own test and builds to a component
//! weir accepts, outside this workspace, from the minimal template and from a library one;
//! and it does so from a weir binary copied where there is no checkout at all.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Shared by runs so dependencies compile once per machine.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/policy-new")
}

fn weir(args: &[&str]) -> std::process::Output {
    weir_at(Path::new(env!("CARGO_BIN_EXE_weir")), args)
}

fn weir_at(binary: &Path, args: &[&str]) -> std::process::Output {
    Command::new(binary).args(args).output().expect("run weir")
}

fn cargo(dir: &Path, args: &[&str]) {
    let output = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target_dir())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("run cargo");
    assert!(
        output.status.success(),
        "cargo {args:?} in {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn scaffold_builds_and_passes(name: &str, template: &str) -> PathBuf {
    scaffold_with(Path::new(env!("CARGO_BIN_EXE_weir")), name, template)
}

/// Runs `weir policy new` with `binary`, then the crate's tests, the Wasm build and
/// `weir policy check`; returns the component.
fn scaffold_with(binary: &Path, name: &str, template: &str) -> PathBuf {
    // One build at a time in the shared target dir: every scaffold has its own copy of
    // weir-sdk, and cargo replaces the one artifact they share while another links it.
    static ONE_BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _build = ONE_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join(name);
    let output = weir_at(
        binary,
        &[
            "policy",
            "new",
            name,
            "--from",
            template,
            "--dir",
            dir.to_str().unwrap(),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for file in ["Cargo.toml", "src/lib.rs", "README.md"] {
        assert!(dir.join(file).exists(), "{file}");
    }
    cargo(&dir, &["test", "--quiet"]);
    cargo(
        &dir,
        &["build", "--quiet", "--target", "wasm32-wasip2", "--release"],
    );
    let wasm = target_dir().join(format!(
        "wasm32-wasip2/release/{}.wasm",
        name.replace('-', "_")
    ));
    let check = weir_at(binary, &["policy", "check", wasm.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        report.contains("select:       Internal -> forward"),
        "{report}"
    );
    assert!(
        report.contains("of the 1 MiB a ConfigMap holds"),
        "{report}"
    );
    wasm
}

/// The author's whole flow from a weir binary alone: copied into an empty directory, far
/// from any checkout, it writes a crate that carries the SDK (and the WIT), which tests,
/// builds, passes `weir policy check` and runs under `weir policy test`.
#[test]
fn minimal_scaffold_from_a_weir_binary_without_a_checkout() {
    let home = tempfile::tempdir().unwrap();
    let binary = home.path().join("weir");
    std::fs::copy(env!("CARGO_BIN_EXE_weir"), &binary).expect("copy the weir binary");
    let wasm = scaffold_with(&binary, "least-used", "minimal");

    let objects =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/policy-test/objects.yaml");
    let test = weir_at(
        &binary,
        &[
            "policy",
            "test",
            wasm.to_str().unwrap(),
            "--objects",
            objects.to_str().unwrap(),
            "--node",
            "node-a",
            "--connections",
            "50",
        ],
    );
    assert!(
        test.status.success(),
        "{}",
        String::from_utf8_lossy(&test.stderr)
    );
    assert!(String::from_utf8_lossy(&test.stdout).contains("default/web"));

    // The contract, for a policy in another language.
    let wit = weir_at(&binary, &["policy", "wit"]);
    assert!(wit.status.success());
    let wit = String::from_utf8_lossy(&wit.stdout);
    assert!(wit.contains("package weir:policy@0.2.0;"), "{wit}");
    assert!(wit.contains("package weir:policy@0.1.0;"), "{wit}");
    assert_eq!(wit, weir::cli::sdk::wit_text());
}

#[test]
fn library_template_scaffold_builds_tests_and_loads() {
    scaffold_builds_and_passes("scaffold-maglev", "maglev");
}

#[test]
fn the_vendored_sdk_is_written_beside_the_crate() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("beside");
    let output = weir(&["policy", "new", "beside", "--dir", dir.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("weir-sdk = { path = \"weir-sdk\" }"),
        "{manifest}"
    );
    assert!(
        manifest.contains("opt-level = \"z\""),
        "small components: {manifest}"
    );
    for file in [
        "weir-sdk/Cargo.toml",
        "weir-sdk/src/lib.rs",
        "weir-sdk/wit/policy.wit",
        "Cargo.lock",
    ] {
        assert!(dir.join(file).exists(), "{file}");
    }
}

#[test]
fn bad_names_and_existing_directories_are_refused() {
    let output = weir(&["policy", "new", "Bad_Name"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("lowercase letters, digits and dashes")
    );
    let parent = tempfile::tempdir().unwrap();
    let output = weir(&[
        "policy",
        "new",
        "taken",
        "--dir",
        parent.path().to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));
}
