//! What the fake API server stores: the resource types it serves, objects under one
//! resourceVersion counter, the change history watches replay, and watch lines.

use super::*;

/// A kind of object the server stores, and where it lives among the URLs.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct ResourceType {
    /// `v1` for the core group, `group/version` otherwise.
    pub(super) api_version: &'static str,
    pub(super) kind: &'static str,
    /// The lower-case plural in URLs.
    pub(super) plural: &'static str,
    pub(super) namespaced: bool,
}

pub(super) static RESOURCES: [ResourceType; 6] = [
    ResourceType {
        api_version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
    },
    ResourceType {
        api_version: "v1",
        kind: "Node",
        plural: "nodes",
        namespaced: false,
    },
    ResourceType {
        api_version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        namespaced: true,
    },
    ResourceType {
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
    },
    ResourceType {
        api_version: "events.k8s.io/v1",
        kind: "Event",
        plural: "events",
        namespaced: true,
    },
    ResourceType {
        api_version: "v1",
        kind: "Event",
        plural: "events",
        namespaced: true,
    },
];

impl ResourceType {
    pub(super) fn by_plural(api_version: &str, plural: &str) -> Option<&'static ResourceType> {
        RESOURCES
            .iter()
            .find(|r| r.api_version == api_version && r.plural == plural)
    }

    pub(super) fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
        RESOURCES
            .iter()
            .find(|r| r.api_version == api_version && r.kind == kind)
    }

    /// Every resource of a kind name (Events live in two API groups); panics on an unknown one.
    pub(super) fn all_of_kind(kind: &str) -> impl Iterator<Item = &'static ResourceType> {
        let known: Vec<&str> = RESOURCES.iter().map(|r| r.kind).collect();
        assert!(
            known.contains(&kind),
            "the fake API server stores no kind {kind:?} (it knows {known:?})"
        );
        RESOURCES.iter().filter(move |r| r.kind == kind)
    }

    /// Where an object is stored; a namespaced one without a namespace is in `default`.
    pub(super) fn key(&self, namespace: Option<&str>, name: &str) -> ObjectKey {
        let namespace = if self.namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        (namespace.to_string(), name.to_string())
    }
}

/// (namespace, name); the namespace is empty for cluster-scoped objects.
pub(super) type ObjectKey = (String, String);

/// Sets an object's apiVersion and kind, and its namespace (from the request path, else
/// its own, else `default`), and returns where it is stored.
pub(super) fn identify(
    resource: &ResourceType,
    object: &mut Value,
    path_namespace: Option<&str>,
) -> Result<ObjectKey, String> {
    if !object.is_object() {
        return Err(format!("a {} must be a JSON object", resource.kind));
    }
    object["apiVersion"] = json!(resource.api_version);
    object["kind"] = json!(resource.kind);
    let Some(name) = object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
    else {
        return Err(format!(
            "metadata.name: Required value: a {} needs a name",
            resource.kind
        ));
    };
    let name = name.to_string();
    let own_namespace = object["metadata"]["namespace"].as_str();
    if let (Some(own), Some(path)) = (own_namespace, path_namespace)
        && own != path
    {
        return Err(format!(
            "the namespace of the object ({own}) does not match the namespace on the request ({path})"
        ));
    }
    let key = resource.key(path_namespace.or(own_namespace), &name);
    if resource.namespaced {
        object["metadata"]["namespace"] = json!(key.0);
    }
    Ok(key)
}

/// Every object, the recent changes, the open watches and what the tests ask about.
#[derive(Default)]
pub(super) struct Store {
    /// The last resourceVersion handed out.
    pub(super) revision: u64,
    /// Watches from this resourceVersion or later can be replayed from `history`; older
    /// ones get 410 Expired.
    pub(super) compacted: u64,
    pub(super) objects: HashMap<&'static ResourceType, BTreeMap<ObjectKey, Arc<Value>>>,
    /// Changes after `compacted`, oldest first.
    pub(super) history: VecDeque<Change>,
    pub(super) watches: Vec<Watch>,
    /// Events written by clients, each as stored after the write.
    pub(super) client_events: Vec<Value>,
    /// LIST (false) and WATCH (true) requests received per resource.
    pub(super) requests: HashMap<(&'static ResourceType, bool), usize>,
}

/// One write, as watches see it.
pub(super) struct Change {
    pub(super) resource: &'static ResourceType,
    pub(super) revision: u64,
    pub(super) kind: ChangeKind,
    /// The new state; for a deletion, the last state under the deletion's resourceVersion.
    pub(super) object: Arc<Value>,
}

pub(super) enum ChangeKind {
    Added,
    /// `previous` decides, per watch, whether the object entered or left its selection.
    Modified {
        previous: Arc<Value>,
    },
    Deleted,
}

impl Store {
    pub(super) fn get(
        &self,
        resource: &'static ResourceType,
        key: &ObjectKey,
    ) -> Option<Arc<Value>> {
        self.objects.get(resource)?.get(key).cloned()
    }

    /// Stores `object` under a new resourceVersion, creating its uid and creationTimestamp
    /// or keeping the replaced object's, and tells the watches.
    pub(super) fn put(
        &mut self,
        resource: &'static ResourceType,
        key: ObjectKey,
        mut object: Value,
    ) -> Arc<Value> {
        self.revision += 1;
        let previous = self.get(resource, &key);
        let metadata = &mut object["metadata"];
        metadata["resourceVersion"] = json!(self.revision.to_string());
        match &previous {
            Some(previous) => {
                metadata["uid"] = previous["metadata"]["uid"].clone();
                metadata["creationTimestamp"] = previous["metadata"]["creationTimestamp"].clone();
            }
            None => {
                metadata["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.revision));
                metadata["creationTimestamp"] = json!(now());
            }
        }
        let object = Arc::new(object);
        let objects = self.objects.entry(resource).or_default();
        objects.insert(key, object.clone());
        let kind = match previous {
            Some(previous) => ChangeKind::Modified { previous },
            None => ChangeKind::Added,
        };
        self.record(resource, kind, object.clone());
        object
    }

    pub(super) fn remove(&mut self, resource: &'static ResourceType, key: &ObjectKey) -> bool {
        let Some(removed) = self.objects.get_mut(resource).and_then(|o| o.remove(key)) else {
            return false;
        };
        self.revision += 1;
        let mut last = (*removed).clone();
        last["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.record(resource, ChangeKind::Deleted, Arc::new(last));
        true
    }

    pub(super) fn record(
        &mut self,
        resource: &'static ResourceType,
        kind: ChangeKind,
        object: Arc<Value>,
    ) {
        let change = Change {
            resource,
            revision: self.revision,
            kind,
            object,
        };
        self.watches.retain(|watch| watch.offer(&change));
        self.history.push_back(change);
        if self.history.len() > HISTORY_LIMIT
            && let Some(forgotten) = self.history.pop_front()
        {
            self.compacted = forgotten.revision;
        }
    }

    /// Up to `limit` objects matching `selector`, in key order after `after`, and whether
    /// more follow.
    pub(super) fn page(
        &self,
        resource: &'static ResourceType,
        selector: &Selector,
        after: Option<ObjectKey>,
        limit: Option<usize>,
    ) -> (Vec<Arc<Value>>, bool) {
        let Some(objects) = self.objects.get(resource) else {
            return (Vec::new(), false);
        };
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut matching = objects
            .range((start, Bound::Unbounded))
            .map(|(_, object)| object)
            .filter(|object| selector.matches(object));
        let items = matching
            .by_ref()
            .take(limit.unwrap_or(usize::MAX))
            .cloned()
            .collect();
        (items, matching.next().is_some())
    }

    /// Opens a watch: from `from` it replays the history after that version (or sends 410
    /// if it is compacted); without, it sends the current objects as ADDED, then, for a
    /// streaming list, the bookmark that marks their end. Then it is live.
    pub(super) fn watch(
        &mut self,
        resource: &'static ResourceType,
        selector: Selector,
        bookmarks: bool,
        from: Option<u64>,
        initial_events: bool,
    ) -> mpsc::UnboundedReceiver<Bytes> {
        let (lines, receiver) = mpsc::unbounded_channel();
        let watch = Watch {
            resource,
            selector,
            bookmarks,
            from: from.unwrap_or(self.revision),
            lines,
        };
        match from {
            Some(from) if from < self.compacted => {
                let _ = watch.lines.send(expired_line(from, self.compacted));
                return receiver;
            }
            Some(from) => {
                let start = self
                    .history
                    .partition_point(|change| change.revision <= from);
                for change in self.history.range(start..) {
                    watch.offer(change);
                }
            }
            None => {
                for object in self.page(resource, &watch.selector, None, None).0 {
                    let _ = watch.lines.send(watch_line("ADDED", &object));
                }
                if initial_events {
                    let _ = watch
                        .lines
                        .send(bookmark_line(resource, self.revision, true));
                }
            }
        }
        self.watches.push(watch);
        receiver
    }

    pub(super) fn count(&mut self, resource: &'static ResourceType, watch: bool) {
        *self.requests.entry((resource, watch)).or_default() += 1;
    }

    pub(super) fn bookmark(&mut self) {
        let revision = self.revision;
        self.watches.retain(|watch| {
            if watch.bookmarks {
                watch
                    .lines
                    .send(bookmark_line(watch.resource, revision, false))
                    .is_ok()
            } else {
                !watch.lines.is_closed()
            }
        });
    }

    pub(super) fn expire(&mut self) {
        self.compacted = self.revision;
        self.history.clear();
        for watch in self.watches.drain(..) {
            let _ = watch.lines.send(expired_line(watch.from, self.compacted));
        }
    }
}

/// An open watch: what it selects, and the channel to its response body.
pub(super) struct Watch {
    pub(super) resource: &'static ResourceType,
    pub(super) selector: Selector,
    pub(super) bookmarks: bool,
    /// The resourceVersion the client watched from, for the 410 message.
    pub(super) from: u64,
    pub(super) lines: mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    /// Sends what `change` means to this watch, if anything. A MODIFIED object that enters
    /// the selection is ADDED, one that leaves it is DELETED, as the real server does.
    /// Returns false once the client has gone.
    pub(super) fn offer(&self, change: &Change) -> bool {
        if change.resource != self.resource {
            return !self.lines.is_closed();
        }
        let now = self.selector.matches(&change.object);
        let type_ = match &change.kind {
            ChangeKind::Added => now.then_some("ADDED"),
            ChangeKind::Deleted => now.then_some("DELETED"),
            ChangeKind::Modified { previous } => match (self.selector.matches(previous), now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
        };
        match type_ {
            Some(type_) => self.lines.send(watch_line(type_, &change.object)).is_ok(),
            None => !self.lines.is_closed(),
        }
    }
}

/// One line of a watch response.
#[derive(Serialize)]
pub(super) struct WatchLine<'a> {
    #[serde(rename = "type")]
    pub(super) type_: &'a str,
    pub(super) object: &'a Value,
}

pub(super) fn watch_line(type_: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&WatchLine { type_, object }).expect("JSON serializes");
    line.push(b'\n');
    line.into()
}

/// A BOOKMARK; `initial_events_end` marks the end of a streaming list's initial objects.
pub(super) fn bookmark_line(
    resource: &ResourceType,
    revision: u64,
    initial_events_end: bool,
) -> Bytes {
    let mut object = json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": {"resourceVersion": revision.to_string()},
    });
    if initial_events_end {
        object["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    watch_line("BOOKMARK", &object)
}

pub(super) fn expired_line(from: u64, compacted: u64) -> Bytes {
    let message = format!("too old resource version: {from} ({compacted})");
    watch_line(
        "ERROR",
        &ApiError::new(StatusCode::GONE, "Expired", message).status(),
    )
}
