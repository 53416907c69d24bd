//! HTTP Service ports (`appProtocol: http`, `kubernetes.io/h2c`, `grpc`, or
//! `weir.dev/protocol: http`): weir terminates HTTP/1.1 and HTTP/2 with prior knowledge
//! from clients and decides every request on its own, so the streams of one long h2c or
//! gRPC connection, and the requests of one keep-alive connection, spread over the
//! endpoints instead of sticking to the first. Requests go to endpoints over pooled
//! connections: kept alive for HTTP/1.1, multiplexed for h2c and gRPC.
//!
//! Each request takes the decision path of every protocol (`decide.rs`) against the
//! route as it is when the request arrives: an endpoint that leaves gets no new request
//! from open client connections, which are not reset. A request whose connection to an
//! endpoint cannot be made is tried on another when it has no body to replay; nothing
//! eligible answers 503 with a short body saying why; `drop` closes the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::decide::{self, Next, Refusal};
pub use super::upstream::HttpKind;
use super::upstream::{self, Body, SendError};
use super::{Route, Shared};

/// The largest request or response head weir takes (HTTP/1.1 buffer, HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Streams one client's HTTP/2 connection may have open at once.
pub const MAX_STREAMS: u32 = 256;
/// The largest request body kept to be sent again to another endpoint when the first
/// cannot be reached (only bodies whose size is known up front).
pub const MAX_REPLAY_BYTES: u64 = 64 * 1024;
/// How long a client may take to send a request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one client connection as HTTP until it closes, or, once `stop` is cancelled
/// (the listener closes: shutdown, or the address moved), finishes what is in flight and
/// closes it (GOAWAY for HTTP/2).
pub async fn connection(
    client: TcpStream,
    peer: SocketAddr,
    address: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let shared_close = shared.close.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let shared = shared.clone();
        // Boxed: the request's future is a few KiB, and hyper moves what this returns
        // into the stream's task; a pointer is cheaper to move than the future.
        Box::pin(request_to(shared, peer, address, request))
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let close = shared_close.clone();
    let client = super::coalesce::Coalesce::new(client);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(client), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = stop.cancelled() => {}
        () = close.cancelled() => return,
    }
    connection.as_mut().graceful_shutdown();
    tokio::select! {
        _ = connection => {}
        // The shutdown grace period is over: whatever is left is cut.
        () = close.cancelled() => {}
    }
}

/// A request the policy dropped: the client's connection is closed without an answer.
#[derive(Debug)]
struct RequestDropped;

impl std::fmt::Display for RequestDropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dropped by the Service's policy")
    }
}

impl std::error::Error for RequestDropped {}

/// One request: its Service's route as it is now, the policy's choice, and the
/// endpoint's answer (or weir's, when there is none).
async fn request_to(
    shared: Arc<Shared>,
    peer: SocketAddr,
    address: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, RequestDropped> {
    let started = Instant::now();
    // An HTTP/1.1 upgrade (WebSocket and the like): forwarded with its headers, and once
    // the endpoint agrees (101), the two connections are joined byte for byte.
    let upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let Some(route) = shared.tcp_route(address) else {
        return Ok(answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "this Service port is gone\n",
        ));
    };
    let kind = route.http.unwrap_or(HttpKind::Http1);
    if upgrade.is_some() && kind == HttpKind::H2c {
        return Ok(answer(
            StatusCode::NOT_IMPLEMENTED,
            "an HTTP/1.1 upgrade cannot go to an h2c or gRPC port's endpoints; use appProtocol: http\n",
        ));
    }
    let (parts, body) = request.into_parts();
    let parts = Arc::new(parts);
    let mut decision = match decide::admit(&route, &shared, peer, address) {
        Ok(decision) => decision.for_request(parts.clone()),
        Err(Refusal::SourceRange) => return Err(RequestDropped),
        Err(Refusal::NoPolicy) => {
            return Ok(unavailable(
                &route,
                started,
                "the Service's policy is unavailable and its failure mode is closed\n",
            ));
        }
    };
    // A request without a body, or with one of a known size up to MAX_REPLAY_BYTES (read
    // first), can be sent again to another endpoint if the first cannot be reached; a
    // larger or open-ended one is streamed, and goes where it first goes.
    let (buffered, mut body) = if body.is_end_stream() {
        (Some(Bytes::new()), None)
    } else if (body.size_hint().upper()).is_some_and(|upper| upper <= MAX_REPLAY_BYTES) {
        match body.collect().await {
            Ok(collected) => (Some(collected.to_bytes()), None),
            // The client went away while sending it: nobody to answer.
            Err(_) => return Err(RequestDropped),
        }
    } else {
        (None, Some(body))
    };
    let replayable = buffered.is_some();
    let path = (parts.uri.path_and_query().cloned())
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    loop {
        let (endpoint, target) = match decision.next_step() {
            Next::Forward { endpoint, address } => (endpoint, address),
            Next::Drop => return Err(RequestDropped),
            Next::Reject => {
                return Ok(unavailable(
                    &route,
                    started,
                    "no endpoint of this Service may serve this request\n",
                ));
            }
            Next::GiveUp => {
                return Ok(unavailable(
                    &route,
                    started,
                    "no endpoint of this Service could be reached\n",
                ));
            }
        };
        // HTTP/1.1 in origin form (`GET /path`), HTTP/2 with the endpoint as `:authority`
        // unless the client named one.
        let uri = match kind {
            HttpKind::Http1 => hyper::Uri::from(path.clone()),
            HttpKind::H2c => {
                // The client's `:authority`, or its HTTP/1.1 `Host`, or the endpoint.
                let host = (parts.headers.get(hyper::header::HOST))
                    .and_then(|host| host.to_str().ok()?.parse().ok());
                let authority = (parts.uri.authority().cloned().or(host)).unwrap_or_else(|| {
                    (target.to_string().parse()).expect("a socket address is an authority")
                });
                let mut uri = hyper::http::uri::Parts::default();
                uri.scheme = Some(hyper::http::uri::Scheme::HTTP);
                uri.authority = Some(authority);
                uri.path_and_query = Some(path.clone());
                hyper::Uri::from_parts(uri).expect("scheme, authority and path")
            }
        };
        let mut outgoing = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .version(match kind {
                HttpKind::Http1 => hyper::Version::HTTP_11,
                HttpKind::H2c => hyper::Version::HTTP_2,
            });
        // The authority the client asked for goes on: an HTTP/2 client's `:authority`
        // becomes the `Host` of an HTTP/1.1 request (not the endpoint's address); with
        // none at all, the endpoint's address.
        if !parts.headers.contains_key(hyper::header::HOST) && kind == HttpKind::Http1 {
            match parts.uri.authority() {
                Some(authority) => {
                    outgoing = outgoing.header(hyper::header::HOST, authority.as_str())
                }
                None => outgoing = outgoing.header(hyper::header::HOST, target.to_string()),
            }
        }
        let mut forwarded = None;
        for (name, value) in &parts.headers {
            if route.forwarded_for && name == "x-forwarded-for" {
                forwarded = Some(value.to_str().unwrap_or_default().to_string());
            } else if !hop_by_hop(name)
                // An upgrade's own headers go with it.
                || (upgrade.is_some()
                    && (name == hyper::header::CONNECTION || name == hyper::header::UPGRADE))
            {
                outgoing = outgoing.header(name, value);
            }
        }
        if route.forwarded_for {
            let client = crate::net::canonical(peer.ip());
            outgoing = outgoing.header(
                "x-forwarded-for",
                match forwarded {
                    Some(earlier) if !earlier.is_empty() => format!("{earlier}, {client}"),
                    _ => client.to_string(),
                },
            );
        }
        let upstream_body: Body = match (&buffered, body.take()) {
            (Some(bytes), _) if !bytes.is_empty() => Full::new(bytes.clone())
                .map_err(|never| match never {})
                .boxed(),
            (None, Some(body)) => body.boxed(),
            _ => Empty::new().map_err(|never| match never {}).boxed(),
        };
        let Ok(outgoing) = outgoing.body(upstream_body) else {
            return Ok(answer(
                StatusCode::BAD_REQUEST,
                "a request weir cannot forward\n",
            ));
        };
        let sent = Instant::now();
        let timeout = shared.settings.connect_timeout;
        match upstream::send(kind, target, timeout, outgoing).await {
            Ok(mut response) => {
                // The policy learns the status and the time to the response's head now,
                // and that the request is over when its response's body ends (a gRPC
                // stream, a long download): until then it is in flight on that endpoint.
                decision.responded(endpoint, response.status().as_u16(), sent.elapsed());
                if let Some(client) = upgrade
                    && response.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    let endpoint = hyper::upgrade::on(&mut response);
                    tokio::spawn(join(client, endpoint));
                }
                let response = response.map(|body| {
                    InFlight {
                        body,
                        done: Some((decision, endpoint, sent)),
                    }
                    .boxed()
                });
                return Ok(record(&route, Some(target), started, response));
            }
            Err(error @ SendError::Connect(_)) if replayable => {
                tracing::debug!(%target, "{error}");
                decision.unreachable(endpoint, target, sent.elapsed());
            }
            Err(error) => {
                tracing::debug!(%target, "request failed: {error}");
                if let SendError::Connect(_) = error {
                    decision.unreachable(endpoint, target, sent.elapsed());
                } else {
                    decision.failed(endpoint, target, sent.elapsed());
                }
                return Ok(record(
                    &route,
                    Some(target),
                    started,
                    answer(
                        StatusCode::BAD_GATEWAY,
                        "the endpoint failed before answering\n",
                    ),
                ));
            }
        }
    }
}

/// A response body that tells the request's policy the request is over when it ends,
/// fails, or is dropped (the client went away).
struct InFlight {
    body: Incoming,
    done: Option<(decide::Decision, weir_sdk::EndpointId, Instant)>,
}

impl InFlight {
    fn finish(&mut self) {
        if let Some((decision, endpoint, sent)) = self.done.take() {
            decision.closed(endpoint, sent.elapsed());
        }
    }
}

impl hyper::body::Body for InFlight {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None | Some(Err(_))) => self.finish(),
            std::task::Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Whether a request asks to switch protocols (`Connection: upgrade` and `Upgrade`).
fn is_upgrade(request: &Request<Incoming>) -> bool {
    let headers = request.headers();
    request.version() == hyper::Version::HTTP_11
        && headers.contains_key(hyper::header::UPGRADE)
        && (headers.get_all(hyper::header::CONNECTION).iter())
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Copies between an upgraded client connection and its endpoint's until both close.
async fn join(client: hyper::upgrade::OnUpgrade, endpoint: hyper::upgrade::OnUpgrade) {
    let (Ok(client), Ok(endpoint)) = tokio::join!(client, endpoint) else {
        return;
    };
    let (mut client, mut endpoint) = (TokioIo::new(client), TokioIo::new(endpoint));
    let _ = tokio::io::copy_bidirectional(&mut client, &mut endpoint).await;
}

/// Headers about one hop, not passed on (RFC 9110 7.6.1); `te: trailers` is, for gRPC.
fn hop_by_hop(name: &hyper::header::HeaderName) -> bool {
    use hyper::header;
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// weir's own short answer.
fn answer(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// weir's 503 for a request no endpoint serves, counted.
fn unavailable(route: &Route, started: Instant, why: &'static str) -> Response<Body> {
    record(
        route,
        None,
        started,
        answer(StatusCode::SERVICE_UNAVAILABLE, why),
    )
}

/// Counts the request (by endpoint and status) and its time to the response's head.
fn record(
    route: &Route,
    endpoint: Option<SocketAddr>,
    started: Instant,
    response: Response<Body>,
) -> Response<Body> {
    route
        .metrics
        .request(endpoint, response.status().as_u16(), started.elapsed());
    response
}
