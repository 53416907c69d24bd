//! Connections from a worker thread to the endpoints of HTTP ports (no generic pool in
//! between): per endpoint, one multiplexed HTTP/2 connection for h2c and gRPC ports (the
//! `h2` crate, its request sent and its response awaited by the stream that asked), and a
//! set of keep-alive HTTP/1.1 connections for `http` ports (weir's own client, `h1.rs`:
//! not tasks of their own, the request that holds one writes on it, then its response's
//! body reads it, and it goes back to the pool when the body has been read). A connection
//! the endpoint closed (or sent GOAWAY on) is dropped; a request it did not take is sent
//! once more on a new one. Connections unused for [`IDLE`] are closed, so endpoints that
//! left hold nothing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::h1;
pub use super::h2::Body;
use super::h2::{self as h2_glue, BoxError, CONNECTION_WINDOW, RecvBody, STREAM_WINDOW};

/// The largest request or response head weir takes (HTTP/1.1 buffer, HTTP/2 header list),
/// from clients and from endpoints.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A body as it arrives, from a client or an endpoint, over either protocol.
pub enum Received {
    Http1(Incoming),
    /// From an endpoint, over a pooled HTTP/1.1 connection that reading the body reads.
    Http1Pooled(H1Body),
    H2(RecvBody),
}

impl hyper::body::Body for Received {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Received::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Received::Http1Pooled(body) => body.poll_frame(cx).map_err(Into::into),
            Received::H2(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Received::Http1(body) => body.is_end_stream(),
            Received::Http1Pooled(body) => body.is_end_stream(),
            Received::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Received::Http1(body) => body.size_hint(),
            Received::Http1Pooled(body) => body.size_hint(),
            Received::H2(body) => body.size_hint(),
        }
    }
}

/// How an HTTP Service port speaks to its endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HttpKind {
    /// `appProtocol: http` (or `weir.dev/protocol: http`): HTTP/1.1 to endpoints.
    Http1,
    /// `appProtocol: kubernetes.io/h2c` or `grpc`: HTTP/2 with prior knowledge.
    H2c,
}

/// A connection unused this long is closed.
const IDLE: Duration = Duration::from_secs(90);
/// HTTP/1.1 connections kept per endpoint and worker; past it the oldest is let go (it
/// closes once its response is read).
const KEEP: usize = 1024;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection to the endpoint could be made: the request was not sent.
    #[error("connect: {0}")]
    Connect(String),
    /// The endpoint took the request and failed before answering.
    #[error("{0}")]
    Request(BoxError),
}

/// An HTTP/2 connection's sender, and whether the connection has ended.
#[derive(Clone)]
struct H2Sender {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// A response's body from a pooled HTTP/1.1 connection, which goes back to the pool
/// once the body has ended (and is closed if the body is dropped before: the rest of it
/// would still be on it).
pub struct H1Body {
    /// `None` once it has ended.
    body: Option<h1::ResponseBody>,
    target: SocketAddr,
}

impl H1Body {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h1::Error>>> {
        let Some(body) = &mut self.body else {
            return Poll::Ready(None);
        };
        let polled = body.poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if body.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.body = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body
            .as_ref()
            .is_none_or(h1::ResponseBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or(SizeHint::with_exact(0), h1::ResponseBody::size_hint)
    }

    /// The body has ended: its connection goes back to the pool, if it can take another
    /// request.
    fn release(&mut self) {
        if let Some(connection) = self.body.take().and_then(h1::ResponseBody::into_connection) {
            put_h1(connection, self.target);
        }
    }
}

fn put_h1(connection: h1::Connection, target: SocketAddr) {
    POOL.with(|pool| (pool.borrow_mut()).put(HttpKind::Http1, target, Sender::H1(connection)));
}

enum Sender {
    H1(h1::Connection),
    H2(H2Sender),
}

impl Sender {
    fn is_closed(&mut self) -> bool {
        match self {
            Sender::H1(connection) => connection.is_stale(),
            Sender::H2(s) => s.closed.load(Ordering::Relaxed),
        }
    }
}

struct Entry {
    sender: Sender,
    used: Instant,
}

#[derive(Default)]
struct Pool {
    /// By endpoint, hashed fast (the endpoints come from the API server, not from
    /// clients).
    connections: HashMap<(SocketAddr, HttpKind), Vec<Entry>, foldhash::fast::RandomState>,
    swept: Option<Instant>,
    /// The time of the latest request, for when connections were last used (the clock
    /// is not read again for the pool).
    now: Option<Instant>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// A request's head, as each protocol to an endpoint takes it.
pub trait Head: Sync {
    fn method(&self) -> &Method;
    /// Whether it asks for an HTTP/1.1 upgrade.
    fn is_upgrade(&self) -> bool;
    /// As a request: for HTTP/2 endpoints, and HTTP/1.1 upgrades.
    fn request(&self) -> Request<()>;
    /// Its request line and header field lines for an HTTP/1.1 endpoint, without the
    /// fields that frame the body (the client writes those) and the empty line.
    fn write_http1(&self, out: &mut Vec<u8>);
}

/// Sends a request (`head` and `body`) to `target` over one of this thread's connections
/// to it, made when there is none free. `head` is asked again when the request goes once
/// more on a new connection. `now`: about now, the pool's clock.
pub async fn send(
    kind: HttpKind,
    target: SocketAddr,
    connect_timeout: Duration,
    head: &dyn Head,
    body: Body,
    now: Instant,
) -> Result<Response<Received>, SendError> {
    POOL.with(|pool| pool.borrow_mut().tick(now));
    match kind {
        // Boxed: rare, and its future would otherwise take room in every request's.
        HttpKind::Http1 if head.is_upgrade() => {
            let request = head.request().map(|()| body);
            Box::pin(send_upgrade(target, connect_timeout, request)).await
        }
        HttpKind::Http1 => send_h1(target, connect_timeout, head, body).await,
        HttpKind::H2c => send_h2(target, connect_timeout, head, body).await,
    }
}

async fn send_h1(
    target: SocketAddr,
    connect_timeout: Duration,
    head: &dyn Head,
    body: Body,
) -> Result<Response<Received>, SendError> {
    // A pooled connection the endpoint has closed is let go (`take` checks).
    let pooled = POOL.with(|pool| pool.borrow_mut().take(HttpKind::Http1, target));
    let reused = pooled.is_some();
    let connection = match pooled {
        Some(Sender::H1(connection)) => connection,
        _ => Box::pin(connect_h1(target, connect_timeout)).await?,
    };
    // The endpoint may close a kept connection just as a request goes out on it: when
    // nothing came back, a request that may be repeated and has no body goes once more,
    // on a new connection.
    let again = reused && body.is_end_stream() && head.method().is_idempotent();
    let write_head = |out: &mut Vec<u8>| head.write_http1(out);
    let response = match connection.send(head.method(), &write_head, body).await {
        Err(h1::Error::Closed) if again => {
            Box::pin(send_h1_anew(target, connect_timeout, head)).await?
        }
        sent => sent.map_err(|error| SendError::Request(error.into()))?,
    };
    if response.body().is_end_stream() {
        // Nothing to read (HEAD, 204, 304, an empty body): free again at once.
        let (parts, body) = response.into_parts();
        if let Some(connection) = body.into_connection() {
            put_h1(connection, target);
        }
        return Ok(Response::from_parts(
            parts,
            Received::Http1Pooled(H1Body { body: None, target }),
        ));
    }
    Ok(response.map(|body| {
        Received::Http1Pooled(H1Body {
            body: Some(body),
            target,
        })
    }))
}

/// A request without a body once more, on a new connection (boxed: rare, and its
/// future would otherwise take room in every request's).
async fn send_h1_anew(
    target: SocketAddr,
    connect_timeout: Duration,
    head: &dyn Head,
) -> Result<Response<h1::ResponseBody>, SendError> {
    let connection = connect_h1(target, connect_timeout).await?;
    let write_head = |out: &mut Vec<u8>| head.write_http1(out);
    (connection
        .send(head.method(), &write_head, h2_glue::empty())
        .await)
        .map_err(|error| SendError::Request(error.into()))
}

/// An HTTP/1.1 upgrade (WebSocket and the like) on a connection of its own, a task of its
/// own: after a 101 the connection is handed over and joined to the client's.
async fn send_upgrade(
    target: SocketAddr,
    connect_timeout: Duration,
    request: Request<Body>,
) -> Result<Response<Received>, SendError> {
    let stream = connect_tcp(target, connect_timeout).await?;
    let (mut sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Connect(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%target, "upgraded connection to the endpoint ended: {error}");
        }
    });
    let response = sender.send_request(request).await;
    Ok(response
        .map_err(|error| SendError::Request(error.into()))?
        .map(Received::Http1))
}

async fn send_h2(
    target: SocketAddr,
    connect_timeout: Duration,
    head: &dyn Head,
    body: Body,
) -> Result<Response<Received>, SendError> {
    let end = hyper::body::Body::is_end_stream(&body);
    // Connecting, or waiting for a connection at its peer's stream limit, is boxed: it is
    // rare, and its future would otherwise take room in every request's.
    let (response, stream) = match open_pooled(target, head, end) {
        Some(opened) => opened,
        None => Box::pin(open_stream(target, connect_timeout, head, end)).await?,
    };
    if !end {
        // The request's body goes on its own: it may outlive the response's head (a
        // gRPC stream sends and receives at once).
        tokio::spawn(async move {
            if let Err(error) = h2_glue::pipe(body, stream).await {
                tracing::debug!(%target, "request body: {error}");
            }
        });
    }
    let response = match response.await {
        Ok(response) => response,
        // The endpoint said it did not process the stream (REFUSED_STREAM, or a GOAWAY
        // naming an earlier last stream): a request without a body goes once more, on
        // the endpoint's connection if it still takes streams, else on a new one.
        Err(error) if end && unprocessed(&error, head.method()) => {
            let (response, _) = Box::pin(open_stream(target, connect_timeout, head, true)).await?;
            (response.await).map_err(|error| SendError::Request(error.into()))?
        }
        Err(error) => return Err(SendError::Request(error.into())),
    };
    let (parts, stream) = response.into_parts();
    let body = RecvBody::new(stream, &parts.headers);
    Ok(Response::from_parts(parts, Received::H2(body)))
}

/// A stream for `head` on this thread's connection to `target`, when there is one that
/// takes a stream now: opened in place, without a clone of its sender (h2 locks the
/// connection for each clone and each drop) and without awaiting. `None`: there is no
/// connection, or it refused the stream (a stream it opened earlier still waits for the
/// peer's limit, a GOAWAY came, it is gone), and the slow way sorts it out.
///
/// Not `poll_ready` first: with a stream waiting at the peer's limit it would register
/// this call's waker on that stream, in place of its body's sender's.
fn open_pooled(
    target: SocketAddr,
    head: &dyn Head,
    end: bool,
) -> Option<(h2::client::ResponseFuture, h2::SendStream<Bytes>)> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let sender = pool.h2(target)?;
        sender.send.send_request(head.request(), end).ok()
    })
}

/// A stream for `head` on this thread's connection to `target` once it takes one, or on
/// a new connection when there is none, or when it takes no new stream (a GOAWAY came,
/// or it is gone: h2 says so before taking the request).
async fn open_stream(
    target: SocketAddr,
    connect_timeout: Duration,
    head: &dyn Head,
    end: bool,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), SendError> {
    let pooled = POOL.with(|pool| pool.borrow_mut().take(HttpKind::H2c, target));
    let send = match pooled {
        Some(Sender::H2(sender)) => match sender.send.ready().await {
            Ok(send) => send,
            Err(_) => ready(connect_h2(target, connect_timeout).await?).await?,
        },
        _ => ready(connect_h2(target, connect_timeout).await?).await?,
    };
    let mut send = send;
    (send.send_request(head.request(), end)).map_err(|error| SendError::Request(error.into()))
}

/// A new connection's sender, once it takes a stream.
async fn ready(sender: H2Sender) -> Result<h2::client::SendRequest<Bytes>, SendError> {
    (sender.send.ready().await)
        .map_err(|error| SendError::Connect(format!("a new connection takes no stream: {error}")))
}

/// Whether an endpoint's error says a request was not processed, so that sending it
/// again cannot repeat it: a stream refused, or one past the last a GOAWAY took (for
/// methods that may be repeated anyway, since later connection errors carry the GOAWAY
/// too).
fn unprocessed(error: &h2::Error, method: &Method) -> bool {
    error.reason() == Some(h2::Reason::REFUSED_STREAM) && error.is_reset()
        || error.is_go_away() && error.is_remote() && method.is_idempotent()
}

async fn connect_tcp(target: SocketAddr, timeout: Duration) -> Result<TcpStream, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(SendError::Connect(error.to_string())),
        Err(_) => return Err(SendError::Connect(format!("no answer in {timeout:?}"))),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A new HTTP/2 connection to `target`, kept as this thread's connection to it at once
/// (it takes any number of requests).
async fn connect_h2(target: SocketAddr, timeout: Duration) -> Result<H2Sender, SendError> {
    let stream = connect_tcp(target, timeout).await?;
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|e| SendError::Connect(e.to_string()))?;
    let closed = Arc::new(AtomicBool::new(false));
    let ended = closed.clone();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%target, "connection to the endpoint ended: {error}");
        }
        ended.store(true, Ordering::Relaxed);
    });
    let sender = H2Sender { send, closed };
    POOL.with(|pool| (pool.borrow_mut()).put(HttpKind::H2c, target, Sender::H2(sender.clone())));
    Ok(sender)
}

/// A new HTTP/1.1 connection to `target`.
async fn connect_h1(target: SocketAddr, timeout: Duration) -> Result<h1::Connection, SendError> {
    let stream = connect_tcp(target, timeout).await?;
    Ok(h1::Connection::new(stream, MAX_HEADER_BYTES))
}

impl Pool {
    /// A connection to `target` that can take a request now (an HTTP/1.1 one the
    /// endpoint has closed is let go on the way).
    fn take(&mut self, kind: HttpKind, target: SocketAddr) -> Option<Sender> {
        match kind {
            HttpKind::H2c => self.h2(target).map(|sender| Sender::H2(sender.clone())),
            // Every pooled HTTP/1.1 connection is free (its last response was read in
            // whole): the most recently used, whose endpoint most likely still keeps it.
            HttpKind::Http1 => loop {
                let entries = self.connections.get_mut(&(target, kind))?;
                let mut entry = entries.pop()?;
                if !entry.sender.is_closed() {
                    return Some(entry.sender);
                }
            },
        }
    }

    /// This thread's HTTP/2 connection to `target`, to be used where it is, if it has
    /// not ended.
    fn h2(&mut self, target: SocketAddr) -> Option<&mut H2Sender> {
        let now = self.now();
        let entry = (self.connections.get_mut(&(target, HttpKind::H2c)))?.first_mut()?;
        if entry.sender.is_closed() {
            return None;
        }
        entry.used = now;
        match &mut entry.sender {
            Sender::H2(sender) => Some(sender),
            Sender::H1(_) => None,
        }
    }

    fn put(&mut self, kind: HttpKind, target: SocketAddr, sender: Sender) {
        let used = self.now();
        let entries = self.connections.entry((target, kind)).or_default();
        if kind == HttpKind::H2c {
            // One HTTP/2 connection per endpoint: a newer one replaces a closed one.
            entries.clear();
        } else if entries.len() >= KEEP {
            // The oldest quarter, at once: the cost spreads over the next puts.
            entries.drain(..KEEP / 4);
        }
        entries.push(Entry { sender, used });
    }

    /// A request goes out at `now`: connections idle for too long are closed first.
    fn tick(&mut self, now: Instant) {
        self.now = Some(now);
        self.sweep(now);
    }

    fn now(&self) -> Instant {
        self.now.unwrap_or_else(Instant::now)
    }

    /// Every so often, closes the connections unused for [`IDLE`] and forgets closed
    /// ones: dropping a connection's last sender ends it.
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|at| now.duration_since(at) < IDLE / 3)
        {
            return;
        }
        self.swept = Some(now);
        for entries in self.connections.values_mut() {
            entries.retain_mut(|e| now.duration_since(e.used) < IDLE && !e.sender.is_closed());
        }
        self.connections.retain(|_, entries| !entries.is_empty());
    }
}
