//! Objects from the Kubernetes API: watchers for Services, EndpointSlices, this node's
//! Node and the policies ConfigMap(s), kept in a store the control plane reads as it reads
//! files. Nothing downstream knows the difference.
//!
//! Each kind is followed by kube-rs's `watcher` with weir's own capped backoff, managedFields
//! stripped. A relist (at start, after `410 Gone`, after the API server went away) is
//! buffered and swapped in whole when it is complete, so routing keeps what it had until
//! then; the swap reports only what differs. Events for the control plane are published
//! from here too.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::files::{Objects, Origin, Sourced};
use super::watch::{Changed, Poll};
use crate::locks::lock;
use crate::model::{self, ServiceKey};

/// The label that hands a Service to a proxy other than the default one.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label the endpoints controllers put on the slices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The `data` key of a policies ConfigMap that holds the policies' settings.
pub const POLICY_SETTINGS_KEY: &str = "policies.toml";
/// The `reportingController` of weir's Events.
pub const REPORTER: &str = "weir.dev/proxy";

/// One permission weir's Kubernetes mode uses: what deploy/'s RBAC must grant, and no
/// more (a test checks the manifests against this list).
#[derive(Debug)]
pub struct Access {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    pub scope: Scope,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (a ClusterRole).
    Cluster,
    /// Only weir's own namespace (a Role there).
    OwnNamespace,
}

/// What the watchers and the Event recorder below do.
pub const ACCESS: &[Access] = &[
    Access {
        group: "",
        resource: "services",
        verbs: &["get", "list", "watch"],
        scope: Scope::Cluster,
    },
    Access {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["get", "list", "watch"],
        scope: Scope::Cluster,
    },
    Access {
        group: "",
        resource: "nodes",
        verbs: &["get", "list", "watch"],
        scope: Scope::Cluster,
    },
    Access {
        group: "",
        resource: "configmaps",
        verbs: &["get", "list", "watch"],
        scope: Scope::OwnNamespace,
    },
    // Events go to the object they are about: the policies ConfigMap, or a Service in
    // its own namespace. Each is created, and patched when it happens again (its series).
    Access {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        scope: Scope::Cluster,
    },
];

/// Where to look, resolved from the config and the environment.
#[derive(Clone, Debug)]
pub struct Settings {
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub node: String,
    pub service_proxy_name: Option<String>,
    pub policies: PolicySource,
    /// Who posts the Events: the pod's name, else the node's.
    pub instance: String,
}

/// Which ConfigMaps in weir's namespace hold policies.
#[derive(Clone, Debug)]
pub enum PolicySource {
    Named(String),
    Selected(String),
}

impl Settings {
    pub fn from_config(config: &crate::config::Config) -> Settings {
        let namespace = config
            .source
            .namespace
            .clone()
            .or_else(|| config.environment.pod_namespace.clone())
            .or_else(|| {
                std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "weir".to_string());
        let policies = match (&config.policies.selector, &config.policies.configmap) {
            (Some(selector), _) => PolicySource::Selected(selector.clone()),
            (None, Some(name)) => PolicySource::Named(name.clone()),
            (None, None) => PolicySource::Named("weir-policies".to_string()),
        };
        Settings {
            kubeconfig: config.source.kubeconfig.clone(),
            namespace,
            node: config.node.name.clone(),
            service_proxy_name: config.source.service_proxy_name.clone(),
            policies,
            instance: (config.environment.pod_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| config.node.name.clone()),
        }
    }

    /// The label selector for Services and EndpointSlices: kube-proxy's, so that weir and
    /// kube-proxy split the cluster's Services between them without overlap.
    pub fn service_selector(&self) -> String {
        match &self.service_proxy_name {
            None => format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"),
            Some(name) => format!("{SERVICE_PROXY_NAME_LABEL}={name},!{HEADLESS_LABEL}"),
        }
    }

    /// Whether a Service is this proxy's, by its labels (the selector says the same on
    /// the server's side; this checks what a lenient server sent anyway).
    fn owns(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        labels.get(SERVICE_PROXY_NAME_LABEL) == self.service_proxy_name.as_ref()
            && !labels.contains_key(HEADLESS_LABEL)
    }

    fn policies_description(&self) -> String {
        match &self.policies {
            PolicySource::Named(name) => format!("configmap {}/{name}", self.namespace),
            PolicySource::Selected(selector) => {
                format!("configmaps in {} matching {selector}", self.namespace)
            }
        }
    }
}

/// What an Event is about (a policies ConfigMap, a Service); opaque to the control plane.
#[derive(Clone, Debug, PartialEq)]
pub struct Subject(ObjectReference);

/// One policies ConfigMap as the control plane reads it.
#[derive(Debug)]
pub struct PolicyMap {
    /// `namespace/name`, for logs.
    pub name: String,
    pub subject: Subject,
    /// `binaryData` `NAME.wasm` or `NAME.wasm.gz`: the policy name and the module.
    pub modules: Vec<(String, Vec<u8>)>,
    /// `data` `policies.toml`.
    pub settings: Option<String>,
    /// `binaryData` keys that are not `NAME.wasm`.
    pub ignored: Vec<String>,
}

impl PolicyMap {
    fn of(map: &ConfigMap) -> PolicyMap {
        let mut modules = Vec::new();
        let mut ignored = Vec::new();
        for (key, bytes) in map.binary_data.iter().flatten() {
            // NAME.wasm, or NAME.wasm.gz (inflated when loaded).
            let stem = key.strip_suffix(".gz").unwrap_or(key);
            match stem.strip_suffix(".wasm") {
                Some(name) if !name.is_empty() => modules.push((name.to_string(), bytes.0.clone())),
                _ => ignored.push(key.clone()),
            }
        }
        PolicyMap {
            name: format!("{}/{}", map.namespace().unwrap_or_default(), map.name_any()),
            subject: Subject(map.object_ref(&())),
            modules,
            settings: map
                .data
                .as_ref()
                .and_then(|d| d.get(POLICY_SETTINGS_KEY))
                .cloned(),
            ignored,
        }
    }
}

/// An Event to publish about an object.
#[derive(Debug)]
pub struct Announcement {
    pub subject: Subject,
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

/// The Kubernetes source: watchers on their own runtime thread, feeding a store.
pub struct KubeSource {
    settings: Settings,
    server: String,
    store: Arc<Mutex<Store>>,
    announce: tokio::sync::mpsc::UnboundedSender<Announcement>,
    /// Dropped last: stops the watchers.
    _runtime: Background,
}

/// The watchers' runtime, shut down without waiting when dropped: weir may be dropping it
/// from inside another runtime (an error while starting), where waiting panics, and a
/// watch stuck in a DNS lookup must not hold up shutdown.
struct Background(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Background {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("server", &self.server)
            .field("settings", &self.settings)
            .finish()
    }
}

impl KubeSource {
    /// Connects (lazily: nothing is sent before the first list) and starts the watchers.
    /// `wake` is called after each change, from the watchers' thread.
    pub fn start(
        settings: Settings,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> anyhow::Result<KubeSource> {
        let runtime = Background(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("weir-kube")
                .enable_all()
                .build()?,
        ));
        // Called from async code too (weir starts inside a runtime): the config is read
        // on a thread of its own.
        let config = std::thread::scope(|scope| {
            scope
                .spawn(|| runtime.block_on(client_config(&settings)))
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("reading the kubeconfig panicked")))
        })?;
        let server = config.cluster_url.to_string();
        let client = {
            let _guard = runtime.enter();
            Client::try_from(config).map_err(|e| {
                anyhow::anyhow!("cannot build a Kubernetes client for {server}: {e}")
            })?
        };
        let store = Arc::new(Mutex::new(Store::default()));
        let services = watcher::Config::default().labels(&settings.service_selector());
        runtime.spawn(follow(
            Api::<Service>::all(client.clone()),
            services.clone(),
            Kind::Services,
            store.clone(),
            wake.clone(),
            {
                let settings = settings.clone();
                move |store: &mut Store, event| {
                    let Some(event) = filter_event(event, |s: &Service| settings.owns(s.labels()))
                    else {
                        return;
                    };
                    for (before, after) in store.services.apply(event) {
                        for service in before.iter().chain(after.iter()) {
                            let key = model::namespaced_name(&service.metadata);
                            store.touched.merge(Changed::Services([key].into()));
                        }
                    }
                }
            },
        ));
        runtime.spawn(follow(
            Api::<EndpointSlice>::all(client.clone()),
            services,
            Kind::EndpointSlices,
            store.clone(),
            wake.clone(),
            {
                let settings = settings.clone();
                move |store: &mut Store, event| {
                    let Some(event) =
                        filter_event(event, |s: &EndpointSlice| settings.owns(s.labels()))
                    else {
                        return;
                    };
                    let relist = matches!(event, watcher::Event::InitDone);
                    let pairs = store.slices.apply(event);
                    if relist {
                        store.slices_of.clear();
                        let all: Vec<_> = store.slices.objects.values().cloned().collect();
                        for slice in all {
                            store.index_slice(&slice, true);
                        }
                    }
                    for (before, after) in pairs {
                        if let Some(slice) = &before {
                            if !relist {
                                store.index_slice(slice, false);
                            }
                            if let Some(key) = slice_service(slice) {
                                store.touched.merge(Changed::Services([key].into()));
                            }
                        }
                        if let Some(slice) = &after {
                            if !relist {
                                store.index_slice(slice, true);
                            }
                            if let Some(key) = slice_service(slice) {
                                store.touched.merge(Changed::Services([key].into()));
                            }
                        }
                    }
                }
            },
        ));
        runtime.spawn(follow(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={}", settings.node)),
            Kind::Node,
            store.clone(),
            wake.clone(),
            |store: &mut Store, event| {
                // The kubelet updates its Node's status regularly; only what weir reads
                // (labels, taints, deletion, addresses, pod ranges) is worth a rebuild of
                // every Service.
                let pairs = store.node.apply(event);
                if pairs.iter().any(|(before, after)| {
                    before.as_deref().map(node_relevant) != after.as_deref().map(node_relevant)
                }) {
                    store.touched = Changed::Everything;
                }
            },
        ));
        let configmaps = match &settings.policies {
            PolicySource::Named(name) => {
                watcher::Config::default().fields(&format!("metadata.name={name}"))
            }
            PolicySource::Selected(selector) => watcher::Config::default().labels(selector),
        };
        runtime.spawn(follow(
            Api::<ConfigMap>::namespaced(client.clone(), &settings.namespace),
            configmaps,
            Kind::ConfigMaps,
            store.clone(),
            wake,
            |store: &mut Store, event| {
                if !store.configmaps.apply(event).is_empty() {
                    store.policies_changed = true;
                }
            },
        ));
        let (announce, announcements) = tokio::sync::mpsc::unbounded_channel();
        runtime.spawn(publish(client, announcements, settings.instance.clone()));
        Ok(KubeSource {
            settings,
            server,
            store,
            announce,
            _runtime: runtime,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether every kind has been listed in full once.
    pub fn synced(&self) -> bool {
        let store = lock(&self.store);
        store.services.synced && store.slices.synced && store.node.synced && store.configmaps.synced
    }

    /// What the first sync still waits for, for `/readyz`.
    pub fn pending(&self) -> Vec<String> {
        let mut store = lock(&self.store);
        let mut pending = Vec::new();
        for (kind, what) in [
            (Kind::Services, "services".to_string()),
            (Kind::EndpointSlices, "endpointslices".to_string()),
            (Kind::Node, format!("node {}", self.settings.node)),
            (Kind::ConfigMaps, self.settings.policies_description()),
        ] {
            let (synced, error) = store.table_state(kind);
            if !*synced {
                pending.push(match error {
                    Some(error) => format!(
                        "{what}: first list from {} failed, retrying: {error}",
                        self.server
                    ),
                    None => format!("{what}: waiting for the first list from {}", self.server),
                });
            }
        }
        pending
    }

    /// What changed since the last look.
    pub fn poll(&mut self) -> Poll {
        let mut store = lock(&self.store);
        Poll {
            changed: std::mem::take(&mut store.changed),
            touched: std::mem::take(&mut store.touched),
            diagnostics: Vec::new(),
        }
    }

    /// The policies ConfigMaps in name order, if they changed since the last look.
    pub fn policies(&mut self) -> Option<Vec<PolicyMap>> {
        let mut store = lock(&self.store);
        if !std::mem::take(&mut store.policies_changed) {
            return None;
        }
        let mut maps: Vec<_> = store
            .configmaps
            .objects
            .values()
            .map(|map| PolicyMap::of(map))
            .collect();
        maps.sort_by(|a, b| a.name.cmp(&b.name));
        Some(maps)
    }

    /// Every object.
    pub fn objects(&self) -> Objects {
        let store = lock(&self.store);
        let mut objects = Objects {
            services: store.services.objects.values().map(sourced).collect(),
            endpoint_slices: store.slices.objects.values().map(sourced).collect(),
            nodes: store.node.objects.values().map(sourced).collect(),
        };
        // Stable order, as files give: the model resolves conflicts by it.
        objects
            .services
            .sort_by_key(|s| s.object.metadata.name.clone());
        objects
            .endpoint_slices
            .sort_by_key(|s| s.object.metadata.name.clone());
        objects
    }

    /// The objects the ports of `services` are built from, and the Node.
    pub fn objects_for(&self, services: &BTreeSet<ServiceKey>) -> Objects {
        let store = lock(&self.store);
        let mut objects = Objects {
            nodes: store.node.objects.values().map(sourced).collect(),
            ..Objects::default()
        };
        for key in services {
            if let Some(service) = store.services.objects.get(key) {
                objects.services.push(sourced(service));
            }
            for slice in store.slices_of.get(key).into_iter().flatten() {
                if let Some(slice) = store.slices.objects.get(slice) {
                    objects.endpoint_slices.push(sourced(slice));
                }
            }
        }
        objects
    }

    /// A Service, for an Event about it.
    pub fn service_subject(&self, key: &ServiceKey) -> Subject {
        let store = lock(&self.store);
        Subject(match store.services.objects.get(key) {
            Some(service) => service.object_ref(&()),
            None => ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some(key.0.clone()),
                name: Some(key.1.clone()),
                ..ObjectReference::default()
            },
        })
    }

    /// Publishes an Event (in the background; a failure is logged, never retried).
    pub fn announce(&self, announcement: Announcement) {
        let _ = self.announce.send(announcement);
    }
}

mod events;
mod store;
mod watch;

use events::publish;
use store::*;
use watch::{client_config, follow};

#[cfg(test)]
mod tests;
