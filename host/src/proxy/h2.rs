//! HTTP/2 on both sides of an HTTP port, with the `h2` crate directly: no task per
//! stream and no channel hop per request. A client's connection and all of its streams
//! are one task on the worker's loop; a request to an endpoint is sent on the endpoint's
//! connection from the stream that asked, and its response awaited there.
//!
//! What hyper did for us and this file does instead: moving bodies into send streams
//! within flow control ([`pipe`]), reading received bodies as [`hyper::body::Body`]s
//! that give their flow-control window back as they are read ([`RecvBody`]), noticing a
//! client's RST_STREAM while its request is pending, and dropping the headers HTTP/2
//! forbids from responses an HTTP/1.1 endpoint wrote.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use h2::{Reason, RecvStream, SendStream};
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::{HeaderMap, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::ending::{End, Ending};

/// What a body that failed carries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body as weir sends it on: a client's request's, an endpoint's response's, or weir's
/// own answer.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A body of these bytes, all there (empty: one that has ended).
pub fn full(bytes: Bytes) -> Body {
    use http_body_util::BodyExt;
    let full = http_body_util::Full::new(bytes);
    full.map_err(|never| -> BoxError { match never {} }).boxed()
}

/// A body without data.
pub fn empty() -> Body {
    use http_body_util::BodyExt;
    let empty = http_body_util::Empty::new();
    empty
        .map_err(|never| -> BoxError { match never {} })
        .boxed()
}

/// Flow-control windows weir offers its peers, clients and endpoints alike: a stream may
/// have this much unread data in flight towards weir...
pub const STREAM_WINDOW: u32 = 1 << 20;
/// ...and a connection, over all of its streams, this much.
pub const CONNECTION_WINDOW: u32 = 4 << 20;

/// A received body (a request's from a client, a response's from an endpoint), read
/// frame by frame; each data frame's bytes are given back to the sender's window as it
/// is taken, and trailers follow the data.
pub struct RecvBody {
    stream: RecvStream,
    /// The sender's `content-length`, when it gave one.
    length: Option<u64>,
    data_done: bool,
    /// Known to have ended: asked of h2 once per frame, then answered from here (h2
    /// takes its connection's lock for each question, and a body is asked after every
    /// frame by each layer it goes through).
    ended: AtomicBool,
}

impl RecvBody {
    pub fn new(stream: RecvStream, headers: &HeaderMap) -> RecvBody {
        let length = (headers.get(hyper::header::CONTENT_LENGTH))
            .and_then(|value| value.to_str().ok()?.parse().ok());
        RecvBody {
            stream,
            length,
            data_done: false,
            ended: AtomicBool::new(false),
        }
    }
}

impl hyper::body::Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match self.stream.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    let ended = self.stream.is_end_stream();
                    self.ended.store(ended, Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
                Poll::Ready(None) => self.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match self.stream.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(error)) => Poll::Ready(Some(Err(error.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.ended.load(Ordering::Relaxed) {
            return true;
        }
        let ended = self.stream.is_end_stream();
        self.ended.store(ended, Ordering::Relaxed);
        ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(length) => SizeHint::with_exact(length),
            None => SizeHint::default(),
        }
    }
}

/// Why a body stopped going out.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("the peer reset the stream ({0:?})")]
    Reset(Reason),
    #[error("{0}")]
    Send(#[from] h2::Error),
    #[error("the body being sent failed: {0}")]
    Body(BoxError),
}

/// Sends `body` on `send` to its end (data, then trailers if any), taking no more data
/// from the body than the peer's window lets through; stops when the peer resets the
/// stream. A body that fails resets the stream, so the peer does not take a cut body
/// for a whole one.
pub async fn pipe<B>(body: B, mut send: SendStream<Bytes>) -> Result<(), PipeError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    loop {
        let frame = poll_fn(|cx| {
            if let Poll::Ready(reason) = send.poll_reset(cx) {
                return Poll::Ready(Err(match reason {
                    Ok(reason) => PipeError::Reset(reason),
                    Err(error) => PipeError::Send(error),
                }));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await?;
        let frame = match frame {
            None => return Ok(send.send_data(Bytes::new(), true)?),
            Some(Err(error)) => {
                send.send_reset(Reason::INTERNAL_ERROR);
                return Err(PipeError::Body(error.into()));
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                // A claim on the window only once there is data to send: claiming ahead
                // of it holds window other streams could use. The last frame goes
                // without waiting: h2 holds it until the window lets it through, and
                // holding one frame is what waiting for the first byte of window allows
                // anyway.
                if !data.is_empty() && !end {
                    send.reserve_capacity(1);
                    wait_for_capacity(&mut send).await?;
                }
                send.send_data(data, end)?;
                if end {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.reserve_capacity(0);
                    return Ok(send.send_trailers(trailers)?);
                }
            }
        }
    }
}

/// Until the stream may send at least one byte (h2 holds what goes past the window and
/// sends it as the window opens).
async fn wait_for_capacity(send: &mut SendStream<Bytes>) -> Result<(), PipeError> {
    while send.capacity() == 0 {
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(error)) => return Err(error.into()),
            None => return Err(PipeError::Reset(Reason::STREAM_CLOSED)),
        }
    }
    Ok(())
}

/// Headers about one hop, which HTTP/2 forbids (RFC 9113 8.2.2), taken out of a response
/// an HTTP/1.1 endpoint wrote; `te` is allowed only as `trailers`.
fn strip_connection_headers(headers: &mut HeaderMap) {
    use hyper::header;
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
}

/// How a client's HTTP/2 connection is served.
pub struct ServerLimits {
    pub max_streams: u32,
    pub max_header_bytes: u32,
}

/// Serves one client's HTTP/2 connection: each request is answered by `answer` (`Err`:
/// the policy dropped it, and the stream is reset), every stream a future of this task.
/// The answer comes boxed: a stream's future is moved once, into the connection's set
/// of streams, and a pointer is cheaper to move than a request's future.
/// Once `stop` is cancelled the client gets GOAWAY and the streams in flight finish;
/// `close` cuts everything.
pub async fn serve<T, A, F, E>(
    io: T,
    limits: ServerLimits,
    handshake_timeout: std::time::Duration,
    stop: CancellationToken,
    close: CancellationToken,
    mut answer: A,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    A: FnMut(Request<RecvBody>) -> Pin<Box<F>>,
    F: Future<Output = Result<Response<Body>, E>>,
{
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(limits.max_header_bytes)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(io);
    let mut connection = match tokio::time::timeout(handshake_timeout, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::debug!("HTTP/2 handshake: {error}");
            return;
        }
        Err(_) => return,
    };
    let mut streams = FuturesUnordered::new();
    let mut ending = Ending::new(stop, close);
    poll_fn(|cx| {
        match ending.poll(cx) {
            Poll::Ready(End::Cut) => return Poll::Ready(()),
            Poll::Ready(End::Drain) => connection.graceful_shutdown(),
            Poll::Pending => {}
        }
        loop {
            // Streams first: what they queue goes out when the connection is driven,
            // right after, in the same write.
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            match connection.poll_accept(cx) {
                Poll::Ready(Some(Ok((request, respond)))) => {
                    let (parts, stream) = request.into_parts();
                    let body = RecvBody::new(stream, &parts.headers);
                    streams.push(respond_to(
                        answer(Request::from_parts(parts, body)),
                        respond,
                    ));
                }
                Poll::Ready(Some(Err(error))) => {
                    tracing::debug!("HTTP/2 connection: {error}");
                    return Poll::Ready(());
                }
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
}

/// One stream: the answer's head, then its body; a client that resets the stream while
/// its answer is pending ends it.
async fn respond_to<F, E>(mut answer: Pin<Box<F>>, mut respond: h2::server::SendResponse<Bytes>)
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    let answered = poll_fn(|cx| match answer.as_mut().poll(cx) {
        Poll::Ready(answered) => Poll::Ready(Some(answered)),
        Poll::Pending => respond.poll_reset(cx).map(|_| None),
    })
    .await;
    drop(answer);
    // The client reset the stream first: nobody to answer.
    let Some(answered) = answered else {
        return;
    };
    let Ok(response) = answered else {
        respond.send_reset(Reason::INTERNAL_ERROR);
        return;
    };
    let (mut head, body) = response.into_parts();
    // An HTTP/2 endpoint's answer has none of HTTP/1.1's connection headers.
    if head.version != hyper::Version::HTTP_2 {
        strip_connection_headers(&mut head.headers);
    }
    if let Some(length) = body.size_hint().exact()
        && !body.is_end_stream()
    {
        (head.headers)
            .entry(hyper::header::CONTENT_LENGTH)
            .or_insert_with(|| length.into());
    }
    let end = body.is_end_stream();
    match respond.send_response(Response::from_parts(head, ()), end) {
        Ok(send) if !end => {
            if let Err(error) = pipe(body, send).await {
                tracing::debug!("response body: {error}");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::debug!("response: {error}"),
    }
}
