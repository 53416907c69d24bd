//! Connections from a worker thread to the endpoints of HTTP ports (no generic pool in
//! between): per endpoint, one multiplexed HTTP/2 connection for h2c and gRPC ports (the
//! `h2` crate, its request sent and its response awaited by the stream that asked), and a
//! set of keep-alive HTTP/1.1 connections for `http` ports (hyper's, but not tasks of
//! their own: the request that holds one drives it, then its response's body, and it goes
//! back to the pool when the body has been read). Writes are coalesced per turn of the
//! worker's loop. A connection the
//! endpoint closed (or sent GOAWAY on) is dropped; a request it did not take is sent once
//! more on a new one. Connections unused for [`IDLE`] are closed, so endpoints that left
//! hold nothing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::coalesce::Coalesce;
pub use super::h2::Body;
use super::h2::{self as h2_glue, BoxError, CONNECTION_WINDOW, RecvBody, STREAM_WINDOW};

/// The largest request or response head weir takes (HTTP/1.1 buffer, HTTP/2 header list),
/// from clients and from endpoints.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A body as it arrives, from a client or an endpoint, over either protocol.
pub enum Received {
    Http1(Incoming),
    /// From an endpoint over a pooled HTTP/1.1 connection, which reading the body drives.
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
            Received::Http1Pooled(body) => body.body.is_end_stream(),
            Received::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Received::Http1(body) => body.size_hint(),
            Received::Http1Pooled(body) => body.body.size_hint(),
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

type H1Connection = http1::Connection<TokioIo<Coalesce<TcpStream>>, Body>;

/// An HTTP/1.1 connection to an endpoint, not a task of its own: whoever holds it drives
/// it, the request that sends on it and then its response's body, and it goes back to
/// the pool when the body has been read.
struct H1 {
    sender: http1::SendRequest<Body>,
    /// `None` once it has ended.
    connection: Option<Pin<Box<H1Connection>>>,
}

impl H1 {
    /// Reads and writes what is due; drops the connection once it ends, which hands a
    /// request it did not take back to its sender.
    fn drive(&mut self, cx: &mut Context<'_>) {
        drive(&mut self.connection, cx);
    }
}

/// [`H1::drive`] on the connection alone, for when its sender is borrowed apart.
fn drive(connection: &mut Option<Pin<Box<H1Connection>>>, cx: &mut Context<'_>) {
    if let Some(open) = connection
        && open.as_mut().poll(cx).is_ready()
    {
        *connection = None;
    }
}

/// A response's body from a pooled HTTP/1.1 connection: reading it drives the connection,
/// which goes back to the pool once the body has ended (and is closed if it is dropped
/// before: the rest of the body would still be on it).
pub struct H1Body {
    body: Incoming,
    connection: Option<(H1, SocketAddr)>,
}

impl H1Body {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some((h1, _)) = &mut self.connection {
            h1.drive(cx);
        }
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(cx),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(cx),
            Poll::Ready(Some(Err(_))) => self.connection = None,
            _ => {}
        }
        polled
    }

    /// The body has ended: the connection, driven once more to take in the end of the
    /// response, goes back to the pool.
    fn release(&mut self, cx: &mut Context<'_>) {
        if let Some((mut h1, target)) = self.connection.take() {
            h1.drive(cx);
            put_h1(h1, target);
        }
    }
}

fn put_h1(h1: H1, target: SocketAddr) {
    if h1.connection.is_some() {
        POOL.with(|pool| (pool.borrow_mut()).put(HttpKind::Http1, target, Sender::H1(h1)));
    }
}

enum Sender {
    H1(H1),
    H2(H2Sender),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.connection.is_none() || s.sender.is_closed(),
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
    connections: HashMap<(SocketAddr, HttpKind), Vec<Entry>>,
    swept: Option<Instant>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Sends a request (`head()` and `body`) to `target` over one of this thread's
/// connections to it, made when there is none free. `head` is asked again when the
/// request goes once more on a new connection.
pub async fn send(
    kind: HttpKind,
    target: SocketAddr,
    connect_timeout: Duration,
    head: &(dyn Fn() -> Request<()> + Sync),
    body: Body,
) -> Result<Response<Received>, SendError> {
    match kind {
        HttpKind::Http1 => send_h1(target, connect_timeout, head().map(|()| body)).await,
        HttpKind::H2c => send_h2(target, connect_timeout, head, body).await,
    }
}

async fn send_h1(
    target: SocketAddr,
    connect_timeout: Duration,
    request: Request<Body>,
) -> Result<Response<Received>, SendError> {
    if request.headers().contains_key(hyper::header::UPGRADE) {
        return send_upgrade(target, connect_timeout, request).await;
    }
    let h1 = match POOL.with(|pool| pool.borrow_mut().take(HttpKind::Http1, target)) {
        Some(Sender::H1(h1)) => h1,
        _ => Box::pin(connect_h1(target, connect_timeout)).await?,
    };
    // A connection can close while in the pool: the request it did not take goes once
    // more, on a new connection.
    let request = match send_on_h1(h1, target, request).await? {
        Ok(response) => return Ok(response),
        Err(unsent) => unsent,
    };
    let h1 = Box::pin(connect_h1(target, connect_timeout)).await?;
    match send_on_h1(h1, target, request).await? {
        Ok(response) => Ok(response),
        Err(_) => Err(SendError::Connect(format!(
            "{target} closed two connections before taking a request"
        ))),
    }
}

/// The response, or the request back when the connection did not take it.
async fn send_on_h1(
    mut h1: H1,
    target: SocketAddr,
    request: Request<Body>,
) -> Result<Result<Response<Received>, Request<Body>>, SendError> {
    // Until it wants a request (the previous response taken in whole), or has ended.
    let ready = poll_fn(|cx| {
        h1.drive(cx);
        match h1.connection {
            None => Poll::Ready(false),
            Some(_) => h1.sender.poll_ready(cx).map(|ready| ready.is_ok()),
        }
    })
    .await;
    if !ready {
        return Ok(Err(request));
    }
    let H1 { sender, connection } = &mut h1;
    let mut sending = std::pin::pin!(sender.try_send_request(request));
    let sent = poll_fn(|cx| {
        drive(connection, cx);
        sending.as_mut().poll(cx)
    })
    .await;
    let response = match sent {
        Ok(response) => response,
        Err(mut error) => {
            return match error.take_message() {
                Some(unsent) => Ok(Err(unsent)),
                None => Err(SendError::Request(error.into_error().into())),
            };
        }
    };
    if response.body().is_end_stream() {
        // Nothing to read (HEAD, 204, 304, an empty body): free again at once.
        put_h1(h1, target);
        return Ok(Ok(response.map(Received::Http1)));
    }
    Ok(Ok(response.map(|body| {
        Received::Http1Pooled(H1Body {
            body,
            connection: Some((h1, target)),
        })
    })))
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
        .handshake(TokioIo::new(Coalesce::new(stream)))
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
    head: &(dyn Fn() -> Request<()> + Sync),
    body: Body,
) -> Result<Response<Received>, SendError> {
    let end = hyper::body::Body::is_end_stream(&body);
    let (response, stream) = open_stream(target, connect_timeout, head(), end).await?;
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
        Err(error) if end && unprocessed(&error, &head()) => {
            let (response, _) = open_stream(target, connect_timeout, head(), true).await?;
            (response.await).map_err(|error| SendError::Request(error.into()))?
        }
        Err(error) => return Err(SendError::Request(error.into())),
    };
    let (parts, stream) = response.into_parts();
    let body = RecvBody::new(stream, &parts.headers);
    Ok(Response::from_parts(parts, Received::H2(body)))
}

/// A stream for `head` on this thread's connection to `target`, or on a new one when
/// there is none, or when it takes no new stream (a GOAWAY came, or it is gone: h2 says
/// so before taking the request).
async fn open_stream(
    target: SocketAddr,
    connect_timeout: Duration,
    head: Request<()>,
    end: bool,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), SendError> {
    // Connecting is boxed: it is rare, and its future would otherwise take room in every
    // request's.
    let pooled = POOL.with(|pool| pool.borrow_mut().take(HttpKind::H2c, target));
    let send = match pooled {
        Some(Sender::H2(sender)) => match sender.send.ready().await {
            Ok(send) => send,
            Err(_) => ready(Box::pin(connect_h2(target, connect_timeout)).await?).await?,
        },
        _ => ready(Box::pin(connect_h2(target, connect_timeout)).await?).await?,
    };
    let mut send = send;
    (send.send_request(head, end)).map_err(|error| SendError::Request(error.into()))
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
fn unprocessed(error: &h2::Error, head: &Request<()>) -> bool {
    error.reason() == Some(h2::Reason::REFUSED_STREAM) && error.is_reset()
        || error.is_go_away() && error.is_remote() && head.method().is_idempotent()
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
        .handshake::<_, Bytes>(Coalesce::new(stream))
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

/// A new HTTP/1.1 connection to `target`, driven by whoever holds it.
async fn connect_h1(target: SocketAddr, timeout: Duration) -> Result<H1, SendError> {
    let stream = connect_tcp(target, timeout).await?;
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(Coalesce::new(stream)))
        .await
        .map_err(|e| SendError::Connect(e.to_string()))?;
    Ok(H1 {
        sender,
        connection: Some(Box::pin(connection)),
    })
}

impl Pool {
    /// A connection to `target` that can take a request now.
    fn take(&mut self, kind: HttpKind, target: SocketAddr) -> Option<Sender> {
        let now = Instant::now();
        self.sweep(now);
        let entries = self.connections.get_mut(&(target, kind))?;
        match kind {
            HttpKind::H2c => {
                let entry = entries.first_mut().filter(|e| !e.sender.is_closed())?;
                entry.used = now;
                let Sender::H2(sender) = &entry.sender else {
                    return None;
                };
                Some(Sender::H2(sender.clone()))
            }
            // Every pooled HTTP/1.1 connection is free (its last response was read in
            // whole): the most recently used, whose endpoint most likely still keeps it.
            HttpKind::Http1 => entries.pop().map(|entry| entry.sender),
        }
    }

    fn put(&mut self, kind: HttpKind, target: SocketAddr, sender: Sender) {
        let entries = self.connections.entry((target, kind)).or_default();
        if kind == HttpKind::H2c {
            // One HTTP/2 connection per endpoint: a newer one replaces a closed one.
            entries.clear();
        } else if entries.len() >= KEEP {
            // The oldest quarter, at once: the cost spreads over the next puts.
            entries.drain(..KEEP / 4);
        }
        entries.push(Entry {
            sender,
            used: Instant::now(),
        });
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
            entries.retain(|e| now.duration_since(e.used) < IDLE && !e.sender.is_closed());
        }
        self.connections.retain(|_, entries| !entries.is_empty());
    }
}
