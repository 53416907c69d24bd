//! The data plane: one listening socket per service address, the routing table every new
//! connection reads, and the listeners' life cycle.
//!
//! The control plane publishes a new [`Routes`] (an `ArcSwap`) after every change and
//! reconciles the set of listeners. A connection reads the table once, when it is
//! accepted; nothing that happens afterwards (a swap, a port change, a listener closing)
//! touches an established connection.

mod coalesce;
mod copy;
pub mod decide;
mod ending;
mod h1;
mod h2;
pub mod http;
pub mod proxy_protocol;
mod route_metrics;
mod sniff;
pub mod tcp;
pub mod udp;
mod upstream;
mod workers;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weir_sdk::{Scope, ServiceHandle};

use crate::metrics::{ListenerLabels, ProxyMetrics};
use crate::net::Cidr;
use crate::policy::PolicyRuntime;
pub use route_metrics::{EndpointMetrics, RouteMetrics};

/// Where one listening address sends its connections.
pub struct Route {
    pub handle: ServiceHandle,
    /// `None`: the Service's policy is unavailable and its failure mode is closed.
    pub policy: Option<Arc<PolicyRuntime>>,
    /// Internal for the clusterIP, external for nodePorts, externalIPs and LB IPs.
    pub scope: Scope,
    /// externalTrafficPolicy Local: traffic from this node or its pods to an external
    /// address uses the internal endpoints instead (kube-proxy sends it to the Cluster
    /// endpoints; the two differ only when internalTrafficPolicy is Local too).
    pub local_sources_use_cluster: bool,
    /// For LoadBalancer IPs: the sources allowed (empty: all).
    pub source_ranges: Vec<crate::net::Cidr>,
    /// UDP: how long a flow may be idle (`weir.dev/udp-timeout`; `None`: the node's).
    pub udp_timeout: Option<Duration>,
    /// TCP: how long a connection may be idle (`weir.dev/idle-timeout`; `None`: the
    /// node's `proxy.idle_timeout`).
    pub idle_timeout: Option<Duration>,
    /// The PROXY protocol header written towards endpoints (`weir.dev/proxy-protocol`).
    pub proxy_protocol: Option<proxy_protocol::Version>,
    /// Whether connections here begin with a PROXY protocol header from a load balancer.
    pub accept_proxy_protocol: bool,
    /// Whether externalTrafficPolicy Local keeps this route's traffic on this node: its
    /// connections to [`local_endpoints`](Route::local_endpoints) may come from the
    /// client's address (`proxy.transparent`).
    pub transparent: bool,
    /// The endpoints on this node.
    pub local_endpoints: Arc<HashSet<SocketAddr>>,
    /// An HTTP port: each request is decided (`http.rs`). None: L4.
    pub http: Option<http::HttpKind>,
    /// HTTP: requests to endpoints carry `X-Forwarded-For` (`weir.dev/x-forwarded-for`).
    pub forwarded_for: bool,
    pub metrics: Arc<RouteMetrics>,
}

/// The transport a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Udp,
}

/// What one listener is: a transport on an address. 53/TCP and 53/UDP on one address are
/// two listeners, with a route each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Listen {
    pub address: SocketAddr,
    pub transport: Transport,
}

impl Listen {
    pub fn tcp(address: SocketAddr) -> Self {
        Listen {
            address,
            transport: Transport::Tcp,
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let transport = match self.transport {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        };
        write!(f, "{}/{transport}", self.address)
    }
}

/// The routing table: listener to route.
#[derive(Default)]
pub struct Routes {
    pub by_listen: RouteMap,
}

/// Routes by listener, looked up for every connection and request (with a hash faster
/// than the default's; the listeners are the node's own).
pub type RouteMap = HashMap<Listen, Arc<Route>, foldhash::fast::RandomState>;

/// Data-plane settings from `[proxy]` and `[node]`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub workers: usize,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub drop_timeout: Duration,
    pub udp: UdpSettings,
    pub tcp: TcpSettings,
}

/// TCP connections: caps and timeouts (`[proxy]`).
#[derive(Clone, Debug)]
pub struct TcpSettings {
    /// Connections at once on this node.
    pub max_connections: usize,
    /// Connections at once per service port (0: no cap of its own).
    pub max_per_service: usize,
    /// No bytes either way for this long closes a connection (a Service's
    /// `weir.dev/idle-timeout` wins).
    pub idle_timeout: Option<Duration>,
    /// No bytes for this long once one side has closed ends the connection.
    pub half_close_timeout: Duration,
}

impl Default for TcpSettings {
    fn default() -> Self {
        TcpSettings {
            max_connections: 65_536,
            max_per_service: 0,
            idle_timeout: None,
            half_close_timeout: Duration::from_secs(60),
        }
    }
}

/// UDP flows: idle timeouts and caps (`[proxy]`).
#[derive(Clone, Debug)]
pub struct UdpSettings {
    pub timeout: Duration,
    pub stream_timeout: Duration,
    pub max_flows: usize,
    pub max_flows_per_service: usize,
}

impl Default for UdpSettings {
    fn default() -> Self {
        UdpSettings {
            timeout: Duration::from_secs(30),
            stream_timeout: Duration::from_secs(120),
            max_flows: 16_384,
            max_flows_per_service: 4_096,
        }
    }
}

/// What the data plane's tasks share.
pub struct Shared {
    pub routes: ArcSwap<Routes>,
    /// Routes of addresses the control plane moved away recently: for connections their
    /// listener accepted, or had in its backlog, before it closed.
    pub retired: ArcSwap<RouteMap>,
    pub settings: Settings,
    /// Sources that are this node or its pods: their external traffic is internal. Set by
    /// the control plane (in Kubernetes mode they follow the Node object).
    pub local_sources: ArcSwap<Vec<Cidr>>,
    /// Every connection task, for the drain on shutdown.
    pub connections: TaskTracker,
    /// The threads TCP connections run on.
    pub(crate) workers: workers::Workers,
    /// One permit per TCP connection the node may hold (`proxy.max_connections`).
    pub tcp_slots: Arc<tokio::sync::Semaphore>,
    /// Whether connections to local endpoints may take the client's address: the policy
    /// routing is in place, and no connect has been refused the capability.
    pub transparent: std::sync::atomic::AtomicBool,
    /// Cancelled at the end of the shutdown grace period: closes established connections.
    pub close: CancellationToken,
    /// UDP flows open now on this node, against `proxy.max_udp_flows`.
    pub udp_flows: std::sync::atomic::AtomicUsize,
    /// Every UDP listener's task: at shutdown they hand their flows over, and are waited
    /// for before the flows are written.
    pub udp_listeners: TaskTracker,
    /// UDP flows across a restart (`proxy.state_dir`).
    pub udp_saved: udp::saved::Saved,
}

impl Shared {
    /// Starts the data plane's worker threads too.
    pub fn new(settings: Settings) -> std::io::Result<Self> {
        let workers = workers::Workers::start(settings.workers)?;
        let tcp_slots = Arc::new(tokio::sync::Semaphore::new(
            (settings.tcp.max_connections).min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        Ok(Shared {
            routes: ArcSwap::from_pointee(Routes::default()),
            retired: ArcSwap::from_pointee(RouteMap::default()),
            settings,
            local_sources: ArcSwap::from_pointee(Vec::new()),
            connections: TaskTracker::new(),
            workers,
            tcp_slots,
            transparent: Default::default(),
            close: CancellationToken::new(),
            udp_flows: Default::default(),
            udp_listeners: TaskTracker::new(),
            udp_saved: Default::default(),
        })
    }

    /// The route of a TCP connection accepted on `address`: the current one, or, when
    /// the control plane has just moved the address away and the listener is closing,
    /// the one it was accepted under.
    pub fn tcp_route(&self, address: SocketAddr) -> Option<Arc<Route>> {
        let listen = Listen::tcp(address);
        (self.routes.load().by_listen.get(&listen).cloned())
            .or_else(|| self.retired.load().get(&listen).cloned())
    }

    fn is_local_source(&self, ip: IpAddr) -> bool {
        self.local_sources.load().iter().any(|c| c.contains(ip))
    }
}

/// What a listening address serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// Service traffic, routed by [`Routes`].
    Service,
    /// A Service's healthCheckNodePort (`namespace`, `name`).
    HealthCheck { namespace: String, name: String },
}

impl ListenerKind {
    fn label(&self) -> &'static str {
        match self {
            ListenerKind::Service => "service",
            ListenerKind::HealthCheck { .. } => "health_check",
        }
    }
}

/// A bound socket, ready to serve.
pub enum Bound {
    Tcp(tokio::net::TcpListener),
    Udp(tokio::net::UdpSocket),
}

/// Starts the task serving one listener; it ends when the token is cancelled.
pub type Spawner = Box<dyn Fn(Bound, Listen, ListenerKind, CancellationToken) + Send + Sync>;

/// The listening sockets, reconciled against what the model asks for.
pub struct Listeners {
    runtime: tokio::runtime::Handle,
    spawn: Spawner,
    metrics: Arc<ProxyMetrics>,
    /// Parent of every listener's token: cancelled to stop accepting everywhere.
    stop: CancellationToken,
    open: HashMap<Listen, (ListenerKind, CancellationToken)>,
    /// Listeners that could not be bound, with when to try again and the last error.
    failed: HashMap<Listen, (Instant, String)>,
}

/// How long a listener that failed to bind waits before it is tried again.
const BIND_RETRY: Duration = Duration::from_secs(2);

impl Listeners {
    pub fn new(
        runtime: tokio::runtime::Handle,
        spawn: Spawner,
        metrics: Arc<ProxyMetrics>,
        stop: CancellationToken,
    ) -> Self {
        Listeners {
            runtime,
            spawn,
            metrics,
            stop,
            open: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    /// Opens what is wanted and not open, closes what is open and not wanted. Returns the
    /// addresses that could not be opened now, each with the reason; they are tried again
    /// by a later call once their retry time has come.
    pub fn reconcile(&mut self, wanted: &BTreeMap<Listen, ListenerKind>) -> Vec<String> {
        let mut errors = Vec::new();
        self.open.retain(|address, (kind, token)| {
            let keep = wanted.get(address) == Some(kind);
            if !keep {
                token.cancel();
            }
            keep
        });
        self.failed
            .retain(|address, _| wanted.contains_key(address));
        if self.stop.is_cancelled() {
            return errors;
        }
        for (listen, kind) in wanted {
            if self.open.contains_key(listen) {
                continue;
            }
            if let Some((retry, _)) = self.failed.get(listen)
                && Instant::now() < *retry
            {
                continue;
            }
            // Binding makes tokio sockets and spawning starts tasks: both in weir's runtime,
            // whichever thread reconciles.
            let _guard = self.runtime.enter();
            match bind(*listen) {
                Ok(bound) => {
                    let token = self.stop.child_token();
                    (self.spawn)(bound, *listen, kind.clone(), token.clone());
                    self.open.insert(*listen, (kind.clone(), token));
                    if self.failed.remove(listen).is_some() {
                        tracing::info!(%listen, "listening now");
                    }
                }
                Err(e) => {
                    self.metrics
                        .listener_errors
                        .get_or_create(&ListenerLabels { kind: kind.label() })
                        .inc();
                    let message = format!(
                        "cannot listen on {listen} ({}): {e}{}",
                        kind.label(),
                        bind_hint(&e)
                    );
                    let repeated = self.failed.get(listen).is_some_and(|(_, m)| *m == message);
                    if !repeated {
                        errors.push(message.clone());
                    }
                    self.failed
                        .insert(*listen, (Instant::now() + BIND_RETRY, message));
                }
            }
        }
        for kind in ["service", "health_check"] {
            let count = self
                .open
                .values()
                .filter(|(k, _)| k.label() == kind)
                .count();
            self.metrics
                .listeners
                .get_or_create(&ListenerLabels { kind })
                .set(count as i64);
        }
        errors
    }

    /// Whether some wanted listener is waiting for a retry.
    pub fn has_failed(&self) -> bool {
        !self.failed.is_empty()
    }

    /// The listeners open now.
    pub fn listening(&self) -> Vec<Listen> {
        let mut out: Vec<_> = self.open.keys().copied().collect();
        out.sort();
        out
    }

    /// Stops accepting on every listener.
    pub fn close_all(&mut self) {
        self.stop.cancel();
        self.open.clear();
    }
}

fn bind_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::AddrNotAvailable => {
            "; the address is not on this host (in file mode use 127.0.0.0/8 addresses, which need no set-up)"
        }
        std::io::ErrorKind::AddrInUse => "; another process or Service port uses it",
        std::io::ErrorKind::PermissionDenied => "; ports below 1024 need CAP_NET_BIND_SERVICE",
        _ => "",
    }
}

/// Binds a listener's socket; call inside the runtime that will serve it.
fn bind(listen: Listen) -> std::io::Result<Bound> {
    match listen.transport {
        Transport::Tcp => {
            tokio::net::TcpListener::from_std(bind_tcp(listen.address)?).map(Bound::Tcp)
        }
        Transport::Udp => {
            tokio::net::UdpSocket::from_std(udp::bind(listen.address)?).map(Bound::Udp)
        }
    }
}

fn bind_tcp(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    // A port moving back to an address it left must not wait for TIME_WAIT to expire.
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Accepted connections inherit it: one system call fewer per connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        let listener =
            tokio::net::TcpListener::from_std(bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap())
                .unwrap();
        let address = listener.local_addr().unwrap();
        let (accepted, _client) =
            tokio::join!(listener.accept(), tokio::net::TcpStream::connect(address));
        assert!(accepted.unwrap().0.nodelay().unwrap());
    }
}
