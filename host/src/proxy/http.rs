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
//! eligible answers 503 with a short body saying why; `drop` closes an HTTP/1.1
//! connection and resets an HTTP/2 stream.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::coalesce::Coalesce;
use super::decide::{self, Next, Refusal};
use super::ending::{End, Ending};
use super::h1;
use super::h2::BoxError;
use super::sniff::{Rewind, sniff};
pub use super::upstream::HttpKind;
use super::upstream::{self, Body, MAX_HEADER_BYTES, Received, SendError};
use super::{Route, Shared};

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
    mut client: TcpStream,
    peer: SocketAddr,
    address: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let close = shared.close.clone();
    let (h2, seen) = match tokio::time::timeout(HEADER_TIMEOUT, sniff(&mut client)).await {
        Ok(Ok(Some(sniffed))) => sniffed,
        _ => return,
    };
    if h2 {
        let client = Rewind::new(seen, client);
        let limits = super::h2::ServerLimits {
            max_streams: MAX_STREAMS,
            max_header_bytes: MAX_HEADER_BYTES as u32,
        };
        let answer = |request: Request<super::h2::RecvBody>| {
            let (parts, body) = request.into_parts();
            let body = Received::H2(body);
            let parts = Arc::new(parts);
            Box::pin(request_to(shared.clone(), peer, address, parts, body, None))
        };
        super::h2::serve(client, limits, HEADER_TIMEOUT, stop, close, answer).await;
        return;
    }
    // HTTP/1.1 answers to clients leave at the end of the worker's turn, together (see
    // coalesce.rs); h2 buffers its frames itself, and putting its flush off only costs it
    // another turn of its connection.
    let client = Rewind::new(seen, Coalesce::new(client));
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        // An HTTP/1.1 upgrade (WebSocket and the like): forwarded with its headers, and
        // once the endpoint agrees (101), the two connections are joined byte for byte.
        let upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let (parts, body) = request.into_parts();
        let body = Received::Http1(body);
        // Shared with the policy, which reads what it asks for of the request from it.
        let parts = Arc::new(parts);
        // Boxed: the request's future is a few KiB, and hyper moves what this returns
        // around; a pointer is cheaper to move than the future.
        Box::pin(request_to(
            shared.clone(),
            peer,
            address,
            parts,
            body,
            upgrade,
        ))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(client), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let mut ending = Ending::new(stop, close);
    let ended = poll_fn(|cx| match connection.as_mut().poll(cx) {
        Poll::Ready(_) => Poll::Ready(None),
        Poll::Pending => ending.poll(cx).map(Some),
    })
    .await;
    if ended != Some(End::Drain) {
        return;
    }
    connection.as_mut().graceful_shutdown();
    // Until it has finished, or the shutdown grace period is over: whatever is left is
    // cut.
    poll_fn(|cx| match connection.as_mut().poll(cx) {
        Poll::Ready(_) => Poll::Ready(()),
        Poll::Pending => ending.poll(cx).map(drop),
    })
    .await;
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
/// endpoint's answer (or weir's, when there is none). `upgrade`: the client's side of an
/// HTTP/1.1 upgrade it asked for. (What it is given stays in its future to the end:
/// the request's head comes shared, not in the future itself.)
async fn request_to(
    shared: Arc<Shared>,
    peer: SocketAddr,
    address: SocketAddr,
    parts: Arc<Parts>,
    body: Received,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<Response<Body>, RequestDropped> {
    let started = Instant::now();
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
        // Boxed: rare, and it would otherwise take room in every request's future.
        match Box::pin(body.collect()).await {
            Ok(collected) => (Some(collected.to_bytes()), None),
            // The client went away while sending it: nobody to answer.
            Err(_) => return Err(RequestDropped),
        }
    } else {
        (None, Some(body))
    };
    let replayable = buffered.is_some();
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
        let outgoing = Outgoing {
            parts: &parts,
            kind,
            target,
            forwarded_for: route.forwarded_for.then_some(peer),
            upgrade: upgrade.is_some(),
        };
        let upstream_body: Body = match (&buffered, body.take()) {
            (Some(bytes), _) if !bytes.is_empty() => super::h2::full(bytes.clone()),
            (None, Some(body)) => body.boxed(),
            _ => super::h2::empty(),
        };
        let sent = decision.decided_at();
        let timeout = shared.settings.connect_timeout;
        match upstream::send(kind, target, timeout, &outgoing, upstream_body, sent).await {
            Ok(mut response) => {
                // The policy learns the status and the time to the response's head now,
                // and that the request is over when its response's body ends (a gRPC
                // stream, a long download): until then it is in flight on that endpoint.
                let answered = Instant::now();
                let status = response.status().as_u16();
                decision.responded(endpoint, status, answered.duration_since(sent));
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
                let took = answered.duration_since(started);
                return Ok(record(&route, Some(target), took, response));
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
                    started.elapsed(),
                    answer(
                        StatusCode::BAD_GATEWAY,
                        "the endpoint failed before answering\n",
                    ),
                ));
            }
        }
    }
}

/// The head of a request as it goes to an endpoint.
struct Outgoing<'a> {
    /// The client's request.
    parts: &'a Parts,
    kind: HttpKind,
    target: SocketAddr,
    /// The client, when the Service adds it to `X-Forwarded-For`.
    forwarded_for: Option<SocketAddr>,
    /// An HTTP/1.1 upgrade: its `Connection` and `Upgrade` headers go with it.
    upgrade: bool,
}

impl Outgoing<'_> {
    /// The path and query the request goes to.
    fn path(&self) -> hyper::http::uri::PathAndQuery {
        (self.parts.uri.path_and_query().cloned())
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"))
    }

    /// The `Host` an HTTP/1.1 request gets when the client sent none: the authority the
    /// client asked for (an HTTP/2 client's `:authority`), else the endpoint's address.
    fn missing_host(&self) -> Option<HeaderValue> {
        if self.parts.headers.contains_key(hyper::header::HOST) {
            return None;
        }
        match self.parts.uri.authority() {
            Some(authority) => authority.as_str().parse().ok(),
            None => self.target.to_string().parse().ok(),
        }
    }

    /// The client's header fields that go on to the endpoint, and `X-Forwarded-For` when
    /// the Service adds the client to it.
    fn each_field(&self, mut field: impl FnMut(&HeaderName, &HeaderValue)) {
        let mut forwarded = None;
        for (name, value) in &self.parts.headers {
            if self.forwarded_for.is_some() && name == "x-forwarded-for" {
                forwarded = value.to_str().ok().filter(|earlier| !earlier.is_empty());
            } else if !hop_by_hop(name, value, self.kind)
                || (self.upgrade
                    && (name == hyper::header::CONNECTION || name == hyper::header::UPGRADE))
            {
                field(name, value);
            }
        }
        if let Some(client) = self.forwarded_for {
            let client = crate::net::canonical(client.ip());
            let value = match forwarded {
                Some(earlier) => format!("{earlier}, {client}"),
                None => client.to_string(),
            };
            if let Ok(value) = value.parse() {
                field(&HeaderName::from_static("x-forwarded-for"), &value);
            }
        }
    }
}

impl upstream::Head for Outgoing<'_> {
    fn method(&self) -> &hyper::Method {
        &self.parts.method
    }

    fn is_upgrade(&self) -> bool {
        self.upgrade
    }

    fn request(&self) -> Request<()> {
        let parts = self.parts;
        let mut head = Request::new(());
        *head.method_mut() = parts.method.clone();
        let headers = head.headers_mut();
        headers.reserve(parts.headers.len() + 1);
        // HTTP/1.1 in origin form (`GET /path`), HTTP/2 with the endpoint as `:authority`
        // unless the client named one.
        match self.kind {
            HttpKind::Http1 => {
                *head.uri_mut() = hyper::Uri::from(self.path());
                *head.version_mut() = hyper::Version::HTTP_11;
                if let Some(host) = self.missing_host() {
                    head.headers_mut().insert(hyper::header::HOST, host);
                }
            }
            HttpKind::H2c => {
                // The client's `:authority`, or its HTTP/1.1 `Host`, or the endpoint.
                let host = (parts.headers.get(hyper::header::HOST))
                    .and_then(|host| host.to_str().ok()?.parse().ok());
                let authority = (parts.uri.authority().cloned().or(host)).unwrap_or_else(|| {
                    (self.target.to_string().parse()).expect("a socket address is an authority")
                });
                let mut uri = hyper::http::uri::Parts::default();
                uri.scheme = Some(hyper::http::uri::Scheme::HTTP);
                uri.authority = Some(authority);
                uri.path_and_query = Some(self.path());
                *head.uri_mut() = hyper::Uri::from_parts(uri).expect("scheme, authority and path");
                *head.version_mut() = hyper::Version::HTTP_2;
            }
        }
        let headers = head.headers_mut();
        self.each_field(|name, value| {
            headers.append(name.clone(), value.clone());
        });
        head
    }

    fn write_http1(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.parts.method.as_str().as_bytes());
        out.push(b' ');
        match self.parts.uri.path_and_query() {
            Some(path) => out.extend_from_slice(path.as_str().as_bytes()),
            None => out.push(b'/'),
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        if let Some(host) = self.missing_host() {
            h1::put_field(out, &hyper::header::HOST, &host);
        }
        self.each_field(|name, value| {
            // The client writes the body's framing as it sends it.
            if name != hyper::header::CONTENT_LENGTH {
                h1::put_field(out, name, value);
            }
        });
    }
}

/// A response body that tells the request's policy the request is over when it ends,
/// fails, or is dropped (the client went away).
struct InFlight {
    body: Received,
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
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
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

/// Headers about one hop, not passed on (RFC 9110 7.6.1). `te` is passed on, except to
/// HTTP/2 endpoints as anything but `trailers` (which gRPC needs), since HTTP/2 forbids
/// that.
fn hop_by_hop(
    name: &hyper::header::HeaderName,
    value: &hyper::header::HeaderValue,
    kind: HttpKind,
) -> bool {
    use hyper::header;
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == "keep-alive"
        || name == "proxy-connection"
        || (kind == HttpKind::H2c && name == header::TE && value != "trailers")
}

/// weir's own short answer.
fn answer(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(super::h2::full(Bytes::from_static(text.as_bytes())));
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
        started.elapsed(),
        answer(StatusCode::SERVICE_UNAVAILABLE, why),
    )
}

/// Counts the request (by endpoint and status) and its time to the response's head.
fn record(
    route: &Route,
    endpoint: Option<SocketAddr>,
    took: Duration,
    response: Response<Body>,
) -> Response<Body> {
    route
        .metrics
        .request(endpoint, response.status().as_u16(), took);
    response
}
