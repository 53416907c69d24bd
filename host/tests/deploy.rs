//! The manifests in `deploy/base/` against the code they deploy: every document is a known
//! Kubernetes kind with no field its type lacks, the probes ask the admin server's paths on
//! `admin.address`'s port, the container runs `weir run` on the mounted `deploy/base/weir.toml`,
//! RBAC grants exactly `weir::discovery::kubernetes::ACCESS`, and the kustomization lists
//! every manifest and ships policies that `deploy/build-policies.sh` builds.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use weir::admin::{LIVEZ_PATH, READYZ_PATH};
use weir::config::Config;
use weir::discovery::kubernetes::{ACCESS, Scope};

/// What the API server accepts in one ConfigMap: `data` and `binaryData` together.
const CONFIGMAP_MAX_BYTES: u64 = 1 << 20;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ lives in the workspace root")
        .join("deploy")
        .join("base")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every `deploy/base/*.yaml` but the kustomization, by file name.
fn manifest_files() -> BTreeSet<String> {
    std::fs::read_dir(deploy())
        .expect("read deploy/base/")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect()
}

#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    role_bindings: Vec<RoleBinding>,
    daemon_sets: Vec<DaemonSet>,
}

/// Every document of every manifest, as its k8s-openapi type.
fn manifests() -> Manifests {
    let mut all = Manifests::default();
    for file in manifest_files() {
        let text = read(&deploy().join(&file));
        let documents = weir::yaml::documents(&text)
            .unwrap_or_else(|e| panic!("deploy/base/{file}: not YAML: {e}"));
        for (n, json) in documents.into_iter().enumerate() {
            let at = format!("deploy/base/{file}, document {}", n + 1);
            if json.is_null() {
                continue;
            }
            match json["kind"].as_str().unwrap_or_default() {
                "Namespace" => all.namespaces.push(typed(&at, json)),
                "ServiceAccount" => all.service_accounts.push(typed(&at, json)),
                "ClusterRole" => all.cluster_roles.push(typed(&at, json)),
                "Role" => all.roles.push(typed(&at, json)),
                "ClusterRoleBinding" => all.cluster_role_bindings.push(typed(&at, json)),
                "RoleBinding" => all.role_bindings.push(typed(&at, json)),
                "DaemonSet" => all.daemon_sets.push(typed(&at, json)),
                other => panic!(
                    "{at}: kind {other:?} is not one this test knows; add it to `manifests()` \
                     with its k8s-openapi type and check what it must agree with"
                ),
            }
        }
    }
    all
}

/// `json` as `T`, which must give back exactly `json`: k8s-openapi ignores fields its types
/// do not have, so a misspelt or misplaced key would otherwise pass unnoticed.
fn typed<T: DeserializeOwned + Serialize>(at: &str, json: Value) -> T {
    let kind = json["kind"].as_str().unwrap_or_default().to_string();
    let object: T = serde_json::from_value(json.clone())
        .unwrap_or_else(|e| panic!("{at}: not a valid {kind}: {e}"));
    let back = serde_json::to_value(&object).unwrap();
    if let Some(path) = first_difference(&json, &back, String::new()) {
        panic!(
            "{at}: `{path}` is not a field of a {kind} at that place (misspelt or misindented?)"
        );
    }
    object
}

fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            a.keys()
                .chain(b.keys())
                .find_map(|key| match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => first_difference(x, y, format!("{path}.{key}")),
                    _ => Some(format!("{path}.{key}")),
                })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, format!("{path}[{i}]"))),
        _ => (a != b).then_some(path),
    }
}

/// `deploy/base/weir.toml` as weir reads it in a pod, and as plain TOML (to tell what the file
/// itself sets from what defaults fill in).
fn config() -> (Config, toml::Table) {
    let text = read(&deploy().join("weir.toml"));
    let raw: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("deploy/base/weir.toml: {e}"));
    // node.name defaults to NODE_NAME, which the DaemonSet sets and this process may not
    // have: stand in for it (the file itself must leave the name unset, see below).
    let in_pod = if raw_str(&raw, "node", "name").is_none() {
        let named = text.replacen("[node]\n", "[node]\nname = \"node-a\"\n", 1);
        assert_ne!(named, text, "deploy/base/weir.toml has a [node] table");
        named
    } else {
        text.clone()
    };
    let config = Config::parse(&in_pod, &deploy()).unwrap_or_else(|e| {
        panic!("deploy/base/weir.toml is refused by weir (a line number past [node] is one more than in the file): {e}")
    });
    (config, raw)
}

fn raw_str<'a>(raw: &'a toml::Table, table: &str, key: &str) -> Option<&'a str> {
    raw.get(table)?.get(key)?.as_str()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kustomization {
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    config_map_generator: Vec<Generator>,
    #[serde(default)]
    generator_options: GeneratorOptions,
}

#[derive(Deserialize)]
struct Generator {
    name: String,
    #[serde(default)]
    files: Vec<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeneratorOptions {
    #[serde(default)]
    disable_name_suffix_hash: bool,
}

impl Kustomization {
    fn load() -> Self {
        weir::yaml::document(&read(&deploy().join("kustomization.yaml")))
            .and_then(|value| {
                serde_json::from_value(value).map_err(|e| weir::yaml::SyntaxError {
                    at: None,
                    message: e.to_string(),
                })
            })
            .unwrap_or_else(|e| panic!("deploy/base/kustomization.yaml: {e}"))
    }

    fn generator(&self, name: &str) -> &Generator {
        self.config_map_generator
            .iter()
            .find(|g| g.name == name)
            .unwrap_or_else(|| {
                panic!("deploy/base/kustomization.yaml has no configMapGenerator named {name}")
            })
    }
}

impl Generator {
    /// `(key, path)` of each file: `key=path`, or the path with its file name as the key.
    fn entries(&self) -> Vec<(String, String)> {
        self.files
            .iter()
            .map(|file| match file.split_once('=') {
                Some((key, path)) => (key.to_string(), path.to_string()),
                None => {
                    let key = Path::new(file).file_name().unwrap().to_string_lossy();
                    (key.into_owned(), file.clone())
                }
            })
            .collect()
    }
}

fn daemon_set(manifests: &Manifests) -> &DaemonSet {
    match manifests.daemon_sets.as_slice() {
        [one] => one,
        other => panic!("deploy/base/ must hold one DaemonSet, has {}", other.len()),
    }
}

fn pod_spec(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("the DaemonSet has a pod template spec")
}

fn weir_container(daemon_set: &DaemonSet) -> &Container {
    pod_spec(daemon_set)
        .containers
        .iter()
        .find(|c| c.name == "weir")
        .expect("the DaemonSet has a container named weir")
}

fn namespace_of(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    metadata.namespace.as_deref().unwrap_or_default()
}

/// The `fieldRef` an environment variable of the container is set from.
fn env_field<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|var| var.name == name)?
        .value_from
        .as_ref()?
        .field_ref
        .as_ref()
        .map(|field| field.field_path.as_str())
}

fn port_number(container: &Container, port: &IntOrString) -> u16 {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).expect("a port number"),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| u16::try_from(p.container_port).expect("a port number"))
            .unwrap_or_else(|| panic!("the container has no port named {name}")),
    }
}

/// weir's own namespace in the pod: `source.namespace`, else POD_NAMESPACE, which must be
/// the pod's own namespace.
fn weir_namespace(config: &Config, daemon_set: &DaemonSet) -> String {
    if let Some(namespace) = &config.source.namespace {
        return namespace.clone();
    }
    assert_eq!(
        env_field(weir_container(daemon_set), "POD_NAMESPACE"),
        Some("metadata.namespace"),
        "deploy/base/weir.toml leaves source.namespace to POD_NAMESPACE: set it from the downward API"
    );
    namespace_of(&daemon_set.metadata).to_string()
}

#[test]
fn every_manifest_is_a_known_kind_with_only_fields_of_its_type() {
    let manifests = manifests();
    assert_eq!(manifests.namespaces.len(), 1, "one Namespace");
    assert_eq!(manifests.service_accounts.len(), 1, "one ServiceAccount");
    assert!(!manifests.cluster_roles.is_empty(), "a ClusterRole");
    assert!(!manifests.roles.is_empty(), "a Role");
    assert!(!manifests.cluster_role_bindings.is_empty());
    assert!(!manifests.role_bindings.is_empty());
    daemon_set(&manifests);
}

#[test]
fn probes_ask_the_admin_server_on_the_configured_port() {
    let manifests = manifests();
    let (config, _) = config();
    let container = weir_container(daemon_set(&manifests));
    assert!(
        config.admin.address.ip().is_unspecified(),
        "the kubelet probes the node's address, so admin.address ({}) must listen on all \
         addresses, e.g. \"0.0.0.0:{}\"",
        config.admin.address,
        config.admin.address.port()
    );
    for (probe, path) in [
        (&container.liveness_probe, LIVEZ_PATH),
        (&container.readiness_probe, READYZ_PATH),
    ] {
        let get = probe
            .as_ref()
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap_or_else(|| panic!("no httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert!(matches!(get.scheme.as_deref(), None | Some("HTTP")));
        assert_eq!(
            port_number(container, &get.port),
            config.admin.address.port(),
            "the {path} probe's port is not admin.address's"
        );
    }
    if let Some(get) = container
        .startup_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
    {
        assert!(matches!(
            get.path.as_deref(),
            Some(LIVEZ_PATH | READYZ_PATH)
        ));
        assert_eq!(
            port_number(container, &get.port),
            config.admin.address.port()
        );
    }
}

#[test]
fn container_runs_weir_with_the_mounted_weir_toml() {
    let manifests = manifests();
    let daemon_set = daemon_set(&manifests);
    let container = weir_container(daemon_set);
    let argv: Vec<&str> = container
        .command
        .iter()
        .chain(&container.args)
        .flatten()
        .map(String::as_str)
        .collect();
    let ["weir", "run", "--config", path] = argv[..] else {
        panic!("the container runs {argv:?}, not `weir run --config PATH`");
    };

    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(path).parent() == Some(Path::new(&m.mount_path)))
        .unwrap_or_else(|| panic!("no volume is mounted where {path} lives"));
    assert_eq!(mount.read_only, Some(true), "the config mount is read-only");
    let file = Path::new(path).file_name().unwrap().to_string_lossy();
    let source = pod_spec(daemon_set)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.config_map.as_ref())
        .unwrap_or_else(|| panic!("volume {} is not a ConfigMap", mount.name));
    let key = match &source.items {
        Some(items) => items
            .iter()
            .find(|item| item.path == file)
            .map(|item| item.key.clone())
            .unwrap_or_else(|| panic!("ConfigMap {} puts nothing at {file}", source.name)),
        None => file.into_owned(),
    };

    let kustomization = Kustomization::load();
    assert!(
        kustomization.generator_options.disable_name_suffix_hash,
        "ConfigMaps keep their names"
    );
    let entries = kustomization.generator(&source.name).entries();
    let (_, file) = entries
        .iter()
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| panic!("ConfigMap {} has no key {key}", source.name));
    assert_eq!(
        file, "weir.toml",
        "{path} must be deploy/base/weir.toml, the config this test checks"
    );
}

#[test]
fn termination_grace_outlasts_the_shutdown_drain() {
    let manifests = manifests();
    let (config, _) = config();
    // The kubelet's default when the field is unset.
    let grace = pod_spec(daemon_set(&manifests))
        .termination_grace_period_seconds
        .unwrap_or(30);
    let drain = config.proxy.shutdown_grace_period.0;
    assert!(
        grace as f64 > drain.as_secs_f64(),
        "terminationGracePeriodSeconds ({grace}) must be longer than proxy.shutdown_grace_period \
         ({drain:?}), or the kubelet kills weir before connections have drained"
    );
}

#[test]
fn container_has_the_host_network_and_only_the_capabilities_it_needs() {
    let manifests = manifests();
    let (_, raw) = config();
    let daemon_set = daemon_set(&manifests);
    let pod = pod_spec(daemon_set);
    let container = weir_container(daemon_set);
    assert_eq!(
        pod.host_network,
        Some(true),
        "weir listens in the node's network namespace"
    );

    let security = container
        .security_context
        .as_ref()
        .expect("the container has a securityContext");
    let capabilities = security
        .capabilities
        .as_ref()
        .expect("capabilities are set");
    let set = |list: &Option<Vec<String>>| -> BTreeSet<String> {
        list.iter().flatten().cloned().collect()
    };
    assert_eq!(set(&capabilities.drop), BTreeSet::from(["ALL".to_string()]));
    assert_eq!(
        set(&capabilities.add),
        BTreeSet::from(["NET_ADMIN".to_string(), "NET_BIND_SERVICE".to_string()]),
        "NET_ADMIN for weir0 and its addresses, NET_BIND_SERVICE for low Service ports; nothing else"
    );
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));

    assert_eq!(
        env_field(container, "NODE_NAME"),
        Some("spec.nodeName"),
        "node.name comes from NODE_NAME, set from the downward API"
    );
    assert!(
        raw_str(&raw, "node", "name").is_none(),
        "deploy/base/weir.toml must not name a node: every node runs it"
    );
}

#[test]
fn the_module_cache_and_the_flow_state_are_the_only_writable_paths() {
    let manifests = manifests();
    let (config, _) = config();
    let daemon_set = daemon_set(&manifests);
    let container = weir_container(daemon_set);
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));

    let cache = config
        .cache_dir()
        .expect("policies.cache_dir is set: the default under $HOME is on the read-only root");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| cache.starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("nothing is mounted at {}", cache.display()));
    assert_ne!(mount.read_only, Some(true));
    let volume = pod_spec(daemon_set)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert!(
        volume.empty_dir.is_some(),
        "the cache is an emptyDir: compiled modules are weir's own, never shared"
    );

    // UDP flows outlive the pod, on the node's /run: the next weir on the node reads them.
    let state = config
        .proxy
        .state_dir
        .as_ref()
        .expect("proxy.state_dir is set");
    let mount = (container.volume_mounts.iter().flatten())
        .find(|m| state.starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("nothing is mounted at {}", state.display()));
    assert_ne!(mount.read_only, Some(true));
    let volume = (pod_spec(daemon_set).volumes.iter().flatten())
        .find(|v| v.name == mount.name)
        .unwrap();
    let host = volume
        .host_path
        .as_ref()
        .expect("a hostPath: it outlives the pod");
    assert!(
        host.path.starts_with("/run/"),
        "tmpfs, gone at reboot: {}",
        host.path
    );
    let writable: Vec<&str> = (container.volume_mounts.iter().flatten())
        .filter(|m| m.read_only != Some(true))
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(writable, ["/var/cache/weir", "/run/weir"]);
}

/// What one binding grants: `(group, resource, verb)` and where.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    group: String,
    resource: String,
    verb: String,
    /// `None`: every namespace (a ClusterRoleBinding); else one namespace.
    namespace: Option<String>,
}

fn grants(rule: &PolicyRule, namespace: Option<&str>, from: &str) -> Vec<Grant> {
    assert!(
        rule.non_resource_urls.is_none(),
        "{from}: weir uses no non-resource URLs"
    );
    assert!(
        rule.resource_names.is_none(),
        "{from}: resourceNames would not cover list and watch"
    );
    let mut grants = Vec::new();
    for group in rule.api_groups.iter().flatten() {
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                grants.push(Grant {
                    group: group.clone(),
                    resource: resource.clone(),
                    verb: verb.clone(),
                    namespace: namespace.map(str::to_string),
                });
            }
        }
    }
    grants
}

fn is_weir(subject: &Subject, account: &str, namespace: &str) -> bool {
    subject.kind == "ServiceAccount"
        && subject.name == account
        && subject.namespace.as_deref() == Some(namespace)
}

#[test]
fn rbac_grants_exactly_the_access_the_code_declares() {
    let manifests = manifests();
    let (config, _) = config();
    let daemon_set = daemon_set(&manifests);
    let namespace = weir_namespace(&config, daemon_set);
    let account = pod_spec(daemon_set)
        .service_account_name
        .clone()
        .expect("the DaemonSet names its ServiceAccount");
    assert!(
        manifests
            .service_accounts
            .iter()
            .any(|sa| sa.metadata.name.as_deref() == Some(account.as_str())
                && namespace_of(&sa.metadata) == namespace),
        "ServiceAccount {namespace}/{account} is in deploy/base/"
    );

    let cluster_role = |name: &str| {
        manifests
            .cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("ClusterRole {name} is not in deploy/"))
    };
    let mut granted = BTreeSet::new();
    let mut bound = BTreeSet::new();
    let binds_weir = |subjects: &Option<Vec<Subject>>| {
        subjects
            .iter()
            .flatten()
            .any(|s| is_weir(s, &account, &namespace))
    };
    for binding in &manifests.cluster_role_bindings {
        if !binds_weir(&binding.subjects) {
            continue;
        }
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        let role = cluster_role(&binding.role_ref.name);
        bound.insert(format!("ClusterRole/{}", binding.role_ref.name));
        for rule in role.rules.iter().flatten() {
            granted.extend(grants(rule, None, &binding.role_ref.name));
        }
    }
    for binding in &manifests.role_bindings {
        if !binds_weir(&binding.subjects) {
            continue;
        }
        let at = namespace_of(&binding.metadata);
        let rules = match binding.role_ref.kind.as_str() {
            "Role" => {
                bound.insert(format!("Role/{}", binding.role_ref.name));
                manifests
                    .roles
                    .iter()
                    .find(|r| {
                        r.metadata.name.as_deref() == Some(binding.role_ref.name.as_str())
                            && namespace_of(&r.metadata) == at
                    })
                    .unwrap_or_else(|| {
                        panic!("Role {at}/{} is not in deploy/", binding.role_ref.name)
                    })
                    .rules
                    .clone()
            }
            _ => cluster_role(&binding.role_ref.name).rules.clone(),
        };
        for rule in rules.iter().flatten() {
            granted.extend(grants(rule, Some(at), &binding.role_ref.name));
        }
    }
    for role in &manifests.cluster_roles {
        let name = role.metadata.name.clone().unwrap_or_default();
        assert!(
            bound.contains(&format!("ClusterRole/{name}"))
                || manifests
                    .role_bindings
                    .iter()
                    .any(|b| b.role_ref.kind == "ClusterRole" && b.role_ref.name == name),
            "ClusterRole {name} is bound to nobody"
        );
    }
    for role in &manifests.roles {
        let name = role.metadata.name.clone().unwrap_or_default();
        assert!(
            bound.contains(&format!("Role/{name}")),
            "Role {name} is not bound to weir's ServiceAccount"
        );
    }

    // Nothing more than the code uses: each grant is an access, at its scope.
    for grant in &granted {
        let declared = ACCESS.iter().find(|a| {
            a.group == grant.group
                && a.resource == grant.resource
                && a.verbs.contains(&&*grant.verb)
        });
        let where_ = grant.namespace.as_deref().unwrap_or("every namespace");
        let Some(access) = declared else {
            panic!(
                "{grant:?} is granted but weir::discovery::kubernetes::ACCESS does not use it: \
                 remove it from deploy/rbac.yaml (least privilege)"
            );
        };
        match (&access.scope, &grant.namespace) {
            (Scope::OwnNamespace, None) => panic!(
                "{} {} is granted in {where_}, but weir only needs it in its own namespace: \
                 use a Role in {namespace}",
                grant.verb, grant.resource
            ),
            (Scope::OwnNamespace, Some(at)) if *at != namespace => panic!(
                "{} {} is granted in {at}, but weir's namespace is {namespace}",
                grant.verb, grant.resource
            ),
            _ => {}
        }
    }
    // And all that it uses.
    for access in ACCESS {
        for verb in access.verbs {
            let grant = |namespace: Option<&str>| Grant {
                group: access.group.to_string(),
                resource: access.resource.to_string(),
                verb: verb.to_string(),
                namespace: namespace.map(str::to_string),
            };
            let covered = granted.contains(&grant(None))
                || (matches!(access.scope, Scope::OwnNamespace)
                    && granted.contains(&grant(Some(&namespace))));
            assert!(
                covered,
                "weir needs {verb} on {}.{} ({}), which deploy/rbac.yaml does not grant",
                access.resource,
                if access.group.is_empty() {
                    "core"
                } else {
                    access.group
                },
                match access.scope {
                    Scope::Cluster => "in every namespace".to_string(),
                    Scope::OwnNamespace => format!("in {namespace}"),
                }
            );
        }
    }
}

#[test]
fn kustomization_lists_every_manifest_in_one_namespace() {
    let kustomization = Kustomization::load();
    let listed: BTreeSet<String> = kustomization.resources.iter().cloned().collect();
    assert_eq!(
        listed,
        manifest_files(),
        "deploy/base/kustomization.yaml's resources must be exactly the other deploy/*.yaml"
    );

    let manifests = manifests();
    let namespace = kustomization
        .namespace
        .clone()
        .expect("the kustomization sets a namespace");
    let name = manifests.namespaces[0].metadata.name.as_deref();
    assert_eq!(name, Some(namespace.as_str()));
    let mut namespaced = vec![("DaemonSet", &daemon_set(&manifests).metadata)];
    namespaced.extend(
        manifests
            .service_accounts
            .iter()
            .map(|o| ("ServiceAccount", &o.metadata)),
    );
    namespaced.extend(manifests.roles.iter().map(|o| ("Role", &o.metadata)));
    namespaced.extend(
        manifests
            .role_bindings
            .iter()
            .map(|o| ("RoleBinding", &o.metadata)),
    );
    for (kind, metadata) in namespaced {
        assert_eq!(
            namespace_of(metadata),
            namespace,
            "{kind} {:?} is in another namespace than the kustomization's",
            metadata.name
        );
    }
}

/// The policies `deploy/build-policies.sh` builds unless told others: its `SHIPPED=(...)`.
fn shipped_by_script() -> BTreeSet<String> {
    let script = read(&deploy().join("../build-policies.sh"));
    let line = script
        .lines()
        .find_map(|line| line.strip_prefix("SHIPPED=("))
        .expect("deploy/build-policies.sh has a SHIPPED=(...) line");
    line.trim_end_matches(')')
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn policies_configmap_ships_library_policies_the_script_builds() {
    let (config, _) = config();
    let kustomization = Kustomization::load();
    let name = config
        .policies
        .configmap
        .as_deref()
        .expect("deploy/base/weir.toml names the policies ConfigMap (policies.configmap)");
    assert!(
        kustomization.generator_options.disable_name_suffix_hash,
        "weir watches ConfigMap {name} by name: kustomize must not add a hash suffix"
    );
    let root = deploy().join("../..").canonicalize().unwrap();

    let mut modules = BTreeSet::new();
    let mut bytes = 0;
    for (key, path) in kustomization.generator(name).entries() {
        if key == "policies.toml" {
            let text = read(&deploy().join(&path));
            let table: toml::Table = toml::from_str(&text)
                .unwrap_or_else(|e| panic!("deploy/base/{path} is not TOML: {e}"));
            assert!(
                table.values().all(toml::Value::is_table),
                "deploy/base/{path}: one table per policy"
            );
            bytes += text.len() as u64;
            continue;
        }
        let policy = key.strip_suffix(".wasm.gz").unwrap_or_else(|| {
            panic!("{name}: key {key} is neither NAME.wasm.gz nor policies.toml")
        });
        assert_eq!(
            path,
            format!("policies/{key}"),
            "deploy/build-policies.sh writes {key} into deploy/base/policies/"
        );
        assert!(
            root.join("policies")
                .join(policy)
                .join("Cargo.toml")
                .exists(),
            "{key}: there is no policy crate policies/{policy}"
        );
        assert!(
            !matches!(policy, "kube-default" | "sdk"),
            "{key}: kube-default is built into weir and the SDK is no policy"
        );
        // What build-policies.sh ships: the module, gzipped as `gzip -9` does.
        let built = weir::test_helpers::guest_path(policy);
        let module = std::fs::read(&built).unwrap_or_else(|e| panic!("{}: {e}", built.display()));
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut encoder, &module).unwrap();
        bytes += encoder.finish().unwrap().len() as u64;
        modules.insert(policy.to_string());
    }
    assert_eq!(
        modules,
        shipped_by_script(),
        "the modules in kustomization.yaml's {name} and build-policies.sh's SHIPPED differ"
    );
    assert!(
        bytes <= CONFIGMAP_MAX_BYTES,
        "{name} would hold {bytes} bytes; a ConfigMap holds at most {CONFIGMAP_MAX_BYTES}: \
         ship fewer modules in it"
    );
    // The whole library, every policy but the built-in kube-default.
    let library: BTreeSet<String> = std::fs::read_dir(root.join("policies"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| root.join("policies").join(n).join("Cargo.toml").exists())
        .filter(|n| !matches!(n.as_str(), "kube-default" | "sdk"))
        .collect();
    assert_eq!(modules, library, "the ConfigMap ships the whole library");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(deploy().join("../build-policies.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "deploy/build-policies.sh is executable");
    }
}

/// The two ways to run weir share `deploy/base/`: `deploy/` adds nothing (beside
/// kube-proxy), `deploy/replace-kube-proxy/` swaps in its weir.toml, which differs from
/// the base's only in serving every Service and taking kube-proxy's health port, and
/// moves the container's admin port to match.
#[test]
fn the_replace_kube_proxy_variant_differs_from_the_base_only_where_it_must() {
    let root = deploy().parent().unwrap().to_path_buf();
    let beside: serde_json::Value =
        weir::yaml::document(&read(&root.join("kustomization.yaml"))).unwrap();
    assert_eq!(beside["resources"], weir::yaml::document("[base]").unwrap());

    let variant = root.join("replace-kube-proxy");
    let kustomization: serde_json::Value =
        weir::yaml::document(&read(&variant.join("kustomization.yaml"))).unwrap();
    assert_eq!(
        kustomization["resources"],
        weir::yaml::document("[../base]").unwrap()
    );
    let generator = &kustomization["configMapGenerator"][0];
    assert_eq!(generator["name"], "weir-config");
    assert_eq!(generator["behavior"], "replace");

    let base: toml::Table = toml::from_str(&read(&deploy().join("weir.toml"))).unwrap();
    let text = read(&variant.join("weir.toml"));
    let replacing: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(raw_str(&base, "source", "service_proxy_name"), Some("weir"));
    assert_eq!(raw_str(&replacing, "source", "service_proxy_name"), None);
    let admin = raw_str(&replacing, "admin", "address").expect("admin.address");
    assert_eq!(admin, "0.0.0.0:10256", "kube-proxy's health port");
    let metrics = raw_str(&replacing, "admin", "metrics_address");
    assert_eq!(
        metrics,
        Some("127.0.0.1:10249"),
        "kube-proxy's metrics port"
    );
    let metrics = raw_str(&base, "admin", "metrics_address").expect("metrics off the network");
    assert!(metrics.starts_with("127.0.0.1:"), "{metrics}");
    let strip = |mut table: toml::Table| {
        for (section, key) in [
            ("source", "service_proxy_name"),
            ("admin", "address"),
            ("admin", "metrics_address"),
        ] {
            table[section].as_table_mut().unwrap().remove(key);
        }
        table
    };
    assert_eq!(
        strip(base),
        strip(replacing.clone()),
        "only those keys differ"
    );
    let named = text.replacen("[node]\n", "[node]\nname = \"node-a\"\n", 1);
    let config = Config::parse(&named, &variant).expect("weir accepts it");
    assert_eq!(config.source.service_proxy_name, None);

    // The container's admin port follows, by the JSON patch.
    let patches = kustomization["patches"].as_array().unwrap();
    let port_patch = patches
        .iter()
        .find_map(|p| p["patch"].as_str())
        .expect("a JSON patch of the admin port");
    assert!(
        port_patch.contains("/ports/0/containerPort") && port_patch.contains("value: 10256"),
        "{port_patch}"
    );
    let manifests = manifests();
    let daemon_set = daemon_set(&manifests);
    let port = &weir_container(daemon_set).ports.as_ref().unwrap()[0];
    assert_eq!(
        port.name.as_deref(),
        Some("admin"),
        "the patch replaces the admin port"
    );

    // weir's own lookups stay off the cluster DNS it serves, and the API server is named
    // by address.
    let patch: serde_json::Value =
        weir::yaml::document(&read(&variant.join("daemonset.yaml"))).unwrap();
    let spec = &patch["spec"]["template"]["spec"];
    assert_eq!(spec["dnsPolicy"], "Default");
    let env = spec["containers"][0]["env"].as_array().unwrap();
    let names: Vec<&str> = env.iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(
        names,
        ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"]
    );
}
