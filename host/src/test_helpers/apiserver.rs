//! A fake Kubernetes API server, in process, that the real kube client lists, watches and
//! posts Events to: enough of the list/watch protocol for kube-rs's `watcher` and `Recorder`.
//!
//! The server runs on its own thread with its own tokio runtime, so every control method is
//! plain sync code usable from `#[test]` and `#[tokio::test]` alike. Objects are JSON values;
//! one resourceVersion counter covers every resource, as etcd's does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The bearer token the written kubeconfig carries and every request must present.
const TOKEN: &str = "weir-test-token";
/// How many changes are kept for watches that resume from an older resourceVersion: etcd's
/// compaction window, counted in changes rather than minutes.
const HISTORY_LIMIT: usize = 20_000;
/// How often open watches that allow bookmarks get one without the test asking.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a watch lasts when the client sends no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

type Body = BoxBody<Bytes, Infallible>;

/// A Kubernetes API server for tests: start it, point a kube client at
/// [`kubeconfig`](ApiServer::kubeconfig), feed it objects and break it on purpose.
pub struct ApiServer {
    address: SocketAddr,
    shared: Arc<Shared>,
    /// Serving, or stopped with the port held for [`restart`](ApiServer::restart).
    listener: Mutex<Listener>,
    /// Runs the accept loop, the connections and the bookmark ticker; `None` only in `drop`.
    runtime: Option<Runtime>,
}

/// What the request handlers and the test controls share.
#[derive(Default)]
struct Shared {
    store: Mutex<Store>,
    /// Signalled when a client writes an Event, for [`ApiServer::wait_for_event`].
    event_written: Condvar,
    /// Cancelled to close every connection accepted so far, then replaced by a fresh one.
    connections: Mutex<CancellationToken>,
}

/// The listening side of the server.
enum Listener {
    Serving {
        /// Ends the accept loop, which then closes the listening socket.
        stop: CancellationToken,
        /// Receives once the listening socket is closed.
        closed: std_mpsc::Receiver<()>,
    },
    /// Bound but not listening: connections are refused, and no one else can take the port.
    Stopped { _placeholder: Socket },
}

impl ApiServer {
    /// Starts a server on `127.0.0.1` and a free port, with no objects.
    pub fn start() -> ApiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()
            .expect("a tokio runtime for the fake API server");
        let shared = Arc::new(Shared::default());
        // etcd's revisions start at 1; a watch from "0" means "from now", not "from the start".
        lock(&shared.store).revision = 1;
        let socket = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("the fake API server binds 127.0.0.1:0");
        let address = socket.local_addr().expect("a bound socket has an address");
        let listener = serve(&runtime, &shared, socket);
        runtime.spawn(send_bookmarks(shared.clone()));
        ApiServer {
            address,
            shared,
            listener: Mutex::new(listener),
            runtime: Some(runtime),
        }
    }

    /// Where the server listens (the same address across [`restart`](ApiServer::restart)).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Writes `dir/kubeconfig`: one cluster at `http://<address>`, a user with the token the
    /// server expects, and a current context whose namespace is `default`. Returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let config = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{address}
users:
- name: fake
  user:
    token: {TOKEN}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
",
            address = self.address
        );
        std::fs::write(&path, config).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// Creates or replaces the object named by its apiVersion, kind, namespace (`default`
    /// when a namespaced object has none) and name; watches see ADDED or MODIFIED.
    /// Panics on an object the server does not store, naming what is wrong.
    pub fn apply(&self, mut object: Value) {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let resource = ResourceType::by_kind(api_version, kind).unwrap_or_else(|| {
            panic!("apply: the fake API server does not store {api_version} {kind}")
        });
        let key = identify(resource, &mut object, None).unwrap_or_else(|e| panic!("apply: {e}"));
        self.store().put(resource, key, object);
    }

    /// [`apply`](ApiServer::apply)s each of the `---`-separated YAML documents in order.
    pub fn apply_yaml(&self, yaml: &str) {
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let object = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("apply_yaml: invalid YAML: {e}"));
            if !object.is_null() {
                self.apply(object);
            }
        }
    }

    /// Deletes an object by kind name ("Service", "EndpointSlice", "Node", "ConfigMap",
    /// "Event"); watches see DELETED with its last state under a new resourceVersion.
    /// Returns whether it existed.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let mut store = self.store();
        ResourceType::all_of_kind(kind)
            .any(|resource| store.remove(resource, &resource.key(namespace, name)))
    }

    /// The stored object, by kind name as for [`delete`](ApiServer::delete).
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let store = self.store();
        ResourceType::all_of_kind(kind)
            .find_map(|resource| store.get(resource, &resource.key(namespace, name)))
            .map(|object| (*object).clone())
    }

    /// Sends a BOOKMARK at the current resourceVersion on every open watch that allows them
    /// (the server also sends one every second).
    pub fn bookmark(&self) {
        self.store().bookmark();
    }

    /// Compacts the history: every open watch gets a 410 Expired ERROR and ends, and later
    /// watches from a resourceVersion before now get the same.
    pub fn expire(&self) {
        self.store().expire();
    }

    /// Closes every open connection abruptly: watch streams end without a final event.
    pub fn drop_connections(&self) {
        let fresh = CancellationToken::new();
        let old = std::mem::replace(&mut *lock(&self.shared.connections), fresh);
        old.cancel();
    }

    /// Goes away: stops listening (connections are refused) and closes every connection.
    /// The port stays reserved for [`restart`](ApiServer::restart). Does nothing if stopped.
    pub fn stop(&self) {
        let mut listener = lock(&self.listener);
        if let Listener::Serving { stop, closed } = &*listener {
            stop.cancel();
            closed
                .recv_timeout(Duration::from_secs(5))
                .expect("the fake API server's accept loop ends");
            self.drop_connections();
            let placeholder = reserve(self.address)
                .unwrap_or_else(|e| panic!("reserving {} while stopped: {e}", self.address));
            *listener = Listener::Stopped {
                _placeholder: placeholder,
            };
        }
    }

    /// Comes back on the same address with the same objects and history, as an API server
    /// restart does. Does nothing if serving.
    pub fn restart(&self) {
        let mut listener = lock(&self.listener);
        if let Listener::Stopped { .. } = &*listener {
            let socket = listen(self.address)
                .unwrap_or_else(|e| panic!("listening on {} again: {e}", self.address));
            // Replacing the stopped state releases the placeholder after the new listener is up.
            *listener = serve(self.runtime(), &self.shared, socket);
        }
    }

    /// Every Event a client created (POST) or patched, as stored after each write, in order;
    /// both `events.k8s.io/v1` and core `v1` Events.
    pub fn events(&self) -> Vec<Value> {
        self.store().client_events.clone()
    }

    /// The first Event in [`events`](ApiServer::events) that `predicate` accepts, waiting up
    /// to `deadline` for one to be written. Blocks the calling thread: from async code, call
    /// it after the write was awaited.
    pub fn wait_for_event(
        &self,
        predicate: impl Fn(&Value) -> bool,
        deadline: Duration,
    ) -> Option<Value> {
        let give_up = Instant::now() + deadline;
        let mut store = self.store();
        loop {
            if let Some(event) = store.client_events.iter().find(|event| predicate(event)) {
                return Some(event.clone());
            }
            let left = give_up.checked_duration_since(Instant::now())?;
            store = self
                .shared
                .event_written
                .wait_timeout(store, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// How many LIST (`watch` false) or WATCH requests for `resource` (the plural in URLs:
    /// "services", "endpointslices"...) arrived, refused ones included; a relist shows up as
    /// a new LIST.
    pub fn requests(&self, resource: &str, watch: bool) -> usize {
        self.store()
            .requests
            .iter()
            .filter(|((counted, is_watch), _)| counted.plural == resource && *is_watch == watch)
            .map(|(_, count)| count)
            .sum()
    }

    /// How many watch streams are open, as far as the server has noticed.
    pub fn open_watches(&self) -> usize {
        let mut store = self.store();
        store.watches.retain(|watch| !watch.lines.is_closed());
        store.watches.len()
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.shared.store)
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }
}

impl Drop for ApiServer {
    /// Shuts everything down without waiting, so it is safe inside an async test too.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A test panicking while it holds a lock must not hide its own failure behind ours.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A listening socket with SO_REUSEADDR, so a restart can rebind the port at once.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = reserve(address)?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A socket bound to `address` but not listening: the kernel refuses connections to it,
/// and it keeps the port from being handed to anyone else.
fn reserve(address: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    Ok(socket)
}

/// Starts accepting on `socket` in `runtime`.
fn serve(runtime: &Runtime, shared: &Arc<Shared>, socket: TcpListener) -> Listener {
    let stop = CancellationToken::new();
    let (closed_tx, closed) = std_mpsc::sync_channel(1);
    runtime.spawn(accept(socket, shared.clone(), stop.clone(), closed_tx));
    Listener::Serving { stop, closed }
}

async fn accept(
    socket: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    closed: std_mpsc::SyncSender<()>,
) {
    let listener =
        tokio::net::TcpListener::from_std(socket).expect("registering the listener with tokio");
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let closing = lock(&shared.connections).clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            // Dropping the connection closes the socket mid-response, as a crash would.
            tokio::select! {
                _ = connection => {}
                () = closing.cancelled() => {}
            }
        });
    }
    drop(listener);
    let _ = closed.send(());
}

async fn send_bookmarks(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(BOOKMARK_INTERVAL);
    loop {
        interval.tick().await;
        lock(&shared.store).bookmark();
    }
}

/// A kind of object the server stores, and where it lives among the URLs.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ResourceType {
    /// `v1` for the core group, `group/version` otherwise.
    api_version: &'static str,
    kind: &'static str,
    /// The lower-case plural in URLs.
    plural: &'static str,
    namespaced: bool,
}

static RESOURCES: [ResourceType; 6] = [
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
    fn by_plural(api_version: &str, plural: &str) -> Option<&'static ResourceType> {
        RESOURCES
            .iter()
            .find(|r| r.api_version == api_version && r.plural == plural)
    }

    fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
        RESOURCES
            .iter()
            .find(|r| r.api_version == api_version && r.kind == kind)
    }

    /// Every resource of a kind name (Events live in two API groups); panics on an unknown one.
    fn all_of_kind(kind: &str) -> impl Iterator<Item = &'static ResourceType> {
        let known: Vec<&str> = RESOURCES.iter().map(|r| r.kind).collect();
        assert!(
            known.contains(&kind),
            "the fake API server stores no kind {kind:?} (it knows {known:?})"
        );
        RESOURCES.iter().filter(move |r| r.kind == kind)
    }

    /// Where an object is stored; a namespaced one without a namespace is in `default`.
    fn key(&self, namespace: Option<&str>, name: &str) -> ObjectKey {
        let namespace = if self.namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        (namespace.to_string(), name.to_string())
    }
}

/// (namespace, name); the namespace is empty for cluster-scoped objects.
type ObjectKey = (String, String);

/// Sets an object's apiVersion and kind, and its namespace (from the request path, else
/// its own, else `default`), and returns where it is stored.
fn identify(
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
struct Store {
    /// The last resourceVersion handed out.
    revision: u64,
    /// Watches from this resourceVersion or later can be replayed from `history`; older
    /// ones get 410 Expired.
    compacted: u64,
    objects: HashMap<&'static ResourceType, BTreeMap<ObjectKey, Arc<Value>>>,
    /// Changes after `compacted`, oldest first.
    history: VecDeque<Change>,
    watches: Vec<Watch>,
    /// Events written by clients, each as stored after the write.
    client_events: Vec<Value>,
    /// LIST (false) and WATCH (true) requests received per resource.
    requests: HashMap<(&'static ResourceType, bool), usize>,
}

/// One write, as watches see it.
struct Change {
    resource: &'static ResourceType,
    revision: u64,
    kind: ChangeKind,
    /// The new state; for a deletion, the last state under the deletion's resourceVersion.
    object: Arc<Value>,
}

enum ChangeKind {
    Added,
    /// `previous` decides, per watch, whether the object entered or left its selection.
    Modified {
        previous: Arc<Value>,
    },
    Deleted,
}

impl Store {
    fn get(&self, resource: &'static ResourceType, key: &ObjectKey) -> Option<Arc<Value>> {
        self.objects.get(resource)?.get(key).cloned()
    }

    /// Stores `object` under a new resourceVersion, creating its uid and creationTimestamp
    /// or keeping the replaced object's, and tells the watches.
    fn put(
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

    fn remove(&mut self, resource: &'static ResourceType, key: &ObjectKey) -> bool {
        let Some(removed) = self.objects.get_mut(resource).and_then(|o| o.remove(key)) else {
            return false;
        };
        self.revision += 1;
        let mut last = (*removed).clone();
        last["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.record(resource, ChangeKind::Deleted, Arc::new(last));
        true
    }

    fn record(&mut self, resource: &'static ResourceType, kind: ChangeKind, object: Arc<Value>) {
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
    fn page(
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
    fn watch(
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

    fn count(&mut self, resource: &'static ResourceType, watch: bool) {
        *self.requests.entry((resource, watch)).or_default() += 1;
    }

    fn bookmark(&mut self) {
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

    fn expire(&mut self) {
        self.compacted = self.revision;
        self.history.clear();
        for watch in self.watches.drain(..) {
            let _ = watch.lines.send(expired_line(watch.from, self.compacted));
        }
    }
}

/// An open watch: what it selects, and the channel to its response body.
struct Watch {
    resource: &'static ResourceType,
    selector: Selector,
    bookmarks: bool,
    /// The resourceVersion the client watched from, for the 410 message.
    from: u64,
    lines: mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    /// Sends what `change` means to this watch, if anything. A MODIFIED object that enters
    /// the selection is ADDED, one that leaves it is DELETED, as the real server does.
    /// Returns false once the client has gone.
    fn offer(&self, change: &Change) -> bool {
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
struct WatchLine<'a> {
    #[serde(rename = "type")]
    type_: &'a str,
    object: &'a Value,
}

fn watch_line(type_: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&WatchLine { type_, object }).expect("JSON serializes");
    line.push(b'\n');
    line.into()
}

/// A BOOKMARK; `initial_events_end` marks the end of a streaming list's initial objects.
fn bookmark_line(resource: &ResourceType, revision: u64, initial_events_end: bool) -> Bytes {
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

fn expired_line(from: u64, compacted: u64) -> Bytes {
    let message = format!("too old resource version: {from} ({compacted})");
    watch_line(
        "ERROR",
        &ApiError::new(StatusCode::GONE, "Expired", message).status(),
    )
}

/// The objects a LIST or WATCH selects: the namespace in its path, `labelSelector` and
/// `fieldSelector`.
#[derive(Debug, Default)]
struct Selector {
    labels: Vec<LabelRequirement>,
    /// (JSON pointer into the object, value, whether it must equal or differ).
    fields: Vec<(&'static str, String, bool)>,
}

#[derive(Debug)]
enum LabelRequirement {
    Exists(String),
    Absent(String),
    Equals(String, String),
    /// Also matches objects without the label, as in Kubernetes.
    NotEquals(String, String),
}

impl Selector {
    fn parse(
        namespace: Option<&str>,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Selector, ApiError> {
        let mut selector = Selector::default();
        if let Some(namespace) = namespace {
            selector
                .fields
                .push(("/metadata/namespace", namespace.to_string(), true));
        }
        for term in terms(labels) {
            selector.labels.push(parse_label_requirement(term)?);
        }
        for term in terms(fields) {
            let (field, value, equal) = if let Some((field, value)) = term.split_once("!=") {
                (field, value, false)
            } else if let Some((field, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                (field, value, true)
            } else {
                return Err(bad_request(format!("invalid field selector term {term:?}")));
            };
            let pointer = match field.trim() {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                other => {
                    return Err(bad_request(format!("field label not supported: {other}")));
                }
            };
            selector
                .fields
                .push((pointer, value.trim().to_string(), equal));
        }
        Ok(selector)
    }

    fn matches(&self, object: &Value) -> bool {
        let label = |key: &str| object["metadata"]["labels"][key].as_str();
        let labels_match = self.labels.iter().all(|requirement| match requirement {
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::Absent(key) => label(key).is_none(),
            LabelRequirement::Equals(key, value) => label(key) == Some(value),
            LabelRequirement::NotEquals(key, value) => label(key) != Some(value),
        });
        labels_match
            && self.fields.iter().all(|(pointer, value, equal)| {
                let actual = object
                    .pointer(pointer)
                    .and_then(Value::as_str)
                    .unwrap_or("");
                (actual == value) == *equal
            })
    }
}

/// The non-empty comma-separated terms of a selector.
fn terms(selector: Option<&str>) -> impl Iterator<Item = &str> {
    selector
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
}

/// `key`, `!key`, `key=value`, `key==value` or `key!=value`; set-based terms (`in`,
/// `notin`) and anything else are rejected.
fn parse_label_requirement(term: &str) -> Result<LabelRequirement, ApiError> {
    let key_ok = |key: &str| {
        !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    let value_ok = |value: &str| {
        value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let requirement = if let Some(key) = term.strip_prefix('!') {
        LabelRequirement::Absent(key.trim().to_string())
    } else if let Some((key, value)) = term.split_once("!=") {
        LabelRequirement::NotEquals(key.trim().to_string(), value.trim().to_string())
    } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        LabelRequirement::Equals(key.trim().to_string(), value.trim().to_string())
    } else {
        LabelRequirement::Exists(term.to_string())
    };
    let valid = match &requirement {
        LabelRequirement::Exists(key) | LabelRequirement::Absent(key) => key_ok(key),
        LabelRequirement::Equals(key, value) | LabelRequirement::NotEquals(key, value) => {
            key_ok(key) && value_ok(value)
        }
    };
    if valid {
        Ok(requirement)
    } else {
        Err(bad_request(format!(
            "unable to parse requirement {term:?}: the fake API server supports key, !key, \
             key=value, key==value and key!=value"
        )))
    }
}

/// A refused request, answered as a v1 Status.
#[derive(Debug)]
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        })
    }
}

fn bad_request(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NotFound", message)
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    route(shared, request)
        .await
        .unwrap_or_else(|error| json_response(error.code, &error.status()))
}

async fn route(shared: &Shared, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let expected = format!("Bearer {TOKEN}");
    let authorization = request.headers().get(AUTHORIZATION);
    if authorization.is_none_or(|value| value.as_bytes() != expected.as_bytes()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        ));
    }
    let path = request.uri().path().trim_end_matches('/').to_string();
    if path == "/version" {
        return Ok(json_response(StatusCode::OK, &version()));
    }
    let target = Target::parse(&path)?;
    let query = Query::parse(request.uri().query().unwrap_or(""));
    let method = request.method().clone();
    match (method, &target.name) {
        (Method::GET, Some(name)) => {
            let key = target.resource.key(target.namespace.as_deref(), name);
            let object = lock(&shared.store)
                .get(target.resource, &key)
                .ok_or_else(|| {
                    not_found(format!("{} \"{name}\" not found", target.resource.plural))
                })?;
            Ok(json_response(StatusCode::OK, &object))
        }
        (Method::GET, None) if query.flag("watch") => watch(shared, &target, &query),
        (Method::GET, None) => list(shared, &target, &query),
        (Method::POST, None) => {
            let body = read_body(request).await?;
            create(shared, &target, body)
        }
        (Method::PATCH, Some(name)) => {
            let content_type = request
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = read_body(request).await?;
            patch(shared, &target, name, &content_type, body)
        }
        (method, _) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("the fake API server does not support {method} {path}"),
        )),
    }
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-08-27T00:00:00Z",
        "goVersion": "go1.24.6",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// What a URL names: a resource, maybe within a namespace, maybe one object.
struct Target {
    resource: &'static ResourceType,
    namespace: Option<String>,
    name: Option<String>,
}

impl Target {
    /// `/api/v1/...` or `/apis/{group}/{version}/...`, then `{plural}[/{name}]` or
    /// `namespaces/{ns}/{plural}[/{name}]`.
    fn parse(path: &str) -> Result<Target, ApiError> {
        let unknown = || {
            not_found(format!(
                "the server could not find the requested resource ({path})"
            ))
        };
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (api_version, rest) = match segments.as_slice() {
            ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return Err(unknown()),
        };
        let (namespace, plural, name) = match rest {
            [plural] => (None, plural, None),
            [plural, name] => (None, plural, Some(name)),
            ["namespaces", namespace, plural] => (Some(namespace), plural, None),
            ["namespaces", namespace, plural, name] => (Some(namespace), plural, Some(name)),
            _ => return Err(unknown()),
        };
        let resource = ResourceType::by_plural(&api_version, plural).ok_or_else(unknown)?;
        // A namespaced object is named within its namespace; nothing else has one.
        let misplaced = if resource.namespaced {
            namespace.is_none() && name.is_some()
        } else {
            namespace.is_some()
        };
        if misplaced {
            return Err(unknown());
        }
        Ok(Target {
            resource,
            namespace: namespace.map(|n| n.to_string()),
            name: name.map(|n| n.to_string()),
        })
    }
}

/// The decoded query parameters; unknown ones are ignored.
struct Query(HashMap<String, String>);

impl Query {
    fn parse(query: &str) -> Query {
        let pairs = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key), percent_decode(value))
            });
        Query(pairs.collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, ApiError> {
        self.get(key)
            .map(|value| {
                value
                    .parse()
                    .map_err(|_| bad_request(format!("{key}: invalid value {value:?}")))
            })
            .transpose()
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], escaped) {
            (_, Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (b'+', None) => {
                decoded.push(b' ');
                i += 1;
            }
            (byte, None) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn list(shared: &Shared, target: &Target, query: &Query) -> Result<Response<Body>, ApiError> {
    let resource = target.resource;
    lock(&shared.store).count(resource, false);
    let selector = Selector::parse(
        target.namespace.as_deref(),
        query.get("labelSelector"),
        query.get("fieldSelector"),
    )?;
    let limit = query.number::<usize>("limit")?.filter(|&limit| limit > 0);
    let store = lock(&shared.store);
    let (revision, after) = match query.get("continue") {
        Some(token) => {
            let (revision, after) = decode_continue(token)?;
            if revision < store.compacted {
                return Err(ApiError::new(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                ));
            }
            (revision, Some(after))
        }
        None => (store.revision, None),
    };
    let (items, more) = store.page(resource, &selector, after, limit);
    drop(store);
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if let (true, Some(last)) = (more, items.last()) {
        let namespace = last["metadata"]["namespace"].as_str().unwrap_or("");
        let name = last["metadata"]["name"].as_str().unwrap_or("");
        metadata["continue"] = json!(format!("{revision}/{namespace}/{name}"));
    }
    let items: Vec<&Value> = items.iter().map(|item| item.as_ref()).collect();
    let list = json!({
        "kind": format!("{}List", resource.kind),
        "apiVersion": resource.api_version,
        "metadata": metadata,
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &list))
}

/// A continue token is `{list resourceVersion}/{namespace}/{name of the last item}`:
/// opaque to clients, and the next page starts after that key whatever changed since.
fn decode_continue(token: &str) -> Result<(u64, ObjectKey), ApiError> {
    let invalid = || bad_request(format!("continue: invalid token {token:?}"));
    let mut parts = token.splitn(3, '/');
    let revision = parts
        .next()
        .and_then(|r| r.parse().ok())
        .ok_or_else(invalid)?;
    match (parts.next(), parts.next()) {
        (Some(namespace), Some(name)) => Ok((revision, (namespace.to_string(), name.to_string()))),
        _ => Err(invalid()),
    }
}

fn watch(shared: &Shared, target: &Target, query: &Query) -> Result<Response<Body>, ApiError> {
    lock(&shared.store).count(target.resource, true);
    let selector = Selector::parse(
        target.namespace.as_deref(),
        query.get("labelSelector"),
        query.get("fieldSelector"),
    )?;
    // A streaming list (`sendInitialEvents`) starts from the current state, as does a
    // watch from "0" or from nothing.
    let initial_events = query.flag("sendInitialEvents");
    let from = match query.get("resourceVersion") {
        _ if initial_events => None,
        None | Some("" | "0") => None,
        Some(_) => query.number::<u64>("resourceVersion")?,
    };
    let timeout = query
        .number::<u64>("timeoutSeconds")?
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let bookmarks = query.flag("allowWatchBookmarks");
    let lines = {
        let mut store = lock(&shared.store);
        store.watch(target.resource, selector, bookmarks, from, initial_events)
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = futures::stream::unfold(lines, move |mut lines| async move {
        tokio::select! {
            line = lines.recv() => line.map(|line| (Ok(Frame::data(line)), lines)),
            () = tokio::time::sleep_until(deadline) => None,
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(StreamBody::new(stream).boxed())
        .expect("a valid response"))
}

fn create(shared: &Shared, target: &Target, body: Bytes) -> Result<Response<Body>, ApiError> {
    let resource = target.resource;
    if resource.namespaced && target.namespace.is_none() {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("create {} within a namespace", resource.plural),
        ));
    }
    let mut object: Value = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("the request body is not JSON: {e}")))?;
    let key = identify(resource, &mut object, target.namespace.as_deref())
        .map_err(|message| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message))?;
    let mut store = lock(&shared.store);
    if store.get(resource, &key).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{}\" already exists", resource.plural, key.1),
        ));
    }
    let stored = store.put(resource, key, object);
    note_client_write(shared, &mut store, resource, &stored);
    Ok(json_response(StatusCode::CREATED, &stored))
}

/// Merge, strategic-merge and apply patches are all applied as a JSON merge patch, which
/// is what they amount to for the flat objects tests patch.
fn patch(
    shared: &Shared,
    target: &Target,
    name: &str,
    content_type: &str,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let resource = target.resource;
    let supported = [
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
    ];
    if !supported.contains(&content_type) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the fake API server does not support {content_type:?} patches"),
        ));
    }
    let patch: Value = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("the patch is not JSON: {e}")))?;
    let key = resource.key(target.namespace.as_deref(), name);
    let mut store = lock(&shared.store);
    let current = store
        .get(resource, &key)
        .ok_or_else(|| not_found(format!("{} \"{name}\" not found", resource.plural)))?;
    let mut object = (*current).clone();
    merge_patch(&mut object, &patch);
    let invalid =
        |message: &str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message);
    if !object["metadata"].is_object() {
        return Err(invalid("metadata: a patch cannot remove or replace it"));
    }
    // A patch cannot move or rename the object.
    object["metadata"]["name"] = json!(name);
    identify(resource, &mut object, target.namespace.as_deref()).map_err(|m| invalid(&m))?;
    let stored = store.put(resource, key, object);
    note_client_write(shared, &mut store, resource, &stored);
    Ok(json_response(StatusCode::OK, &stored))
}

/// RFC 7386: objects merge key by key, `null` removes a key, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn note_client_write(shared: &Shared, store: &mut Store, resource: &ResourceType, stored: &Value) {
    if resource.kind == "Event" {
        store.client_events.push(stored.clone());
        shared.event_written.notify_all();
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    let collected = request
        .into_body()
        .collect()
        .await
        .map_err(|e| bad_request(format!("reading the request body: {e}")))?;
    Ok(collected.to_bytes())
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("JSON serializes");
    Response::builder()
        .status(code)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("a valid response")
}

/// Now, to the second, as Kubernetes writes creationTimestamp.
fn now() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .expect("now is a valid timestamp")
        .to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::{StreamExt, TryStreamExt};
    use k8s_openapi::api::core::v1::{Event as CoreEvent, Service};
    use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
    use kube::runtime::events::{Event, EventType, Recorder};
    use kube::runtime::reflector::{self, ObjectRef};
    use kube::runtime::{WatchStreamExt, watcher};
    use kube::{Resource, ResourceExt};

    use super::*;

    const PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

    /// A kube client configured from the kubeconfig the server writes.
    async fn client(server: &ApiServer) -> kube::Client {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig(dir.path()))
            .expect("the written kubeconfig parses");
        let options = kube::config::KubeConfigOptions::default();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .expect("a client config from the kubeconfig");
        kube::Client::try_from(config).expect("a kube client")
    }

    fn service(name: &str, labels: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"ports": [{"port": 80}]},
        })
    }

    /// A reflector over every Service, fed by `watcher` with its default backoff; `errors`
    /// counts the errors the watcher reported.
    fn reflect(
        client: kube::Client,
        config: watcher::Config,
        errors: Arc<AtomicUsize>,
    ) -> reflector::Store<Service> {
        let (reader, writer) = reflector::store();
        let stream = watcher(Api::<Service>::all(client), config)
            .default_backoff()
            .inspect_err(move |_| {
                errors.fetch_add(1, Ordering::SeqCst);
            })
            .reflect(writer);
        tokio::spawn(stream.for_each(|_| std::future::ready(())));
        reader
    }

    fn names(reader: &reflector::Store<Service>) -> BTreeSet<String> {
        reader
            .state()
            .iter()
            .map(|service| service.name_any())
            .collect()
    }

    fn set<const N: usize>(names: [&str; N]) -> BTreeSet<String> {
        names.into_iter().map(String::from).collect()
    }

    /// Waits until `condition` holds, failing the test after a deadline.
    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn list_pages_through_more_objects_than_a_page() {
        let server = ApiServer::start();
        for i in 0..1234 {
            server.apply(service(&format!("svc-{i:04}"), json!({})));
        }
        let api = Api::<Service>::namespaced(client(&server).await, "default");
        let mut params = ListParams::default().limit(500);
        let (mut names, mut pages) = (BTreeSet::new(), 0);
        loop {
            let page = api.list(&params).await.expect("a page of Services");
            pages += 1;
            names.extend(page.items.iter().map(|service| service.name_any()));
            match page.metadata.continue_.filter(|token| !token.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        assert_eq!((pages, names.len()), (3, 1234));
        assert_eq!(server.requests("services", false), 3);
    }

    #[tokio::test]
    async fn set_based_label_selectors_are_rejected() {
        let server = ApiServer::start();
        let api = Api::<Service>::all(client(&server).await);
        let error = api
            .list(&ListParams::default().labels("tier in (web)"))
            .await
            .expect_err("`in` is not supported");
        assert!(
            matches!(&error, kube::Error::Api(status) if status.code == 400),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn watcher_follows_changes_and_label_selector_transitions() {
        let server = ApiServer::start();
        server.apply(service("plain", json!({})));
        server.apply(service("foreign", json!({PROXY_NAME: "other"})));
        let config = watcher::Config::default().labels(&format!("!{PROXY_NAME}"));
        let reader = reflect(client(&server).await, config, Arc::default());
        eventually("the initial list is reflected", || {
            names(&reader) == set(["plain"])
        })
        .await;

        server.apply(service("added", json!({})));
        eventually("ADDED arrives", || {
            names(&reader) == set(["added", "plain"])
        })
        .await;

        server.apply(service("plain", json!({"version": "2"})));
        let plain = ObjectRef::new("plain").within("default");
        eventually("MODIFIED arrives", || {
            reader
                .get(&plain)
                .is_some_and(|service| service.labels().get("version").is_some_and(|v| v == "2"))
        })
        .await;

        server.apply(service("added", json!({PROXY_NAME: "other"})));
        eventually("relabelled out: DELETED", || {
            names(&reader) == set(["plain"])
        })
        .await;

        server.apply(service("foreign", json!({})));
        eventually("relabelled in: ADDED", || {
            names(&reader) == set(["foreign", "plain"])
        })
        .await;

        assert!(server.delete("Service", Some("default"), "plain"));
        eventually("DELETED arrives", || names(&reader) == set(["foreign"])).await;
        assert_eq!(
            server.requests("services", false),
            1,
            "no relist was needed"
        );
    }

    #[tokio::test]
    async fn expired_history_makes_the_watcher_relist() {
        let server = ApiServer::start();
        server.apply(service("before", json!({})));
        let reader = reflect(
            client(&server).await,
            watcher::Config::default(),
            Arc::default(),
        );
        eventually("the list is reflected", || {
            names(&reader) == set(["before"])
        })
        .await;
        eventually("the watch is open", || server.open_watches() == 1).await;

        server.expire();
        server.delete("Service", None, "before");
        server.apply(service("after", json!({})));
        eventually("a relist shows the current state", || {
            server.requests("services", false) == 2 && names(&reader) == set(["after"])
        })
        .await;
    }

    #[tokio::test]
    async fn watch_from_a_compacted_version_gets_410_expired() {
        let server = ApiServer::start();
        server.apply_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b}\n",
        );
        let version = |name| {
            let object = server.get("Service", None, name).expect("stored");
            object["metadata"]["resourceVersion"]
                .as_str()
                .expect("a version")
                .to_string()
        };
        let (old, newest) = (version("a"), version("b"));
        server.expire();
        let api = Api::<Service>::namespaced(client(&server).await, "default");
        let events: Vec<_> = api
            .watch(&WatchParams::default(), &old)
            .await
            .expect("the watch starts")
            .collect()
            .await;
        match events.as_slice() {
            [Ok(WatchEvent::Error(status))] => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
                assert_eq!(
                    status.message,
                    format!("too old resource version: {old} ({newest})")
                );
            }
            other => panic!("expected one 410 ERROR, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn dropped_connections_make_the_watcher_watch_again() {
        let server = ApiServer::start();
        let reader = reflect(
            client(&server).await,
            watcher::Config::default(),
            Arc::default(),
        );
        eventually("the watch is open", || server.open_watches() == 1).await;

        server.drop_connections();
        eventually("a new watch", || server.requests("services", true) == 2).await;
        server.apply(service("late", json!({})));
        eventually("the new watch delivers", || names(&reader) == set(["late"])).await;
        assert_eq!(
            server.requests("services", false),
            1,
            "resumed without a relist"
        );
    }

    #[tokio::test]
    async fn streaming_list_watcher_gets_the_initial_state() {
        let server = ApiServer::start();
        server.apply(service("existing", json!({})));
        let config = watcher::Config::default().streaming_lists();
        let reader = reflect(client(&server).await, config, Arc::default());
        tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
            .await
            .expect("the initial events end in time")
            .expect("the reflector is ready");
        assert_eq!(names(&reader), set(["existing"]));
        server.apply(service("later", json!({})));
        eventually("a live event", || {
            names(&reader) == set(["existing", "later"])
        })
        .await;
        assert_eq!(server.requests("services", false), 0, "no LIST at all");
    }

    #[tokio::test]
    async fn watcher_recovers_after_a_restart() {
        let server = ApiServer::start();
        server.apply(service("kept", json!({})));
        server.apply(service("removed", json!({})));
        let errors = Arc::new(AtomicUsize::new(0));
        let reader = reflect(
            client(&server).await,
            watcher::Config::default(),
            errors.clone(),
        );
        eventually("the list is reflected", || {
            names(&reader) == set(["kept", "removed"])
        })
        .await;
        eventually("the watch is open", || server.open_watches() == 1).await;

        server.stop();
        assert!(server.delete("Service", None, "removed"));
        server.apply(service("added-while-down", json!({})));
        eventually("the watcher fails to reach the server", || {
            errors.load(Ordering::SeqCst) >= 1
        })
        .await;

        server.restart();
        eventually("changes made while down arrive", || {
            names(&reader) == set(["added-while-down", "kept"])
        })
        .await;
        assert_eq!(
            server.requests("services", false),
            1,
            "resumed from its resourceVersion"
        );
    }

    #[tokio::test]
    async fn recorder_events_are_created_then_patched() {
        let server = ApiServer::start();
        server.apply(service("web", json!({})));
        let client = client(&server).await;
        let web = Api::<Service>::namespaced(client.clone(), "default")
            .get("web")
            .await
            .expect("GET one Service");
        let recorder = Recorder::new(client, "weir".into());
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidPolicy".into(),
            note: Some("policy web: bad config".into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        for _ in 0..2 {
            recorder
                .publish(&event, &web.object_ref(&()))
                .await
                .expect("the event is written");
        }

        let events = server.events();
        assert_eq!(events.len(), 2, "{events:#?}");
        assert_eq!(events[0]["apiVersion"], "events.k8s.io/v1");
        assert_eq!(events[0]["reason"], "InvalidPolicy");
        assert_eq!(events[0]["note"], "policy web: bad config");
        assert_eq!(events[0]["regarding"]["name"], "web");
        assert_eq!(events[1]["metadata"]["name"], events[0]["metadata"]["name"]);
        assert_eq!(
            events[1]["series"]["count"], 2,
            "the repeat is a patch with a series"
        );
        let found = server.wait_for_event(
            |event| event["note"] == "policy web: bad config",
            Duration::from_secs(1),
        );
        assert!(found.is_some());
    }

    #[tokio::test]
    async fn core_v1_events_are_recorded_too() {
        let server = ApiServer::start();
        let client = client(&server).await;
        let event: CoreEvent = serde_json::from_value(json!({
            "metadata": {"name": "web.1"},
            "reason": "Started",
            "message": "hello",
            "involvedObject": {"kind": "Service", "namespace": "default", "name": "web"},
        }))
        .expect("a core v1 Event");
        let created = Api::<CoreEvent>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &event)
            .await
            .expect("the Event is created");
        assert!(created.metadata.uid.is_some());
        let recorded = server.wait_for_event(
            |event| event["apiVersion"] == "v1" && event["reason"] == "Started",
            Duration::from_secs(1),
        );
        assert_eq!(recorded.expect("recorded")["message"], "hello");
        let version = client.apiserver_version().await.expect("GET /version");
        assert_eq!(version.minor, "34");
    }
}
