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
use serde::Serialize;
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
        let documents = crate::yaml::documents(yaml)
            .unwrap_or_else(|e| panic!("apply_yaml: invalid YAML: {e}"));
        for object in documents {
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

mod handlers;
mod selector;
mod store;
#[cfg(test)]
mod tests;

use handlers::*;
use selector::*;
use store::*;
