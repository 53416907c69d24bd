//! The policy SDK and the WIT contract, carried inside the weir binary, so that
//! `weir policy new` works from an installed weir with no checkout: the new crate gets a
//! copy of the SDK beside it (`weir-sdk/`, with `wit/`), and a `Cargo.lock` with
//! the versions this weir was built and tested with.

use std::path::Path;

/// The contract, by path: 0.2.0 in `wit/policy.wit`, and the 0.1.0 it carries.
pub const WIT: &[(&str, &str)] = &[
    ("wit/policy.wit", include_str!("../../../wit/policy.wit")),
    (
        "wit/deps/policy-0.1.0/policy.wit",
        include_str!("../../../wit/deps/policy-0.1.0/policy.wit"),
    ),
];

/// The whole contract as one text, each file under a comment naming it: what `weir
/// policy wit` prints.
pub fn wit_text() -> String {
    WIT.iter()
        .map(|(path, text)| format!("// {path}\n{text}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The SDK's sources, by path inside the crate.
pub const SOURCES: &[(&str, &str)] = &[
    (
        "src/lib.rs",
        include_str!("../../../policies/sdk/src/lib.rs"),
    ),
    (
        "src/affinity.rs",
        include_str!("../../../policies/sdk/src/affinity.rs"),
    ),
    (
        "src/config.rs",
        include_str!("../../../policies/sdk/src/config.rs"),
    ),
    (
        "src/connections.rs",
        include_str!("../../../policies/sdk/src/connections.rs"),
    ),
    (
        "src/driver.rs",
        include_str!("../../../policies/sdk/src/driver.rs"),
    ),
    (
        "src/export.rs",
        include_str!("../../../policies/sdk/src/export.rs"),
    ),
    (
        "src/hash.rs",
        include_str!("../../../policies/sdk/src/hash.rs"),
    ),
    (
        "src/host.rs",
        include_str!("../../../policies/sdk/src/host.rs"),
    ),
    (
        "src/ids.rs",
        include_str!("../../../policies/sdk/src/ids.rs"),
    ),
    (
        "src/kube.rs",
        include_str!("../../../policies/sdk/src/kube.rs"),
    ),
    (
        "src/kube/tests.rs",
        include_str!("../../../policies/sdk/src/kube/tests.rs"),
    ),
    (
        "src/request.rs",
        include_str!("../../../policies/sdk/src/request.rs"),
    ),
    (
        "src/scoped.rs",
        include_str!("../../../policies/sdk/src/scoped.rs"),
    ),
    (
        "src/sticky.rs",
        include_str!("../../../policies/sdk/src/sticky.rs"),
    ),
    (
        "src/types.rs",
        include_str!("../../../policies/sdk/src/types.rs"),
    ),
    (
        "src/weighted.rs",
        include_str!("../../../policies/sdk/src/weighted.rs"),
    ),
];

/// The SDK's manifest in the workspace, and the workspace's: the vendored manifest takes
/// the SDK's dependencies at the workspace's versions.
const SDK_MANIFEST: &str = include_str!("../../../policies/sdk/Cargo.toml");
const WORKSPACE_MANIFEST: &str = include_str!("../../../Cargo.toml");
/// The versions every crate of this weir was built and tested with.
pub const LOCK: &str = include_str!("../../../Cargo.lock");

/// Where the SDK finds the WIT, in the workspace and in a vendored copy.
const WIT_PATH_IN_WORKSPACE: &str = r#"path: "../../wit","#;
const WIT_PATH_VENDORED: &str = r#"path: "wit","#;

/// The SDK's `Cargo.toml` as a crate of its own: the workspace's inherited keys and
/// dependency versions written out.
pub fn manifest() -> Result<String, String> {
    let workspace: toml::Table =
        toml::from_str(WORKSPACE_MANIFEST).map_err(|e| format!("the embedded workspace: {e}"))?;
    let sdk: toml::Table =
        toml::from_str(SDK_MANIFEST).map_err(|e| format!("the embedded SDK manifest: {e}"))?;
    let package = &workspace["workspace"]["package"];
    let field = |key: &str| {
        package
            .get(key)
            .and_then(toml::Value::as_str)
            .ok_or_else(|| format!("the workspace has no package.{key}"))
    };
    let mut out = format!(
        "# The weir policy SDK {version}, as `weir policy new` wrote it: the copy carried\n\
         # by the weir binary. Replace it with a newer weir's (`weir policy new` writes one).\n\
         [package]\nname = \"weir-sdk\"\nversion = \"{version}\"\nedition = \"{edition}\"\n\
         license = \"{license}\"\npublish = false\n\n[dependencies]\n",
        version = field("version")?,
        edition = field("edition")?,
        license = field("license")?,
    );
    let dependencies = sdk["dependencies"]
        .as_table()
        .ok_or("the SDK manifest has no [dependencies]")?;
    for name in dependencies.keys() {
        let spec = &workspace["workspace"]["dependencies"]
            .get(name)
            .ok_or_else(|| format!("the workspace does not pin {name}"))?;
        out.push_str(&format!("{name} = {}\n", inline(spec)?));
    }
    Ok(out)
}

/// A dependency's specification as inline TOML: a version, or a table of strings,
/// booleans and lists of strings.
fn inline(value: &toml::Value) -> Result<String, String> {
    Ok(match value {
        toml::Value::String(text) => format!("{text:?}"),
        toml::Value::Boolean(flag) => flag.to_string(),
        toml::Value::Array(items) => {
            let items: Result<Vec<String>, String> = items.iter().map(inline).collect();
            format!("[{}]", items?.join(", "))
        }
        toml::Value::Table(table) => {
            let fields: Result<Vec<String>, String> = table
                .iter()
                .map(|(key, value)| Ok(format!("{key} = {}", inline(value)?)))
                .collect();
            format!("{{ {} }}", fields?.join(", "))
        }
        other => return Err(format!("unexpected {other:?} in a dependency")),
    })
}

/// Writes the SDK into `dir` (`dir/Cargo.toml`, `dir/src/…`, `dir/wit/…`).
pub fn write(dir: &Path) -> Result<(), String> {
    let write = |path: &Path, text: &str| {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(&dir.join("Cargo.toml"), &manifest()?)?;
    for (path, text) in WIT {
        write(&dir.join(path), text)?;
    }
    for (path, text) in SOURCES {
        let text = if *path == "src/lib.rs" {
            if !text.contains(WIT_PATH_IN_WORKSPACE) {
                return Err("the embedded SDK does not name its WIT where expected".into());
            }
            text.replace(WIT_PATH_IN_WORKSPACE, WIT_PATH_VENDORED)
        } else {
            text.to_string()
        };
        write(&dir.join(path), &text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of the SDK travels: one added to policies/sdk/src must be added here.
    #[test]
    fn every_sdk_source_is_embedded() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/sdk");
        let mut on_disk = Vec::new();
        let mut dirs = vec![root.join("src")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let relative = path.strip_prefix(&root).unwrap();
                    on_disk.push(relative.to_string_lossy().into_owned());
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = SOURCES.iter().map(|(p, _)| p.to_string()).collect();
        embedded.sort();
        assert_eq!(embedded, on_disk);
        for (path, text) in SOURCES {
            let file = std::fs::read_to_string(root.join(path)).unwrap();
            assert_eq!(&file, text, "{path}");
        }
    }

    #[test]
    fn the_vendored_manifest_pins_the_workspace_versions() {
        let manifest: toml::Table = toml::from_str(&manifest().unwrap()).unwrap();
        assert_eq!(manifest["package"]["name"].as_str(), Some("weir-sdk"));
        let dependencies = manifest["dependencies"].as_table().unwrap();
        assert!(dependencies.contains_key("wit-bindgen"), "{manifest:?}");
        assert_eq!(
            dependencies["wit-bindgen"]["version"].as_str(),
            Some("0.61"),
            "{manifest:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        write(dir.path()).unwrap();
        let lib = std::fs::read_to_string(dir.path().join("src/lib.rs")).unwrap();
        assert!(lib.contains(WIT_PATH_VENDORED));
        assert!(dir.path().join("wit/policy.wit").exists());
        assert!(dir.path().join("wit/deps/policy-0.1.0/policy.wit").exists());
    }
}
