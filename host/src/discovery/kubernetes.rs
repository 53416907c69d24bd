//! Objects from the Kubernetes API: watchers for Services, EndpointSlices, this node's
//! Node and the policies ConfigMap(s), kept in a store the control plane reads as it reads
//! files. Nothing downstream knows the difference.
//!
//! Each kind is followed by kube-rs's `watcher` with its default backoff, managedFields
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
    // its own namespace. Each is created; none is patched.
    Access {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create"],
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

/// The kinds followed, in the order `/readyz` lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services,
    EndpointSlices,
    Node,
    ConfigMaps,
}

/// One kind's objects by namespace and name, and a relist in progress.
struct Table<K> {
    objects: HashMap<ServiceKey, Arc<K>>,
    relisting: Option<HashMap<ServiceKey, Arc<K>>>,
    /// Whether a full list has arrived.
    synced: bool,
    /// The last error of its watch, until it recovers.
    error: Option<String>,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Table {
            objects: HashMap::new(),
            relisting: None,
            synced: false,
            error: None,
        }
    }
}

type Pair<K> = (Option<Arc<K>>, Option<Arc<K>>);

impl<K: Resource> Table<K> {
    /// Applies one watcher event. Returns what changed, as (before, after) pairs.
    fn apply(&mut self, event: watcher::Event<K>) -> Vec<Pair<K>> {
        let key = |object: &K| model::namespaced_name(object.meta());
        match event {
            watcher::Event::Init => {
                self.relisting = Some(HashMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(object) => {
                let relisting = self.relisting.get_or_insert_with(HashMap::new);
                relisting.insert(key(&object), Arc::new(object));
                Vec::new()
            }
            watcher::Event::InitDone => {
                let new = self.relisting.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.objects, new);
                self.synced = true;
                let mut pairs = Vec::new();
                for (key, before) in &old {
                    match self.objects.get(key) {
                        Some(after) if same_version(&**before, &**after) => {}
                        after => pairs.push((Some(before.clone()), after.cloned())),
                    }
                }
                for (key, after) in &self.objects {
                    if !old.contains_key(key) {
                        pairs.push((None, Some(after.clone())));
                    }
                }
                pairs
            }
            watcher::Event::Apply(object) => {
                let object = Arc::new(object);
                match self.objects.insert(key(&object), object.clone()) {
                    Some(before) if same_version(&*before, &*object) => Vec::new(),
                    before => vec![(before, Some(object))],
                }
            }
            watcher::Event::Delete(object) => match self.objects.remove(&key(&object)) {
                Some(before) => vec![(Some(before), None)],
                None => Vec::new(),
            },
        }
    }
}

fn same_version<K: Resource>(a: &K, b: &K) -> bool {
    a.meta().resource_version.is_some() && a.meta().resource_version == b.meta().resource_version
}

/// Everything the watchers have seen, and what changed since the control plane looked.
#[derive(Default)]
struct Store {
    services: Table<Service>,
    slices: Table<EndpointSlice>,
    /// The slices of each Service, by their `kubernetes.io/service-name` label.
    slices_of: HashMap<ServiceKey, BTreeSet<ServiceKey>>,
    node: Table<Node>,
    configmaps: Table<ConfigMap>,
    touched: Changed,
    policies_changed: bool,
    /// Whether any object changed since the last look.
    changed: bool,
}

impl Store {
    fn table_state(&mut self, kind: Kind) -> (&mut bool, &mut Option<String>) {
        match kind {
            Kind::Services => (&mut self.services.synced, &mut self.services.error),
            Kind::EndpointSlices => (&mut self.slices.synced, &mut self.slices.error),
            Kind::Node => (&mut self.node.synced, &mut self.node.error),
            Kind::ConfigMaps => (&mut self.configmaps.synced, &mut self.configmaps.error),
        }
    }

    fn index_slice(&mut self, slice: &EndpointSlice, add: bool) {
        let Some(service) = slice_service(slice) else {
            return;
        };
        let key = model::namespaced_name(&slice.metadata);
        if add {
            self.slices_of.entry(service).or_default().insert(key);
        } else if let Some(slices) = self.slices_of.get_mut(&service) {
            slices.remove(&key);
            if slices.is_empty() {
                self.slices_of.remove(&service);
            }
        }
    }
}

fn slice_service(slice: &EndpointSlice) -> Option<ServiceKey> {
    let name = slice
        .metadata
        .labels
        .as_ref()?
        .get(model::SERVICE_NAME_LABEL)?;
    Some((model::namespaced_name(&slice.metadata).0, name.clone()))
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
    /// `binaryData` `NAME.wasm`: the policy name and the module.
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
            match key.strip_suffix(".wasm") {
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

fn sourced<K: Clone + Resource<DynamicType = ()>>(object: &Arc<K>) -> Sourced<K> {
    let meta = object.meta();
    Sourced {
        origin: Origin {
            file: PathBuf::from(format!(
                "{} {}/{}",
                K::kind(&()),
                meta.namespace.as_deref().unwrap_or(""),
                meta.name.as_deref().unwrap_or("")
            )),
            document: None,
            item: None,
        },
        object: object.clone(),
    }
}

/// Drops the objects that are not this proxy's from a relist, and turns their other
/// events into deletions: a Service relabelled away leaves, whatever the server's
/// selector did.
fn filter_event<K>(
    event: watcher::Event<K>,
    owned: impl Fn(&K) -> bool,
) -> Option<watcher::Event<K>> {
    match event {
        watcher::Event::Apply(object) if !owned(&object) => Some(watcher::Event::Delete(object)),
        watcher::Event::InitApply(object) if !owned(&object) => None,
        other => Some(other),
    }
}

async fn client_config(settings: &Settings) -> anyhow::Result<kube::Config> {
    match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                anyhow::anyhow!("source.kubeconfig: cannot use {}: {e}", path.display())
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| {
                    anyhow::anyhow!("source.kubeconfig: cannot use {}: {e}", path.display())
                })
        }
        None => kube::Config::infer().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot find the Kubernetes API server: {e}; run in a Pod with a service account, set KUBECONFIG, or set source.kubeconfig"
            )
        }),
    }
}

/// Follows one kind: every event goes through `apply` on the store, then wakes the
/// control plane. Errors are logged once per outage; the watcher's backoff retries.
async fn follow<K, F>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    store: Arc<Mutex<Store>>,
    wake: Arc<dyn Fn() + Send + Sync>,
    mut apply: F,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
    F: FnMut(&mut Store, watcher::Event<K>) + Send,
{
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|object: &mut K| slim(object.meta_mut()));
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                let wakes = !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_));
                {
                    let mut store = lock(&store);
                    if let Some(error) = store.table_state(kind).1.take() {
                        tracing::info!(?kind, "watch recovered after: {error}");
                    }
                    apply(&mut store, event);
                    store.changed |= wakes;
                }
                if wakes {
                    wake();
                }
            }
            Err(error) => {
                let mut store = lock(&store);
                let (_, slot) = store.table_state(kind);
                if slot.is_none() {
                    tracing::warn!(
                        ?kind,
                        "watch failed: {error}; relisting with backoff, current routing keeps serving"
                    );
                }
                *slot = Some(error.to_string());
            }
        }
    }
}

/// What weir reads of a Node.
fn node_relevant(node: &Node) -> impl PartialEq + '_ {
    (
        &node.metadata.labels,
        &node.metadata.deletion_timestamp,
        node.spec
            .as_ref()
            .map(|s| (&s.taints, &s.pod_cidrs, &s.pod_cidr)),
        node.status.as_ref().map(|s| &s.addresses),
    )
}

/// Drops what weir never reads and can be large: managedFields, and kubectl's copy of
/// the whole object in an annotation. A store of 10,000 Services keeps less this way.
fn slim(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Publishes Events as they come. Each is created with a name of its own: kube-rs's
/// Recorder would fold a second `PolicyLoaded` on the same ConfigMap into the first one's
/// series, keeping the first note, and the module and digest in the note are the point.
/// weir announces only changes, so there is nothing to aggregate.
async fn publish(
    client: Client,
    mut announcements: tokio::sync::mpsc::UnboundedReceiver<Announcement>,
    instance: String,
) {
    let mut failing = false;
    let mut sequence = 0u64;
    while let Some(announcement) = announcements.recv().await {
        let regarding = announcement.subject.0;
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let now = k8s_openapi::jiff::Timestamp::now();
        sequence += 1;
        let event = K8sEvent {
            metadata: ObjectMeta {
                // As client-go names them: the object's name and a unique suffix.
                name: Some(format!(
                    "{}.{:x}{:x}",
                    regarding.name.as_deref().unwrap_or("weir"),
                    now.as_nanosecond(),
                    sequence
                )),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            action: Some(announcement.action.to_string()),
            reason: Some(announcement.reason.to_string()),
            // The API server refuses notes over 1 kB.
            note: Some(crate::units::shorten(&announcement.note, 1000)),
            type_: Some(
                if announcement.warning {
                    "Warning"
                } else {
                    "Normal"
                }
                .to_string(),
            ),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding),
            reporting_controller: Some(REPORTER.to_string()),
            reporting_instance: Some(instance.clone()),
            ..K8sEvent::default()
        };
        let events = Api::<K8sEvent>::namespaced(client.clone(), &namespace);
        match events.create(&PostParams::default(), &event).await {
            Ok(_) => failing = false,
            Err(error) => {
                if !failing {
                    tracing::warn!(
                        reason = announcement.reason,
                        "cannot publish an Event: {error}"
                    );
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, version: &str) -> Service {
        let mut service = Service::default();
        service.metadata.name = Some(name.into());
        service.metadata.namespace = Some("default".into());
        service.metadata.resource_version = Some(version.into());
        service
    }

    fn names(pairs: &[Pair<Service>]) -> Vec<(Option<String>, Option<String>)> {
        let mut names: Vec<_> = pairs
            .iter()
            .map(|(before, after)| {
                let id = |s: &Option<Arc<Service>>| {
                    s.as_ref().map(|s| {
                        format!(
                            "{}@{}",
                            s.name_any(),
                            s.metadata.resource_version.as_deref().unwrap_or("")
                        )
                    })
                };
                (id(before), id(after))
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_relist_is_swapped_in_whole_and_reports_only_differences() {
        let mut table = Table::<Service>::default();
        assert!(table.apply(watcher::Event::Init).is_empty());
        table.apply(watcher::Event::InitApply(service("a", "1")));
        table.apply(watcher::Event::InitApply(service("b", "2")));
        assert!(
            !table.synced && table.objects.is_empty(),
            "nothing before InitDone"
        );
        let pairs = table.apply(watcher::Event::InitDone);
        assert!(table.synced);
        assert_eq!(
            names(&pairs),
            [(None, Some("a@1".into())), (None, Some("b@2".into()))]
        );

        // A relist (after 410 Gone, say) keeps serving the old objects until it is
        // complete, then reports what differs: b changed, a deleted, c added.
        table.apply(watcher::Event::Init);
        table.apply(watcher::Event::InitApply(service("b", "5")));
        assert_eq!(
            table.objects.len(),
            2,
            "the old objects serve during a relist"
        );
        table.apply(watcher::Event::InitApply(service("c", "6")));
        let pairs = table.apply(watcher::Event::InitDone);
        assert_eq!(
            names(&pairs),
            [
                (None, Some("c@6".into())),
                (Some("a@1".into()), None),
                (Some("b@2".into()), Some("b@5".into())),
            ]
        );

        // Watch events; an unchanged resourceVersion is no change.
        assert!(
            table
                .apply(watcher::Event::Apply(service("c", "6")))
                .is_empty()
        );
        assert_eq!(
            table.apply(watcher::Event::Apply(service("c", "7"))).len(),
            1
        );
        assert_eq!(
            table.apply(watcher::Event::Delete(service("c", "8"))).len(),
            1
        );
        assert!(
            table
                .apply(watcher::Event::Delete(service("c", "8")))
                .is_empty()
        );
    }

    #[test]
    fn selector_matches_kube_proxy() {
        let mut settings = Settings {
            kubeconfig: None,
            namespace: "weir".into(),
            node: "node-a".into(),
            service_proxy_name: None,
            policies: PolicySource::Named("weir-policies".into()),
            instance: "weir-abcde".into(),
        };
        assert_eq!(
            settings.service_selector(),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert!(settings.owns(&labels(&[("app", "web")])));
        assert!(!settings.owns(&labels(&[(SERVICE_PROXY_NAME_LABEL, "weir")])));
        assert!(!settings.owns(&labels(&[(HEADLESS_LABEL, "")])));
        settings.service_proxy_name = Some("weir".into());
        assert_eq!(
            settings.service_selector(),
            "service.kubernetes.io/service-proxy-name=weir,!service.kubernetes.io/headless"
        );
        assert!(settings.owns(&labels(&[(SERVICE_PROXY_NAME_LABEL, "weir")])));
        assert!(!settings.owns(&labels(&[(SERVICE_PROXY_NAME_LABEL, "cilium")])));
        assert!(!settings.owns(&labels(&[])));
    }
}
