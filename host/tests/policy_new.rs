//! `weir policy new` writes a crate that passes its own test and builds to a component
//! weir accepts, outside this workspace, from the minimal template and from a library one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Shared by runs so dependencies compile once per machine.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/policy-new")
}

fn weir(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .output()
        .expect("run weir")
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

fn scaffold_builds_and_passes(name: &str, template: &str) {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join(name);
    let output = weir(&[
        "policy",
        "new",
        name,
        "--from",
        template,
        "--dir",
        dir.to_str().unwrap(),
    ]);
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
    let check = weir(&["policy", "check", wasm.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("select:       Internal -> forward"));
}

#[test]
fn minimal_scaffold_builds_tests_and_loads() {
    scaffold_builds_and_passes("scaffold-minimal", "minimal");
}

#[test]
fn library_template_scaffold_builds_tests_and_loads() {
    scaffold_builds_and_passes("scaffold-maglev", "maglev");
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
