//! L4 UDP: flows. The first datagram from a client address and port to a Service address
//! opens a flow: the policy picks its endpoint (through the same decision path as a TCP
//! connection), and weir opens a socket connected to that endpoint for it. The flow's
//! later datagrams go to the same endpoint; replies return to the client from the
//! Service address it sent to (the listener's own socket). A flow ends after an idle
//! timeout, as a conntrack entry does: `proxy.udp_timeout` (30 s) until traffic has gone
//! both ways more than once, then `proxy.udp_stream_timeout` (120 s); a Service sets its
//! own with `weir.dev/udp-timeout`.
//!
//! Flows never stick to a dead pod (kube-proxy's stale-flow rules):
//! - an endpoint that stops being eligible (removed, not ready, moved by the policy's
//!   eligibility) ends its flows within half a second, and at once on the flow's next
//!   datagram: that datagram opens a new flow to an endpoint that serves;
//! - an endpoint that answers ICMP port unreachable ends its flow the same way, and the
//!   policy is told (`connect-failed`);
//! - a Service with nothing eligible has no listener, so the kernel answers ICMP port
//!   unreachable (the client sees ECONNREFUSED); when endpoints return the listener
//!   opens again, and a client that kept its socket is served at its next datagram;
//! - a policy swap keeps every flow whose endpoint the new version still lets serve.
//!
//! Datagrams up to 64 KiB pass whole. Flows are capped per node and per Service port;
//! at a cap the oldest flow that never became a stream is evicted (as conntrack
//! evicts when its table is full), and if there is none the datagram is dropped and
//! counted. A flow costs a socket (one file descriptor), a task and an entry here.

pub mod saved;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use weir_sdk::EndpointId;

use super::decide::{self, Decision, Next, Refusal};
use super::{EndpointMetrics, Listen, Route, Shared, Transport};
use crate::metrics::udp::{Dropped, Ended};
pub use crate::metrics::udp::{EndpointUdp, UdpMetrics};

/// The largest UDP payload is 65,507 bytes over IPv4 and 65,527 over IPv6.
const DATAGRAM: usize = 64 << 10;
/// How often idle and stale flows are looked for.
const SWEEP: Duration = Duration::from_millis(250);

thread_local! {
    /// One receive buffer per data-plane thread for the replies of every flow: a flow
    /// holds no buffer of its own.
    static REPLY: RefCell<Vec<u8>> = RefCell::new(vec![0; DATAGRAM]);
}

/// Binds a UDP listener's socket.
pub fn bind(address: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::DGRAM, None)?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    Ok(socket.into())
}

/// What a flow's reply task shares with the listener that owns the flow.
struct Activity {
    /// Milliseconds since the listener started, at the flow's last datagram either way.
    last: AtomicU64,
    /// Whether the endpoint has answered.
    replied: AtomicBool,
    /// Set when the endpoint answered ICMP port unreachable.
    refused: AtomicBool,
}

/// One client's flow to one endpoint.
struct Flow {
    /// Tells this flow from an earlier one of the same client.
    id: u64,
    decision: Decision,
    endpoint: EndpointId,
    target: SocketAddr,
    upstream: Arc<UdpSocket>,
    activity: Arc<Activity>,
    replies: AbortHandle,
    /// Traffic went both ways, then the client sent again.
    stream: bool,
    opened: Instant,
    metrics: Arc<EndpointMetrics>,
}

/// One listener's flows, owned by its task.
struct Flows {
    listen: Listen,
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    started: Instant,
    by_client: HashMap<SocketAddr, Flow>,
    /// Flows in the order they opened, for eviction at a cap (see [`Flows::evict`]).
    unassured: VecDeque<(SocketAddr, u64)>,
    next_id: u64,
}

/// Serves one UDP listener until `stop` is cancelled; its flows end with it.
pub async fn serve(
    socket: UdpSocket,
    address: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut flows = Flows {
        listen: Listen {
            address,
            transport: Transport::Udp,
        },
        socket: Arc::new(socket),
        shared,
        started: Instant::now(),
        by_client: HashMap::new(),
        unassured: VecDeque::new(),
        next_id: 0,
    };
    let mut buffer = vec![0u8; DATAGRAM];
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = flows.socket.recv_from(&mut buffer) => match received {
                Ok((length, client)) => flows.datagram(&buffer[..length], client),
                Err(error) => {
                    // An ICMP error for an earlier reply, or out of memory: not fatal.
                    tracing::debug!(%address, "UDP receive failed: {error}");
                }
            },
            _ = sweep.tick() => flows.sweep(),
            () = stop.cancelled() => break,
        }
    }
    // At shutdown, the next weir takes the flows over.
    flows.shared.udp_saved.keep(
        flows
            .by_client
            .iter()
            .map(|(client, flow)| saved::SavedFlow {
                service: address,
                client: *client,
                endpoint: flow.target,
            }),
    );
    let clients: Vec<SocketAddr> = flows.by_client.keys().copied().collect();
    for client in clients {
        flows.end(client, Ended::closed);
    }
}

impl Flows {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The route of this listener now (or, while it closes, the one it had).
    fn route(&self) -> Option<Arc<Route>> {
        let shared = &self.shared;
        (shared.routes.load().by_listen.get(&self.listen).cloned())
            .or_else(|| shared.retired.load().get(&self.listen).cloned())
    }

    fn datagram(&mut self, payload: &[u8], client: SocketAddr) {
        let Some(route) = self.route() else {
            tracing::debug!(listen = %self.listen, "no route for a datagram");
            return;
        };
        // A refusal seen on this send (the kernel reports an endpoint's ICMP error on the
        // socket's next call) moves the datagram to another endpoint, once.
        for _ in 0..2 {
            match self.forward(payload, client, &route) {
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                    if let Some(flow) = self.by_client.get(&client) {
                        flow.activity.refused.store(true, Ordering::Relaxed);
                    }
                }
                Err(error) => {
                    tracing::debug!(%client, "UDP send failed: {error}");
                    let metrics = &route.metrics;
                    (metrics.family().udp).drop(metrics.service(), Dropped::send_failed);
                    return;
                }
                Ok(()) => return,
            }
        }
    }

    /// Sends a client's datagram on its flow, opening one (or another, when its endpoint
    /// refused or left) as needed. A datagram the flow cannot take is counted as dropped
    /// where it is refused, and is `Ok`.
    fn forward(
        &mut self,
        payload: &[u8],
        client: SocketAddr,
        route: &Arc<Route>,
    ) -> std::io::Result<()> {
        // The endpoint a new flow should not be sent back to.
        let mut avoid = None;
        if let Some(flow) = self.by_client.get(&client) {
            if flow.activity.refused.load(Ordering::Relaxed) {
                avoid = Some((flow.endpoint, flow.target));
                self.end(client, Ended::endpoint_refused);
            } else if !Arc::ptr_eq(flow.decision.route(), route)
                && !(flow.decision).still_serves(route, flow.endpoint, flow.target)
            {
                self.end(client, Ended::endpoint_gone);
            }
        }
        if !self.by_client.contains_key(&client) && !self.open(client, route, avoid) {
            return Ok(());
        }
        let now = self.now();
        let flow = (self.by_client.get_mut(&client)).expect("present or just opened");
        flow.activity.last.store(now, Ordering::Relaxed);
        if !flow.stream && flow.activity.replied.load(Ordering::Relaxed) {
            flow.stream = true;
        }
        send(&flow.upstream, payload)?;
        flow.metrics.udp().to_endpoint.inc();
        flow.metrics.to_endpoint.inc_by(payload.len() as u64);
        Ok(())
    }

    /// Opens a flow for `client` on `route`, on another endpoint than `avoid` (one that
    /// just refused this client) when there is one. Returns whether it opened.
    fn open(
        &mut self,
        client: SocketAddr,
        route: &Arc<Route>,
        avoid: Option<(EndpointId, SocketAddr)>,
    ) -> bool {
        let udp_metrics = &route.metrics.family().udp;
        let service = route.metrics.service();
        let (max_flows, max_per_service) = {
            let settings = &self.shared.settings.udp;
            (settings.max_flows, settings.max_flows_per_service)
        };
        let mut decision = match decide::admit(route, &self.shared, client, self.listen.address) {
            Ok(decision) => decision,
            Err(Refusal::SourceRange) => {
                udp_metrics.drop(service, Dropped::source_range);
                return false;
            }
            Err(Refusal::NoPolicy) => {
                udp_metrics.drop(service, Dropped::refused);
                return false;
            }
        };
        // Caps: room is made by evicting the oldest flow that is not a stream.
        if route.metrics.udp_flows.load(Ordering::Relaxed) >= max_per_service
            && !self.evict(Some(route))
        {
            udp_metrics.drop(service, Dropped::service_flow_cap);
            return false;
        }
        if self.shared.udp_flows.load(Ordering::Relaxed) >= max_flows && !self.evict(None) {
            udp_metrics.drop(service, Dropped::node_flow_cap);
            return false;
        }
        if let Some((endpoint, target)) = avoid {
            decision.avoid(endpoint, target);
        }
        // A flow the previous weir had goes back to its endpoint, if it still serves.
        let resumed = (self.shared.udp_saved.claim(&self.listen, client))
            .and_then(|address| decision.resume(address));
        let next = match resumed {
            Some((endpoint, address)) => Next::Forward { endpoint, address },
            None => decision.next_step(),
        };
        let (endpoint, target) = match next {
            Next::Forward { endpoint, address } => (endpoint, address),
            Next::Reject | Next::Drop | Next::GiveUp => {
                udp_metrics.drop(service, Dropped::refused);
                return false;
            }
        };
        let transparent = route.transparent
            && self.shared.transparent.load(Ordering::Relaxed)
            && route.local_endpoints.contains(&target)
            && client.is_ipv4() == target.is_ipv4()
            && !client.ip().is_loopback();
        let upstream = match connect(target, transparent.then_some(client)) {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                tracing::debug!(endpoint = %target, "cannot open a UDP socket: {error}");
                udp_metrics.drop(service, Dropped::socket_error);
                decision.unreachable(endpoint, target, Duration::ZERO);
                return false;
            }
        };
        decision.connected(endpoint, Duration::ZERO);
        let metrics = route.metrics.endpoint(target);
        let udp = metrics.udp();
        udp.opened.inc();
        udp.active.inc();
        route.metrics.udp_flows.fetch_add(1, Ordering::Relaxed);
        self.shared.udp_flows.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            last: AtomicU64::new(self.now()),
            replied: AtomicBool::new(false),
            refused: AtomicBool::new(false),
        });
        let replies = tokio::spawn(replies(
            upstream.clone(),
            self.socket.clone(),
            client,
            activity.clone(),
            metrics.clone(),
            self.started,
        ))
        .abort_handle();
        let id = self.next_id;
        self.next_id += 1;
        self.by_client.insert(
            client,
            Flow {
                decision,
                endpoint,
                target,
                upstream,
                activity,
                replies,
                id,
                stream: false,
                opened: Instant::now(),
                metrics,
            },
        );
        self.queue(client, id);
        true
    }

    /// Evicts the oldest flow that is not a stream (of `route`'s Service port, if given),
    /// in constant time amortised: the queue holds flows in the order they opened, and
    /// entries of flows that ended or became streams are skipped as they come up.
    /// Returns whether one was.
    fn evict(&mut self, route: Option<&Arc<Route>>) -> bool {
        while let Some((client, id)) = self.unassured.pop_front() {
            let Some(flow) = self.by_client.get(&client) else {
                continue;
            };
            if flow.id != id || flow.stream {
                continue;
            }
            if route.is_some_and(|r| !Arc::ptr_eq(&flow.decision.route().metrics, &r.metrics)) {
                // Another Service port's flow (the address changed hands): it still ends
                // by its idle timeout.
                continue;
            }
            self.end(client, Ended::evicted);
            return true;
        }
        false
    }

    /// Notes a new flow as an eviction candidate; entries of flows gone are dropped once
    /// they outnumber the flows.
    fn queue(&mut self, client: SocketAddr, id: u64) {
        self.unassured.push_back((client, id));
        if self.unassured.len() > 2 * self.by_client.len() + 64 {
            let by_client = &self.by_client;
            self.unassured.retain(|(client, id)| {
                by_client
                    .get(client)
                    .is_some_and(|flow| flow.id == *id && !flow.stream)
            });
        }
    }

    /// Ends flows that were idle for their timeout, whose endpoint refused, or whose
    /// endpoint no longer serves them.
    fn sweep(&mut self) {
        if self.by_client.is_empty() {
            return;
        }
        let now = self.now();
        let route = self.route();
        let settings = &self.shared.settings.udp;
        let mut ended = Vec::new();
        for (client, flow) in &self.by_client {
            let timeout = match (flow.decision.route().udp_timeout, flow.stream) {
                (Some(timeout), _) => timeout,
                (None, true) => settings.stream_timeout,
                (None, false) => settings.timeout,
            };
            let idle = now.saturating_sub(flow.activity.last.load(Ordering::Relaxed));
            let reason = if flow.activity.refused.load(Ordering::Relaxed) {
                Some(Ended::endpoint_refused)
            } else if idle >= timeout.as_millis() as u64 {
                Some(Ended::idle)
            } else {
                match &route {
                    Some(route) if Arc::ptr_eq(flow.decision.route(), route) => None,
                    Some(route)
                        if flow
                            .decision
                            .still_serves(route, flow.endpoint, flow.target) =>
                    {
                        None
                    }
                    _ => Some(Ended::endpoint_gone),
                }
            };
            if let Some(reason) = reason {
                ended.push((*client, reason));
            }
        }
        for (client, reason) in ended {
            self.end(client, reason);
        }
    }

    fn end(&mut self, client: SocketAddr, reason: Ended) {
        let Some(flow) = self.by_client.remove(&client) else {
            return;
        };
        flow.replies.abort();
        let udp = flow.metrics.udp();
        udp.active.dec();
        udp.ended(reason.clone());
        let route = flow.decision.route();
        route.metrics.udp_flows.fetch_sub(1, Ordering::Relaxed);
        self.shared.udp_flows.fetch_sub(1, Ordering::Relaxed);
        let lasted = flow.opened.elapsed();
        let decision = flow.decision;
        match reason {
            Ended::endpoint_refused => decision.refused(flow.endpoint, flow.target, lasted),
            _ => decision.closed(flow.endpoint, lasted),
        }
    }
}

/// A socket of its own for a flow, connected to its endpoint: the kernel then delivers
/// only that endpoint's replies to it, and its ICMP errors. With `client`, the socket
/// takes the client's address (`proxy.transparent`), so the endpoint sees who sent; if
/// that is refused, weir's own address.
fn connect(target: SocketAddr, client: Option<SocketAddr>) -> std::io::Result<UdpSocket> {
    if let Some(client) = client {
        match connect_transparent(target, client) {
            Ok(socket) => return Ok(socket),
            Err(error) => tracing::debug!(%client, "a transparent UDP socket was refused: {error}"),
        }
    }
    let local: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(target)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

fn connect_transparent(target: SocketAddr, client: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(target), Type::DGRAM, None)?;
    if target.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if let Err(error) = socket.bind(&client.into()) {
        if error.kind() != std::io::ErrorKind::AddrInUse {
            return Err(error);
        }
        socket.bind(&SocketAddr::new(client.ip(), 0).into())?;
    }
    socket.connect(&target.into())?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// Sends at once, or fails with `WouldBlock`: without waiting for tokio to learn the
/// socket is writable, which a flow's new socket is, and which a full socket should
/// not hold up (UDP may drop).
fn send(socket: &UdpSocket, payload: &[u8]) -> std::io::Result<usize> {
    socket2::SockRef::from(socket).send(payload)
}

fn send_to(socket: &UdpSocket, payload: &[u8], to: SocketAddr) -> std::io::Result<usize> {
    socket2::SockRef::from(socket).send_to(payload, &to.into())
}

/// Passes a flow's replies to its client, from the Service address, until aborted.
async fn replies(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    activity: Arc<Activity>,
    metrics: Arc<EndpointMetrics>,
    started: Instant,
) {
    loop {
        if upstream.readable().await.is_err() {
            return;
        }
        // Read and pass on without awaiting, so the buffer is the thread's, not the flow's.
        let refused = REPLY.with_borrow_mut(|buffer| {
            loop {
                match upstream.try_recv(buffer) {
                    Ok(length) => {
                        activity
                            .last
                            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                        activity.replied.store(true, Ordering::Relaxed);
                        if send_to(&listener, &buffer[..length], client).is_ok() {
                            metrics.udp().to_client.inc();
                            metrics.to_client.inc_by(length as u64);
                        }
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return false,
                    Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                        return true;
                    }
                    Err(error) => {
                        tracing::debug!(%client, "UDP reply receive failed: {error}");
                        return false;
                    }
                }
            }
        });
        if refused {
            activity.refused.store(true, Ordering::Relaxed);
            return;
        }
    }
}
