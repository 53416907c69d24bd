//! Connections from a worker thread to the endpoints of HTTP ports, used directly with
//! hyper (no generic pool in between): per endpoint, one multiplexed HTTP/2 connection
//! for h2c and gRPC ports, and a set of keep-alive HTTP/1.1 connections for `http` ports,
//! each taking one request at a time. Writes are coalesced per turn of the worker's loop.
//! A connection the endpoint closed (or sent GOAWAY on) is dropped; a request it did not
//! take is sent once more on a new one. Connections unused for [`IDLE`] are closed, so
//! endpoints that left hold nothing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::coalesce::Coalesce;

/// A request or response body as weir forwards it.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

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
/// HTTP/1.1 connections looked at for a free one before a new one is made: the most
/// recently used, which are the likeliest to be free, so that a request costs the same
/// whatever the number of connections.
const LOOK_AT: usize = 16;
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
    Request(#[from] hyper::Error),
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
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

/// Sends `request` to `target` over one of this thread's connections to it, made when
/// there is none free.
pub async fn send(
    kind: HttpKind,
    target: SocketAddr,
    connect_timeout: Duration,
    request: Request<Body>,
) -> Result<Response<Incoming>, SendError> {
    let sender = match POOL.with(|pool| pool.borrow_mut().take(kind, target)) {
        Some(sender) => sender,
        None => connect(kind, target, connect_timeout).await?,
    };
    // A connection can close between being taken and being sent on: the request it did
    // not take goes once more, on a new connection.
    let request = match send_on(sender, kind, target, request).await? {
        Ok(response) => return Ok(response),
        Err(unsent) => unsent,
    };
    let sender = connect(kind, target, connect_timeout).await?;
    match send_on(sender, kind, target, request).await? {
        Ok(response) => Ok(response),
        Err(_) => Err(SendError::Connect(format!(
            "{target} closed two connections before taking a request"
        ))),
    }
}

/// The response, or the request back when the connection did not take it.
async fn send_on(
    sender: Sender,
    kind: HttpKind,
    target: SocketAddr,
    request: Request<Body>,
) -> Result<Result<Response<Incoming>, Request<Body>>, SendError> {
    let sent = match sender {
        Sender::H2(mut s) => s.try_send_request(request).await,
        Sender::H1(mut s) => {
            let sent = s.try_send_request(request).await;
            if sent.is_ok() {
                // Free again once this response's body is read: `take` checks.
                POOL.with(|pool| pool.borrow_mut().put(kind, target, Sender::H1(s)));
            }
            sent
        }
    };
    match sent {
        Ok(response) => Ok(Ok(response)),
        Err(mut error) => match error.take_message() {
            Some(unsent) => Ok(Err(unsent)),
            None => Err(SendError::Request(error.into_error())),
        },
    }
}

/// A new connection to `target`; an HTTP/2 one is kept as this thread's connection to
/// it at once (it takes any number of requests).
async fn connect(
    kind: HttpKind,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Sender, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(SendError::Connect(error.to_string())),
        Err(_) => return Err(SendError::Connect(format!("no answer in {timeout:?}"))),
    };
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Coalesce::new(stream));
    let handshake = |e: hyper::Error| SendError::Connect(e.to_string());
    match kind {
        HttpKind::H2c => {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(handshake)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%target, "connection to the endpoint ended: {error}");
                }
            });
            POOL.with(|pool| {
                pool.borrow_mut()
                    .put(kind, target, Sender::H2(sender.clone()))
            });
            Ok(Sender::H2(sender))
        }
        HttpKind::Http1 => {
            let (sender, connection) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(handshake)?;
            tokio::spawn(async move {
                // With upgrades: a WebSocket's 101 hands the connection over.
                if let Err(error) = connection.with_upgrades().await {
                    tracing::debug!(%target, "connection to the endpoint ended: {error}");
                }
            });
            Ok(Sender::H1(sender))
        }
    }
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
            HttpKind::Http1 => {
                let from = entries.len().saturating_sub(LOOK_AT);
                let ready = (from..entries.len())
                    .rev()
                    .find(|&i| match &entries[i].sender {
                        Sender::H1(s) => s.is_ready(),
                        Sender::H2(_) => false,
                    })?;
                Some(entries.remove(ready).sender)
            }
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
