//! `weir policy new`: a policy crate that builds to a component with one command, inside
//! a weir checkout's `policies/` (a workspace member) or anywhere else: a standalone crate
//! with the SDK this weir carries written beside it (`weir-sdk/`, see `sdk.rs`), or
//! another SDK by path (`--sdk`).

use std::path::PathBuf;

/// Where a new crate goes and what it starts from.
#[derive(Clone, Debug)]
pub struct NewPolicy {
    pub name: String,
    /// `minimal` (a documented skeleton) or the name of a library policy to start from.
    pub template: String,
    /// The directory to create (default `./NAME`).
    pub dir: PathBuf,
    /// The SDK crate to depend on when outside a checkout; `None`: the SDK this weir
    /// carries, written into the new crate.
    pub sdk: Option<PathBuf>,
}

/// The library policies a new crate can start from, with their sources.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("minimal", MINIMAL),
    (
        "kube-default",
        include_str!("../../../policies/kube-default/src/lib.rs"),
    ),
    (
        "random",
        include_str!("../../../policies/random/src/lib.rs"),
    ),
    (
        "round-robin",
        include_str!("../../../policies/round-robin/src/lib.rs"),
    ),
    (
        "least-connections",
        include_str!("../../../policies/least-connections/src/lib.rs"),
    ),
    (
        "p2c-ewma",
        include_str!("../../../policies/p2c-ewma/src/lib.rs"),
    ),
    (
        "maglev",
        include_str!("../../../policies/maglev/src/lib.rs"),
    ),
    (
        "ring-hash",
        include_str!("../../../policies/ring-hash/src/lib.rs"),
    ),
    (
        "locality",
        include_str!("../../../policies/locality/src/lib.rs"),
    ),
    (
        "client-ip-affinity",
        include_str!("../../../policies/client-ip-affinity/src/lib.rs"),
    ),
];

/// Writes the crate; returns the files written.
pub fn create(new: &NewPolicy) -> Result<Vec<PathBuf>, String> {
    validate_name(&new.name)?;
    let source = TEMPLATES
        .iter()
        .find(|(name, _)| *name == new.template)
        .map(|(_, source)| *source)
        .ok_or_else(|| {
            let names: Vec<&str> = TEMPLATES.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown template `{}`; use one of: {}",
                new.template,
                names.join(", ")
            )
        })?;
    if new.dir.exists() {
        return Err(format!(
            "{} already exists; choose another name or --dir",
            new.dir.display()
        ));
    }
    let member = new
        .dir
        .parent()
        .map(|parent| parent.join("sdk/Cargo.toml"))
        .is_some_and(|sdk| {
            std::fs::read_to_string(sdk).is_ok_and(|t| t.contains("name = \"weir-sdk\""))
        });
    let sdk_dependency = match (member, &new.sdk) {
        (true, _) => "{ path = \"../sdk\" }".to_string(),
        (false, Some(sdk)) => {
            let sdk = sdk.canonicalize().map_err(|_| {
                format!(
                    "the weir SDK is not at {}; pass --sdk <weir checkout>/policies/sdk, or leave --sdk out to use the SDK this weir carries",
                    sdk.display()
                )
            })?;
            format!("{{ path = {:?} }}", sdk.display().to_string())
        }
        (false, None) => "{ path = \"weir-sdk\" }".to_string(),
    };
    let vendored = !member && new.sdk.is_none();
    let camel = camel_case(&new.name);
    let wasm = format!("{}.wasm", new.name.replace('-', "_"));
    let lib = source
        .replace("__NAME__", &new.name)
        .replace("__CAMEL__", &camel)
        .replace("__WASM__", &wasm);
    let manifest = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the component weir loads; rlib: native `cargo test` of the logic.
crate-type = ["cdylib", "rlib"]

[dependencies]
weir-sdk = {sdk_dependency}
serde = {{ version = "1", features = ["derive"] }}
{standalone}"#,
        name = new.name,
        standalone = if member { "" } else { STANDALONE },
    );
    let release_dir = if member {
        "../../target/wasm32-wasip2/release"
    } else {
        "target/wasm32-wasip2/release"
    };
    let readme = README
        .replace("__NAME__", &new.name)
        .replace("__TEMPLATE__", &new.template)
        .replace("__WASM_PATH__", &format!("{release_dir}/{wasm}"));
    std::fs::create_dir_all(new.dir.join("src"))
        .map_err(|e| format!("{}: {e}", new.dir.display()))?;
    let files = [
        (new.dir.join("Cargo.toml"), manifest),
        (new.dir.join("src/lib.rs"), lib),
        (new.dir.join("README.md"), readme),
    ];
    for (path, text) in &files {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let mut written: Vec<PathBuf> = files.into_iter().map(|(path, _)| path).collect();
    if vendored {
        super::sdk::write(&new.dir.join("weir-sdk"))?;
        written.push(new.dir.join("weir-sdk"));
        // The versions this weir was built and tested with; cargo drops what the crate
        // does not use.
        let lock = new.dir.join("Cargo.lock");
        std::fs::write(&lock, super::sdk::LOCK).map_err(|e| format!("{}: {e}", lock.display()))?;
        written.push(lock);
    }
    Ok(written)
}

/// A crate outside a checkout: its own workspace, and a release profile that makes small
/// components (a ConfigMap holds 1 MiB).
const STANDALONE: &str = "
# Its own workspace, wherever it is put.
[workspace]

# Small components: a policies ConfigMap holds at most 1 MiB.
[profile.release]
opt-level = \"z\"
lto = true
codegen-units = 1
panic = \"abort\"
strip = true
";

/// Names a new policy cannot take: this workspace's own crates and Rust's keywords.
const RESERVED: &[&str] = &[
    "weir", "weir-sdk", "sdk", "self", "super", "crate", "std", "core", "alloc", "test",
];

fn validate_name(name: &str) -> Result<(), String> {
    if RESERVED.contains(&name) || TEMPLATES.iter().any(|(t, _)| *t == name) {
        return Err(format!(
            "`{name}` is taken (by weir's own crates or its policy library); choose another name"
        ));
    }
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a usable policy name: use lowercase letters, digits and dashes, starting with a letter (it becomes the crate name and the `weir.dev/policy` value)"
        ))
    }
}

fn camel_case(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

const README: &str = r#"# __NAME__

A weir routing policy (started from the `__TEMPLATE__` template).

- Test the logic natively: `cargo test`
- Build the component: `cargo build --target wasm32-wasip2 --release`
  (once per machine: `rustup target add wasm32-wasip2`)
- Check it loads as weir will load it: `weir policy check __WASM_PATH__`
- See what it does with your objects: `weir policy test __WASM_PATH__ --objects <dir> --node <node>`
- Ship it: put the file in weir's policies directory as `__NAME__.wasm` and annotate
  Services with `weir.dev/policy: __NAME__` (per-service settings go in
  `weir.dev/policy-config`, as JSON).

The contract is weir's `wit/policy.wit`; the author's guide is `policies/README.md` in the
weir repository.
"#;

const MINIMAL: &str = r#"//! `__NAME__`: say here, in one line, how this policy picks endpoints.
//!
//! Build: `cargo build --target wasm32-wasip2 --release`; the component is `__WASM__`.
//!
//! Configuration (the policy's, and each Service's `weir.dev/policy-config`, JSON): none
//! yet. Add fields to `Settings`; unknown keys are refused with their name.

use serde::Deserialize;
use weir_sdk::config::Layered;
use weir_sdk::{Connection, Decision, Eligibility, Endpoint, EndpointId, Node, Policy, Service};

/// Settings: the policy's configuration with a Service's annotation over it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {}

pub struct __CAMEL__ {
    settings: Layered<Settings>,
}

/// What the policy keeps per service port between calls.
#[derive(Debug, Default)]
pub struct State {
    settings: Option<Settings>,
    next: usize,
}

impl Policy for __CAMEL__ {
    type State = State;

    /// Once per instance, with the policy's configuration ("" when none). An `Err` refuses
    /// the module with that message; the previous version keeps serving.
    fn configure(config: &str) -> Result<Self, String> {
        Ok(__CAMEL__ {
            settings: Layered::configure(config)?,
        })
    }

    /// When a service port appears or its Service, endpoints or node change: which
    /// endpoints may serve internal and external traffic. kube-proxy's answer is the safe
    /// start (readiness, terminating fallback, topology, traffic policies, reject/drop).
    fn update(&self, state: &mut State, service: &Service, node: &Node, endpoints: &[Endpoint]) -> Eligibility {
        // This Service's weir.dev/policy-config over the policy's; a bad one is logged and
        // the last good settings kept.
        state.settings = Some(self.settings.for_service(service, state.settings.as_ref()));
        weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints)
    }

    /// For each new connection: one of `eligible` (sorted, never empty). This starts as
    /// round robin; it runs under a 1 ms deadline, so keep it O(1) or O(log n).
    fn select(&self, state: &mut State, _: &Service, eligible: &[EndpointId], _: &Connection) -> Decision {
        let endpoint = eligible[state.next % eligible.len()];
        state.next = state.next.wrapping_add(1);
        Decision::Forward(endpoint)
    }
}

weir_sdk::export_policy!(__CAMEL__);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::{Driver, Scope};

    #[test]
    fn every_ready_endpoint_gets_its_turn() {
        let mut driver = Driver::<__CAMEL__>::configure("").unwrap();
        let mut endpoints: Vec<Endpoint> = (1..=3)
            .map(|id| Endpoint::ready(id, format!("198.18.0.{id}:8080").parse().unwrap()))
            .collect();
        endpoints[2].ready = false;
        let service = Service::cluster_ip("default", "web", "198.19.0.1".parse().unwrap(), 80);
        driver.update(1, service, &Node::default(), &endpoints);
        let connection = Connection {
            client: "198.18.100.1:40000".parse().unwrap(),
            destination: "198.19.0.1:80".parse().unwrap(),
            scope: Scope::Internal,
        };
        let picks: Vec<Decision> = (0..4).map(|_| driver.select(1, &connection)).collect();
        assert_eq!(
            picks,
            vec![Decision::Forward(1), Decision::Forward(2), Decision::Forward(1), Decision::Forward(2)]
        );
    }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_types() {
        assert_eq!(camel_case("least-busy"), "LeastBusy");
        assert!(validate_name("least-busy").is_ok());
        assert!(validate_name("Least").is_err());
        assert!(validate_name("9lives").is_err());
        assert!(validate_name("weir-sdk").unwrap_err().contains("taken"));
        assert!(validate_name("maglev").unwrap_err().contains("taken"));
    }

    #[test]
    fn an_unknown_template_lists_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let error = create(&NewPolicy {
            name: "x".into(),
            template: "nope".into(),
            dir: dir.path().join("x"),
            sdk: None,
        })
        .unwrap_err();
        assert!(
            error.contains("maglev") && error.contains("minimal"),
            "{error}"
        );
    }
}
