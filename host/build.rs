//! Builds the policy components weir embeds (kube-default) and the guests its tests load,
//! for `wasm32-wasip2`, with a nested cargo in its own target directory.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "policy";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir
        .parent()
        .expect("host/ lives in the workspace root");
    for watched in [
        "wit",
        "policies",
        "host/tests/guests",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=WEIR_GUEST_TARGET_DIR");

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    if !target_installed(&rustc) {
        panic!(
            "\n\nweir builds its policies for the `{TARGET}` target, which this Rust toolchain \
             does not have.\nInstall it with:\n\n    rustup target add {TARGET}\n\n"
        );
    }

    // Every policy of the library (policies/*, but the SDK) and every test guest.
    let mut packages: Vec<String> = crates_in(&root.join("policies"))
        .into_iter()
        .filter(|name| name != "sdk")
        .collect();
    packages.extend(crates_in(&root.join("host/tests/guests")));

    let target_dir = std::env::var_os("WEIR_GUEST_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/guests"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(root)
        .args([
            "build",
            "--target",
            TARGET,
            "--profile",
            PROFILE,
            "--target-dir",
        ])
        .arg(&target_dir);
    for package in &packages {
        command.args(["-p", package]);
    }
    // The outer build's flags and wrappers (clippy's, coverage's) are for the host target.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        command.env_remove(var);
    }
    let output = command
        .output()
        .expect("failed to run cargo to build the policy components");
    if !output.status.success() {
        panic!(
            "building the policy components for {TARGET} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let artifacts = target_dir.join(TARGET).join(PROFILE);
    for package in &packages {
        let file = artifacts.join(format!("{}.wasm", package.replace('-', "_")));
        assert!(file.exists(), "expected {} after the build", file.display());
    }
    // The library as a policies directory (`<policy>.wasm`, the names Services use), for
    // the quickstart and for trying policies without building them by hand.
    let library = root.join("target/policies");
    std::fs::create_dir_all(&library).expect("create target/policies");
    for package in crates_in(&root.join("policies"))
        .iter()
        .filter(|p| *p != "sdk")
    {
        let built = artifacts.join(format!("{}.wasm", package.replace('-', "_")));
        std::fs::copy(&built, library.join(format!("{package}.wasm"))).unwrap_or_else(|e| {
            panic!(
                "copying {} into {}: {e}",
                built.display(),
                library.display()
            )
        });
    }
    println!(
        "cargo:rustc-env=WEIR_KUBE_DEFAULT_WASM={}",
        artifacts.join("kube_default.wasm").display()
    );
    println!("cargo:rustc-env=WEIR_GUEST_DIR={}", artifacts.display());
}

fn target_installed(rustc: &str) -> bool {
    let Ok(output) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .join("lib")
        .is_dir()
}

/// Every crate directly under `dir`, by its directory name (which is its package name).
fn crates_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("Cargo.toml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
