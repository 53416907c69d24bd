//! What the watches have seen: a table per kind, relists swapped in whole, and the
//! objects handed to the model as the file source hands them.

use super::*;

/// The kinds followed, in the order `/readyz` lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Services,
    EndpointSlices,
    Node,
    ConfigMaps,
}

/// One kind's objects by namespace and name, and a relist in progress.
pub(super) struct Table<K> {
    pub(super) objects: HashMap<ServiceKey, Arc<K>>,
    pub(super) relisting: Option<HashMap<ServiceKey, Arc<K>>>,
    /// Whether a full list has arrived.
    pub(super) synced: bool,
    /// The last error of its watch, until it recovers.
    pub(super) error: Option<String>,
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

pub(super) type Pair<K> = (Option<Arc<K>>, Option<Arc<K>>);

impl<K: Resource> Table<K> {
    /// Applies one watcher event. Returns what changed, as (before, after) pairs.
    pub(super) fn apply(&mut self, event: watcher::Event<K>) -> Vec<Pair<K>> {
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

pub(super) fn same_version<K: Resource>(a: &K, b: &K) -> bool {
    a.meta().resource_version.is_some() && a.meta().resource_version == b.meta().resource_version
}

/// Everything the watchers have seen, and what changed since the control plane looked.
#[derive(Default)]
pub(super) struct Store {
    pub(super) services: Table<Service>,
    pub(super) slices: Table<EndpointSlice>,
    /// The slices of each Service, by their `kubernetes.io/service-name` label.
    pub(super) slices_of: HashMap<ServiceKey, BTreeSet<ServiceKey>>,
    pub(super) node: Table<Node>,
    pub(super) configmaps: Table<ConfigMap>,
    pub(super) touched: Changed,
    pub(super) policies_changed: bool,
    /// Whether any object changed since the last look.
    pub(super) changed: bool,
    /// Whether the API server is away.
    pub(super) outage: super::watch::Outage,
}

impl Store {
    pub(super) fn table_state(&mut self, kind: Kind) -> (&mut bool, &mut Option<String>) {
        match kind {
            Kind::Services => (&mut self.services.synced, &mut self.services.error),
            Kind::EndpointSlices => (&mut self.slices.synced, &mut self.slices.error),
            Kind::Node => (&mut self.node.synced, &mut self.node.error),
            Kind::ConfigMaps => (&mut self.configmaps.synced, &mut self.configmaps.error),
        }
    }

    pub(super) fn index_slice(&mut self, slice: &EndpointSlice, add: bool) {
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

pub(super) fn slice_service(slice: &EndpointSlice) -> Option<ServiceKey> {
    let name = slice
        .metadata
        .labels
        .as_ref()?
        .get(model::SERVICE_NAME_LABEL)?;
    Some((model::namespaced_name(&slice.metadata).0, name.clone()))
}

pub(super) fn sourced<K: Clone + Resource<DynamicType = ()>>(object: &Arc<K>) -> Sourced<K> {
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
pub(super) fn filter_event<K>(
    event: watcher::Event<K>,
    owned: impl Fn(&K) -> bool,
) -> Option<watcher::Event<K>> {
    match event {
        watcher::Event::Apply(object) if !owned(&object) => Some(watcher::Event::Delete(object)),
        watcher::Event::InitApply(object) if !owned(&object) => None,
        other => Some(other),
    }
}

/// What weir reads of a Node.
pub(super) fn node_relevant(node: &Node) -> impl PartialEq + '_ {
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
pub(super) fn slim(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}
