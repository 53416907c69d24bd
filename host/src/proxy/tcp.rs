//! L4 TCP: accept, ask the policy, connect, copy both ways until both sides close.
//!
//! What userspace can and cannot do, compared with kube-proxy's packet rules:
//! - `reject` with nothing eligible at all: the listener is not opened, so the kernel
//!   refuses the SYN ("connection refused"), as kube-proxy's REJECT does. A `reject` decided
//!   per connection comes after the handshake: the connection is reset (RST), which the
//!   client sees as "connection reset".
//! - `drop`: the kernel completes the handshake before weir sees the connection, so the
//!   client's connect succeeds; weir then sends nothing, and closes the connection (RST)
//!   after the client's first bytes or after `proxy.drop_timeout`.
//! - Source addresses: endpoints see weir's address, unless `proxy.transparent` (local
//!   endpoints behind externalTrafficPolicy Local) or `weir.dev/proxy-protocol` says who.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

mod limits;

use super::copy::{Ended, Timeouts};
use super::decide::{self, Next, Refusal};
use super::proxy_protocol::{self, Header, Transport};
use super::{Route, Shared};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Bytes buffered per direction of a connection: small requests and responses fit in
/// one read, and a connection costs 32 KiB, not more.
const BUFFER: usize = 16 << 10;

/// Accepts connections on one listener, within the connection caps, until `stop` is
/// cancelled, then serves the connections still waiting in its backlog before it closes.
pub async fn serve(
    listener: TcpListener,
    address: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let Some(slot) = limits::room(&shared, address, &stop).await else {
            break;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, client)) => {
                start(&shared, stream, client, address, stop.clone(), Some(slot));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                limits::accept_failed(address, &error);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    // The kernel completed these handshakes: closing the socket now would reset them,
    // and their clients saw their connect succeed.
    let Ok(listener) = listener.into_std() else {
        return;
    };
    while let Ok((stream, client)) = listener.accept() {
        let Ok(stream) = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream))
        else {
            continue;
        };
        // Served as accepted, until the grace period ends.
        start(
            &shared,
            stream,
            client,
            address,
            CancellationToken::new(),
            None,
        );
    }
}

/// Serves an accepted connection: an L4 one on this runtime, where it was accepted (a
/// hand-over between threads would cost more than its copy loop saves); an HTTP one on
/// the next worker loop, registered with that loop's own poller, so that its streams and
/// its pooled connections to endpoints wake one thread only.
fn start(
    shared: &Arc<Shared>,
    stream: TcpStream,
    client: SocketAddr,
    address: SocketAddr,
    stop: CancellationToken,
    slot: Option<limits::Slot>,
) {
    let route = shared.tcp_route(address);
    let task_shared = shared.clone();
    if route.as_ref().is_none_or(|r| r.http.is_none()) {
        shared.connections.spawn(async move {
            connection(stream, client, address, route, task_shared, stop).await;
            drop(slot);
        });
        return;
    }
    let Ok(stream) = stream.into_std() else {
        return;
    };
    shared
        .workers
        .spawn(shared.connections.track_future(async move {
            if let Ok(stream) = TcpStream::from_std(stream) {
                connection(stream, client, address, route, task_shared, stop).await;
            }
            drop(slot);
        }));
}

async fn connection(
    mut client: TcpStream,
    mut peer: SocketAddr,
    address: SocketAddr,
    route: Option<Arc<Route>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let Some(route) = route else {
        // The listener is closing as this connection arrived.
        reset(client);
        return;
    };
    if route.accept_proxy_protocol {
        // The load balancer in front says who the client is; everything after (source
        // ranges, the policy, the endpoint's PROXY header) goes by that client.
        match proxy_protocol::read(&mut client).await {
            Ok(Header::Proxied {
                client: original, ..
            }) => peer = original,
            Ok(Header::Local) => {}
            Err(error) => {
                route.metrics.proxy_protocol_refused.inc();
                tracing::debug!(%peer, %address, "refused: {error}");
                return reset(client);
            }
        }
    }
    if route.http.is_some() {
        // Each request is decided on its own, against the route as it is then.
        return super::http::connection(client, peer, address, shared, stop).await;
    }
    let mut decision = match decide::admit(&route, &shared, peer, address) {
        Ok(decision) => decision,
        Err(Refusal::SourceRange) => return drop_connection(client, &shared).await,
        Err(Refusal::NoPolicy) => return reset(client),
    };
    loop {
        let (endpoint, target) = match decision.next_step() {
            Next::Forward { endpoint, address } => (endpoint, address),
            Next::Reject | Next::GiveUp => return reset(client),
            Next::Drop => return drop_connection(client, &shared).await,
        };
        let connecting = decision.decided_at();
        let connected = tokio::time::timeout(
            shared.settings.connect_timeout,
            connect(&route, &shared, peer, target),
        )
        .await;
        let took = connecting.elapsed();
        let connected = match (connected, route.proxy_protocol) {
            (Ok(Ok(mut upstream)), Some(version)) => {
                // The endpoint learns the client first: the header, then the bytes.
                let header = proxy_protocol::encode(version, Transport::Stream, peer, address);
                match upstream.write_all(&header).await {
                    Ok(()) => Ok(Ok(upstream)),
                    Err(error) => Ok(Err(error)),
                }
            }
            (connected, _) => connected,
        };
        match connected {
            Ok(Ok(upstream)) => {
                decision.connected(endpoint, took);
                let lifetime = Instant::now();
                splice(client, upstream, target, &route, &shared).await;
                decision.closed(endpoint, lifetime.elapsed());
                return;
            }
            Ok(Err(error)) => tracing::debug!(%target, "connect failed: {error}"),
            Err(_) => tracing::debug!(%target, "connect timed out"),
        }
        decision.unreachable(endpoint, target, took);
    }
}

/// Connects to `target`: from the client's own address when the route keeps its traffic
/// on this node and the endpoint is here (`proxy.transparent`), else from weir's.
async fn connect(
    route: &Route,
    shared: &Shared,
    client: SocketAddr,
    target: SocketAddr,
) -> std::io::Result<TcpStream> {
    use std::sync::atomic::Ordering;
    let transparent = route.transparent
        && shared.transparent.load(Ordering::Relaxed)
        && route.local_endpoints.contains(&target)
        && client.is_ipv4() == target.is_ipv4()
        && !client.ip().is_loopback();
    if transparent {
        match crate::transparent::connect(client, target).await {
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                if shared.transparent.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "proxy.transparent: {error} (IP_TRANSPARENT needs CAP_NET_ADMIN); endpoints see weir's address instead"
                    );
                }
            }
            result => return result,
        }
    }
    TcpStream::connect(target).await
}

/// Copies both ways until both sides have closed; a half-close on one side is passed on
/// to the other. Ends early, resetting both, when the shutdown grace period runs out.
async fn splice(
    mut client: TcpStream,
    mut upstream: TcpStream,
    target: SocketAddr,
    route: &Route,
    shared: &Shared,
) {
    // The client's socket inherits TCP_NODELAY from its listener.
    let _ = upstream.set_nodelay(true);
    let metrics = route.metrics.endpoint(target);
    metrics.opened.inc();
    metrics.active.inc();
    let timeouts = Timeouts {
        idle: route.idle_timeout.or(shared.settings.tcp.idle_timeout),
        half_closed: Some(shared.settings.tcp.half_close_timeout),
    };
    // The copy ends early only at the end of the shutdown grace period.
    let copied = tokio::select! {
        copied = super::copy::bidirectional(&mut client, &mut upstream, BUFFER, timeouts) => Some(copied),
        () = shared.close.cancelled() => None,
    };
    metrics.active.dec();
    let Some((to_endpoint, to_client, result)) = copied else {
        reset(client);
        reset(upstream);
        return;
    };
    metrics.to_endpoint.inc_by(to_endpoint);
    metrics.to_client.inc_by(to_client);
    match result {
        Ok(Ended::Closed) => {}
        // Closed (FIN) both ways: each side sees the connection end.
        Ok(Ended::Idle) => {
            route.metrics.idle_timeout.inc();
        }
        Ok(Ended::HalfClosed) => {
            route.metrics.half_close_timeout.inc();
        }
        Err(error) => {
            // A reset on one side is passed on to the other.
            tracing::debug!(endpoint = %target, "connection ended with an error: {error}");
            reset(client);
            reset(upstream);
        }
    }
}

/// Closes a connection with a reset: the client sees "connection reset".
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Closes a connection without a reply, after the client's first bytes or the drop
/// timeout: the nearest userspace gets to a dropped SYN.
async fn drop_connection(mut client: TcpStream, shared: &Shared) {
    let mut byte = [0u8; 1];
    tokio::select! {
        _ = client.read(&mut byte) => {}
        () = tokio::time::sleep(shared.settings.drop_timeout) => {}
        () = shared.close.cancelled() => {}
    }
    reset(client);
}
