//! Connections to the endpoints of h2c and gRPC ports: one multiplexed HTTP/2 connection
//! per endpoint and worker thread, used directly (no pool checkout, no per-request key
//! lookup beyond one map probe), its writes coalesced per turn of the worker's loop. A
//! connection the endpoint closed (or sent GOAWAY on) is replaced on the next request; a
//! request it did not take is sent again on the new one. One unused for
//! [`IDLE`] is closed, so endpoints that left hold nothing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::coalesce::Coalesce;
use super::http::Body;

/// A connection unused this long is closed.
const IDLE: Duration = Duration::from_secs(90);

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

struct Entry {
    sender: SendRequest<Body>,
    used: Instant,
}

#[derive(Default)]
struct Pool {
    connections: HashMap<SocketAddr, Entry>,
    swept: Option<Instant>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Sends `request` to `target` over this thread's connection to it.
pub async fn send(
    target: SocketAddr,
    connect_timeout: Duration,
    request: Request<Body>,
) -> Result<Response<Incoming>, SendError> {
    let now = Instant::now();
    let existing = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.sweep(now);
        let entry = pool.connections.get_mut(&target)?;
        entry.used = now;
        (!entry.sender.is_closed()).then(|| entry.sender.clone())
    });
    let mut sender = match existing {
        Some(sender) => sender,
        None => connect(target, connect_timeout).await?,
    };
    let mut request = request;
    for _ in 0..2 {
        if sender.ready().await.is_ok() {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    // Not taken: the connection was going away. Once more, on a new one.
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Request(error.into_error())),
                },
            }
        }
        sender = connect(target, connect_timeout).await?;
    }
    Err(SendError::Connect(format!(
        "{target} closed two connections before taking a request"
    )))
}

/// A new connection to `target`, kept as this thread's connection to it.
async fn connect(target: SocketAddr, timeout: Duration) -> Result<SendRequest<Body>, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(SendError::Connect(error.to_string())),
        Err(_) => return Err(SendError::Connect(format!("no answer in {timeout:?}"))),
    };
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(Coalesce::new(stream)))
        .await
        .map_err(|e| SendError::Connect(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%target, "connection to the endpoint ended: {error}");
        }
    });
    POOL.with(|pool| {
        pool.borrow_mut().connections.insert(
            target,
            Entry {
                sender: sender.clone(),
                used: Instant::now(),
            },
        )
    });
    Ok(sender)
}

impl Pool {
    /// Every so often, closes the connections unused for [`IDLE`] (and forgets closed
    /// ones): dropping the last sender ends a connection.
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|at| now.duration_since(at) < IDLE / 3)
        {
            return;
        }
        self.swept = Some(now);
        self.connections
            .retain(|_, e| now.duration_since(e.used) < IDLE && !e.sender.is_closed());
    }
}
