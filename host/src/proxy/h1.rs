//! weir's HTTP/1.1 client to endpoints: one connection, one request at a time, no task
//! and no channel of its own. The request's head is written into the connection's buffer
//! in one piece (with a small body, one write), the response's head is parsed in place
//! and its header values share the bytes read, and the response's body is read off the
//! connection by whoever reads the body; once it has ended the connection can take the
//! next request.
//!
//! Responses are delimited as RFC 9112 section 6.3 says: none for HEAD, 1xx, 204 and 304;
//! chunked when the last transfer coding is chunked; else by Content-Length; else by the
//! connection's close (which then cannot be reused). Interim 1xx responses are skipped. A
//! response that comes before the request's body has all gone ends the sending (and the
//! connection's reuse).

use std::future::poll_fn;
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode, Version};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use super::h2::{Body, BoxError};

/// The most header fields a response's head (or trailer section) may have.
const MAX_HEADERS: usize = 128;
/// Room made in the read buffer before a read.
const READ_SIZE: usize = 16 * 1024;
/// Request body gathered before it is written.
const WRITE_HIGH: usize = 64 * 1024;
/// A write buffer grown past this is given back once the request has gone.
const KEEP_CAPACITY: usize = 16 * 1024;
/// The longest chunk-size line (with extensions) taken.
const MAX_CHUNK_LINE: usize = 4096;

/// Why a request got no response, or a response's body no end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection was gone before any byte of a response came: the endpoint may not
    /// have seen the request at all.
    #[error("the endpoint closed the connection before answering")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the endpoint's response is malformed: {0}")]
    Malformed(&'static str),
    #[error("the endpoint's response head is over {0} bytes")]
    TooLarge(usize),
    #[error("request body: {0}")]
    Body(BoxError),
}

/// A keep-alive connection to an endpoint. Boxed: it moves from the pool into each
/// request's future and on into its response's body, and a pointer moves cheaper.
pub struct Connection(Box<State>);

/// A connection's socket and buffers.
pub struct State {
    io: TcpStream,
    /// Read and not yet taken.
    read: BytesMut,
    /// A request being written.
    write: Vec<u8>,
    /// The largest response head (and trailer section) taken.
    max_head: usize,
}

/// What is left of a request to write.
struct Sending {
    /// Bytes of `write` written.
    sent: usize,
    body: Option<Body>,
    chunked: bool,
}

/// A response's head, parsed.
struct Head {
    response: Response<()>,
    framing: Framing,
    keep_alive: bool,
}

/// How the rest of a response's body is delimited.
enum Framing {
    /// This many bytes are left (0: it has ended).
    Length(u64),
    Chunked(Chunk),
    /// Until the endpoint closes the connection.
    UntilClose,
}

/// Where a chunked body is.
#[derive(Clone, Copy)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// In a chunk's data: this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
    Done,
}

impl std::ops::Deref for Connection {
    type Target = State;

    fn deref(&self) -> &State {
        &self.0
    }
}

impl std::ops::DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.0
    }
}

impl Connection {
    pub fn new(io: TcpStream, max_head: usize) -> Connection {
        Connection(Box::new(State {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            max_head,
        }))
    }

    /// Whether the endpoint closed this idle connection (or sent on it unasked). Costs a
    /// system call only when the socket has become readable since the last response.
    pub fn is_stale(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                !matches!(self.io.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends a request, `write_head` writing its request line and header fields (but not
    /// those that frame the body: this adds them), and reads its response's head. The
    /// response's body holds the connection.
    pub async fn send(
        mut self,
        method: &Method,
        write_head: &(dyn Fn(&mut Vec<u8>) + Sync),
        body: Body,
    ) -> Result<Response<ResponseBody>, Error> {
        self.write.clear();
        write_head(&mut self.write);
        let body = (!body.is_end_stream()).then_some(body);
        let chunked = match &body {
            None => {
                if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                    self.write.extend_from_slice(b"content-length: 0\r\n");
                }
                false
            }
            Some(body) => match body.size_hint().exact() {
                Some(length) => {
                    let _ = write!(self.write, "content-length: {length}\r\n");
                    false
                }
                None => {
                    self.write
                        .extend_from_slice(b"transfer-encoding: chunked\r\n");
                    true
                }
            },
        };
        self.write.extend_from_slice(b"\r\n");
        let mut sending = Sending {
            sent: 0,
            body,
            chunked,
        };
        let head_request = *method == Method::HEAD;
        let mut interim = false;
        let head = poll_fn(|cx| {
            if let Err(error) = self.poll_send(cx, &mut sending) {
                return Poll::Ready(Err(error));
            }
            self.poll_head(cx, head_request, &mut interim)
        })
        .await?;
        // An answer before the whole request went: the rest is not sent, and the
        // endpoint would read what follows as the rest of it.
        let sent_whole = sending.body.is_none() && sending.sent == self.write.len();
        // A large body's buffer is not kept by a connection that goes back to the pool.
        if self.write.capacity() > KEEP_CAPACITY {
            self.write = Vec::new();
        }
        let (parts, ()) = head.response.into_parts();
        let body = ResponseBody {
            connection: self,
            framing: head.framing,
            keep_alive: head.keep_alive && sent_whole,
        };
        Ok(Response::from_parts(parts, body))
    }
}

impl State {
    /// Writes what there is of the request, taking its body's data as it comes.
    fn poll_send(&mut self, cx: &mut Context<'_>, sending: &mut Sending) -> Result<(), Error> {
        loop {
            while self.write.len() - sending.sent < WRITE_HIGH
                && let Some(body) = &mut sending.body
            {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        let end = body.is_end_stream();
                        match frame.into_data() {
                            Ok(data) => put_data(&mut self.write, &data, sending.chunked),
                            Err(frame) => {
                                if let (Ok(trailers), true) =
                                    (frame.into_trailers(), sending.chunked)
                                {
                                    put_last_chunk(&mut self.write, Some(&trailers));
                                    sending.chunked = false;
                                }
                            }
                        }
                        if end {
                            sending.finish(&mut self.write);
                        }
                    }
                    Poll::Ready(Some(Err(error))) => return Err(Error::Body(error)),
                    Poll::Ready(None) => sending.finish(&mut self.write),
                    Poll::Pending => break,
                }
            }
            if sending.sent == self.write.len() {
                return Ok(());
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.write[sending.sent..]) {
                Poll::Ready(Ok(0)) => return Err(Error::Io(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => {
                    sending.sent += written;
                    if sending.sent < self.write.len() && sending.body.is_some() {
                        // Room for more of the body without the buffer growing.
                        self.write.drain(..sending.sent);
                        sending.sent = 0;
                    }
                }
                Poll::Ready(Err(error)) if gone(&error) && self.read.is_empty() => {
                    return Err(Error::Closed);
                }
                Poll::Ready(Err(error)) => return Err(Error::Io(error)),
                Poll::Pending => return Ok(()),
            }
        }
    }

    /// Reads until a final response's head has come, skipping interim (1xx) ones.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
        interim: &mut bool,
    ) -> Poll<Result<Head, Error>> {
        loop {
            if !self.read.is_empty()
                && let Some(head) = parse_head(&mut self.read, head_request, self.max_head)?
            {
                let status = head.response.status();
                if status.is_informational() {
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        return Poll::Ready(Err(Error::Malformed(
                            "101 to a request without Upgrade",
                        )));
                    }
                    *interim = true;
                    continue;
                }
                return Poll::Ready(Ok(head));
            }
            let nothing_yet = self.read.is_empty() && !*interim;
            match ready!(self.poll_read(cx)) {
                Ok(0) if nothing_yet => return Poll::Ready(Err(Error::Closed)),
                Ok(0) => {
                    return Poll::Ready(Err(Error::Malformed(
                        "the connection closed in the response's head",
                    )));
                }
                Ok(_) => {}
                Err(error) if nothing_yet && gone(&error) => {
                    return Poll::Ready(Err(Error::Closed));
                }
                Err(error) => return Poll::Ready(Err(Error::Io(error))),
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_SIZE / 4 {
            self.read.reserve(READ_SIZE);
        }
        poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }
}

impl Sending {
    /// The body has ended: the last chunk goes too.
    fn finish(&mut self, write: &mut Vec<u8>) {
        if self.chunked {
            put_last_chunk(write, None);
        }
        self.body = None;
    }
}

/// Whether an error says the endpoint had closed the connection.
fn gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

fn put_data(write: &mut Vec<u8>, data: &Bytes, chunked: bool) {
    if data.is_empty() {
        return;
    }
    if chunked {
        let _ = write!(write, "{:x}\r\n", data.len());
    }
    write.extend_from_slice(data);
    if chunked {
        write.extend_from_slice(b"\r\n");
    }
}

fn put_last_chunk(write: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    write.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        put_field(write, name, value);
    }
    write.extend_from_slice(b"\r\n");
}

/// One header field line.
pub fn put_field(write: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    write.extend_from_slice(name.as_str().as_bytes());
    write.extend_from_slice(b": ");
    write.extend_from_slice(value.as_bytes());
    write.extend_from_slice(b"\r\n");
}

/// A response's head from the front of `read` (taken off it), once all of it is there.
fn parse_head(read: &mut BytesMut, head_request: bool, max: usize) -> Result<Option<Head>, Error> {
    let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let parsing = httparse::ParserConfig::default();
    let length = match parsing.parse_response_with_uninit_headers(&mut parsed, read, &mut fields) {
        Ok(httparse::Status::Complete(length)) if length <= max => length,
        Ok(httparse::Status::Partial) if read.len() <= max => return Ok(None),
        Ok(_) => return Err(Error::TooLarge(max)),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Malformed("too many header fields"));
        }
        Err(_) => return Err(Error::Malformed("not an HTTP/1.1 response head")),
    };
    let status = (parsed.code)
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Error::Malformed("no valid status code"))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Where each field is in the head, so that the values can share its bytes.
    let base = read.as_ptr() as usize;
    let spans: Vec<_> = (parsed.headers.iter())
        .map(|field| {
            let name = field.name.as_ptr() as usize - base;
            let value = field.value.as_ptr() as usize - base;
            (
                name..name + field.name.len(),
                value..value + field.value.len(),
            )
        })
        .collect();
    let head = read.split_to(length).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut content_length = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive = false;
    for (name, value) in spans {
        let name = HeaderName::from_bytes(&head[name])
            .map_err(|_| Error::Malformed("an invalid header field name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value))
            .map_err(|_| Error::Malformed("an invalid header field value"))?;
        if name == header::CONTENT_LENGTH {
            let length = parse_length(value.as_bytes())?;
            if content_length.is_some_and(|earlier| earlier != length) {
                return Err(Error::Malformed("differing Content-Length fields"));
            }
            content_length = Some(length);
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            chunked = tokens(&value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            close |= tokens(&value).any(|t| t.eq_ignore_ascii_case(b"close"));
            keep_alive |= tokens(&value).any(|t| t.eq_ignore_ascii_case(b"keep-alive"));
        }
        headers.append(name, value);
    }
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if transfer_encoding {
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::UntilClose
        }
    } else {
        content_length.map_or(Framing::UntilClose, Framing::Length)
    };
    let keep_alive = !close
        && (version == Version::HTTP_11 || keep_alive)
        && !matches!(framing, Framing::UntilClose)
        // Both framings at once: a smuggling attempt or a broken endpoint.
        && !(transfer_encoding && content_length.is_some());
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Some(Head {
        response,
        framing,
        keep_alive,
    }))
}

/// The comma-separated tokens of a field value, trimmed.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    (value.as_bytes().split(|&b| b == b','))
        .map(|token| token.trim_ascii())
        .filter(|token| !token.is_empty())
}

fn parse_length(value: &[u8]) -> Result<u64, Error> {
    let invalid = Error::Malformed("an invalid Content-Length");
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return Err(invalid);
    }
    Ok(value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// A response's body, read off its connection.
pub struct ResponseBody {
    connection: Connection,
    framing: Framing,
    keep_alive: bool,
}

/// What decoding a chunked body gave.
enum Decoded {
    Frame(Frame<Bytes>),
    /// More bytes are needed.
    More,
    End,
}

impl ResponseBody {
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            let max_head = self.connection.max_head;
            let read = &mut self.connection.read;
            match &mut self.framing {
                Framing::Length(0) => return Poll::Ready(None),
                Framing::Length(left) if !read.is_empty() => {
                    let n = (*left).min(read.len() as u64);
                    *left -= n;
                    return Poll::Ready(Some(Ok(Frame::data(read.split_to(n as usize).freeze()))));
                }
                Framing::UntilClose if !read.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(read.split().freeze()))));
                }
                Framing::Chunked(chunk) => match decode(chunk, read, max_head) {
                    Ok(Decoded::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
                    Ok(Decoded::End) => {
                        self.framing = Framing::Length(0);
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::More) => {}
                    Err(error) => return Poll::Ready(Some(Err(error))),
                },
                _ => {}
            }
            match ready!(self.connection.poll_read(cx)) {
                Ok(0) if matches!(self.framing, Framing::UntilClose) => {
                    self.framing = Framing::Length(0);
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return Poll::Ready(Some(Err(Error::Malformed(
                        "the connection closed in the response's body",
                    ))));
                }
                Ok(_) => {}
                Err(error) => return Poll::Ready(Some(Err(Error::Io(error)))),
            }
        }
    }

    pub fn is_end_stream(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunk::Done)
        )
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }

    /// The connection, when the body has ended and it can take another request.
    pub fn into_connection(self) -> Option<Connection> {
        (self.is_end_stream() && self.keep_alive && self.connection.read.is_empty())
            .then_some(self.connection)
    }
}

/// Takes what it can of a chunked body off the front of `read`.
fn decode(chunk: &mut Chunk, read: &mut BytesMut, max_head: usize) -> Result<Decoded, Error> {
    loop {
        match *chunk {
            Chunk::Size => {
                let Some(end) = read.windows(2).position(|w| w == b"\r\n") else {
                    if read.len() > MAX_CHUNK_LINE {
                        return Err(Error::Malformed("a chunk-size line too long"));
                    }
                    return Ok(Decoded::More);
                };
                let size = parse_chunk_size(&read[..end])?;
                read.advance(end + 2);
                *chunk = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if read.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = left.min(read.len() as u64);
                *chunk = if n == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n)
                };
                return Ok(Decoded::Frame(Frame::data(
                    read.split_to(n as usize).freeze(),
                )));
            }
            Chunk::DataEnd => {
                if read.len() < 2 {
                    return Ok(Decoded::More);
                }
                if &read[..2] != b"\r\n" {
                    return Err(Error::Malformed("a chunk's data is longer than its size"));
                }
                read.advance(2);
                *chunk = Chunk::Size;
            }
            Chunk::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let length = match httparse::parse_headers(read, &mut fields) {
                    Ok(httparse::Status::Complete((length, _))) if length <= max_head => length,
                    Ok(httparse::Status::Partial) if read.len() <= max_head => {
                        return Ok(Decoded::More);
                    }
                    Ok(_) => return Err(Error::TooLarge(max_head)),
                    Err(_) => return Err(Error::Malformed("an invalid trailer section")),
                };
                let mut trailers = HeaderMap::new();
                for field in fields.iter().take_while(|f| !f.name.is_empty()) {
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(field.name.as_bytes()),
                        HeaderValue::from_bytes(field.value),
                    ) {
                        trailers.append(name, value);
                    }
                }
                read.advance(length);
                *chunk = Chunk::Done;
                if !trailers.is_empty() {
                    return Ok(Decoded::Frame(Frame::trailers(trailers)));
                }
            }
            Chunk::Done => return Ok(Decoded::End),
        }
    }
}

/// A chunk-size line's size (its extensions are ignored).
fn parse_chunk_size(line: &[u8]) -> Result<u64, Error> {
    let invalid = Error::Malformed("an invalid chunk size");
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 15 || !(rest.is_empty() || rest[0] == b';') {
        return Err(invalid);
    }
    let hex = std::str::from_utf8(&line[..digits])
        .map_err(|_| Error::Malformed("an invalid chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| invalid)
}

#[cfg(test)]
mod tests {
    use super::super::h2::{empty, full};
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// An endpoint that answers each request head it reads with the next of `answers`,
    /// and closes at the head after the last; it returns all it read.
    async fn endpoint(
        answers: Vec<&'static [u8]>,
    ) -> (Connection, tokio::task::JoinHandle<Vec<u8>>) {
        serve(answers, false).await
    }

    /// An endpoint that closes right after its one answer.
    async fn closing_endpoint(
        answer: &'static [u8],
    ) -> (Connection, tokio::task::JoinHandle<Vec<u8>>) {
        serve(vec![answer], true).await
    }

    async fn serve(
        answers: Vec<&'static [u8]>,
        close_after_last: bool,
    ) -> (Connection, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut heads = 0;
            let mut answers = answers.into_iter();
            let mut buf = [0u8; 4096];
            loop {
                let n = socket.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return seen;
                }
                seen.extend_from_slice(&buf[..n]);
                let count = seen.windows(4).filter(|w| w == b"\r\n\r\n").count();
                while heads < count {
                    heads += 1;
                    match answers.next() {
                        Some(answer) => socket.write_all(answer).await.unwrap(),
                        None => return seen,
                    }
                    if close_after_last && answers.len() == 0 {
                        return seen;
                    }
                }
            }
        });
        let stream = TcpStream::connect(address).await.unwrap();
        (Connection::new(stream, 1024), served)
    }

    fn get(out: &mut Vec<u8>) {
        out.extend_from_slice(b"GET / HTTP/1.1\r\nhost: test\r\n");
    }

    fn post(out: &mut Vec<u8>) {
        out.extend_from_slice(b"POST /upload HTTP/1.1\r\nhost: test\r\n");
    }

    fn streamed(chunks: &[&'static str]) -> Body {
        let frames: Vec<Result<_, BoxError>> = (chunks.iter())
            .map(|chunk| Ok(Frame::data(Bytes::from_static(chunk.as_bytes()))))
            .collect();
        StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    async fn send(
        connection: Connection,
        method: Method,
        head: fn(&mut Vec<u8>),
        body: Body,
    ) -> Result<Response<ResponseBody>, Error> {
        let sent = connection.send(&method, &head, body);
        tokio::time::timeout(DEADLINE, sent)
            .await
            .expect("an answer in time")
    }

    /// The body's data and trailers, and its connection if it can be used again.
    async fn read_all(mut body: ResponseBody) -> (Vec<u8>, Option<HeaderMap>, Option<Connection>) {
        let mut data = Vec::new();
        let mut trailers = None;
        loop {
            let frame = tokio::time::timeout(DEADLINE, poll_fn(|cx| body.poll_frame(cx)))
                .await
                .expect("the body in time");
            let Some(frame) = frame else { break };
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        (data, trailers, body.into_connection())
    }

    #[tokio::test]
    async fn a_kept_connection_takes_the_next_request_after_a_sized_body() {
        let (connection, served) = endpoint(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\nx-a: 1\r\n\r\ngone",
        ])
        .await;
        let response = send(connection, Method::GET, get, empty()).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.body().size_hint().exact(), Some(5));
        let (data, _, connection) = read_all(response.into_body()).await;
        assert_eq!(data, b"hello");
        let connection = connection.expect("kept alive");
        let response = send(connection, Method::GET, get, empty()).await.unwrap();
        assert_eq!(response.status(), 404);
        assert_eq!(response.headers()["x-a"], "1");
        let (data, _, connection) = read_all(response.into_body()).await;
        assert_eq!(data, b"gone");
        drop(connection);
        let seen = served.await.unwrap();
        assert_eq!(seen.windows(3).filter(|w| w == b"GET").count(), 2);
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_with_their_trailers() {
        let (connection, _served) = endpoint(vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n",
        ])
        .await;
        let response = send(connection, Method::GET, get, empty()).await.unwrap();
        assert_eq!(response.body().size_hint().exact(), None);
        let (data, trailers, connection) = read_all(response.into_body()).await;
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
        assert!(
            connection.is_some(),
            "a chunked body ends cleanly: kept alive"
        );
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let (connection, _served) = endpoint(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let response = send(connection, Method::GET, get, empty()).await.unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(read_all(response.into_body()).await.0, b"ok");
    }

    #[tokio::test]
    async fn head_204_and_304_answers_have_no_body() {
        for (method, answer) in [
            (
                Method::HEAD,
                &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"[..],
            ),
            (Method::GET, b"HTTP/1.1 204 No Content\r\n\r\n"),
            (
                Method::GET,
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            ),
        ] {
            let (connection, _served) = endpoint(vec![answer]).await;
            let response = send(connection, method, get, empty()).await.unwrap();
            assert!(response.body().is_end_stream(), "{answer:?}");
            let (data, _, connection) = read_all(response.into_body()).await;
            assert!(data.is_empty());
            assert!(connection.is_some(), "{answer:?}: kept alive");
        }
    }

    #[tokio::test]
    async fn a_body_without_length_runs_to_the_close_and_ends_the_connection() {
        let (connection, served) = closing_endpoint(b"HTTP/1.1 200 OK\r\n\r\nall of it").await;
        let response = send(connection, Method::GET, get, empty()).await.unwrap();
        let (data, _, connection) = read_all(response.into_body()).await;
        assert_eq!(data, b"all of it");
        assert!(connection.is_none());
        served.await.unwrap();
    }

    #[tokio::test]
    async fn connections_the_endpoint_means_to_close_are_not_kept() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx"[..],
            b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nx",
            // Both framings: decoded as chunked, and never trusted again.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        ] {
            let (connection, _served) = endpoint(vec![answer, answer]).await;
            let response = send(connection, Method::GET, get, empty()).await.unwrap();
            let (data, _, connection) = read_all(response.into_body()).await;
            assert_eq!(data, b"x");
            assert!(connection.is_none(), "{answer:?}");
        }
        let answer =
            &b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\nx"[..];
        let (connection, _served) = endpoint(vec![answer]).await;
        let response = send(connection, Method::GET, get, empty()).await.unwrap();
        assert!(read_all(response.into_body()).await.2.is_some());
    }

    #[tokio::test]
    async fn malformed_and_missing_answers_are_errors() {
        type Expected = fn(&Error) -> bool;
        let cases: [(&[u8], Expected); 4] = [
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                |e| matches!(e, Error::Malformed(_)),
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", |e| {
                matches!(e, Error::Malformed(_))
            }),
            (b"SSH-2.0-OpenSSH\r\n\r\n", |e| {
                matches!(e, Error::Malformed(_))
            }),
            (b"", |e| matches!(e, Error::Closed)),
        ];
        for (answer, expected) in cases {
            let answers = if answer.is_empty() {
                vec![]
            } else {
                vec![answer]
            };
            let (connection, _served) = endpoint(answers).await;
            let error = send(connection, Method::GET, get, empty())
                .await
                .err()
                .unwrap();
            assert!(expected(&error), "{answer:?}: {error}");
        }
        // The head is over the connection's limit (1024 bytes here).
        let huge: &'static [u8] = Box::leak(
            format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "a".repeat(2000))
                .into_bytes()
                .into_boxed_slice(),
        );
        let (connection, _served) = endpoint(vec![huge]).await;
        let error = send(connection, Method::GET, get, empty())
            .await
            .err()
            .unwrap();
        assert!(matches!(error, Error::TooLarge(1024)), "{error}");
    }

    #[tokio::test]
    async fn request_bodies_are_framed_by_length_or_chunked() {
        let ok = &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..];
        let (connection, served) = endpoint(vec![ok, ok, ok]).await;
        let sized = full(Bytes::from_static(b"abc"));
        let response = send(connection, Method::POST, post, sized).await.unwrap();
        let connection = read_all(response.into_body()).await.2.unwrap();
        let response = send(
            connection,
            Method::POST,
            post,
            streamed(&["hello", " world"]),
        )
        .await
        .unwrap();
        let connection = read_all(response.into_body()).await.2.unwrap();
        let response = send(connection, Method::POST, post, empty()).await.unwrap();
        drop(read_all(response.into_body()).await);
        let seen = String::from_utf8(served.await.unwrap()).unwrap();
        let requests: Vec<&str> = seen.split("POST ").skip(1).collect();
        assert_eq!(requests.len(), 3, "{seen}");
        assert!(
            requests[0].ends_with("content-length: 3\r\n\r\nabc"),
            "{}",
            requests[0]
        );
        assert!(
            requests[1].ends_with(
                "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            ),
            "{}",
            requests[1]
        );
        assert!(
            requests[2].ends_with("content-length: 0\r\n\r\n"),
            "{}",
            requests[2]
        );
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_body_ends_the_sending() {
        let (connection, _served) = endpoint(vec![
            b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\n\r\n",
        ])
        .await;
        // A body that never ends.
        let endless = StreamBody::new(futures::stream::pending::<Result<Frame<Bytes>, BoxError>>());
        let response = send(connection, Method::POST, post, endless.boxed())
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        assert!(
            read_all(response.into_body()).await.2.is_none(),
            "half a request went: not kept"
        );
    }

    #[tokio::test]
    async fn a_connection_the_endpoint_closed_is_stale() {
        let (connection, served) =
            endpoint(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
        let response = send(connection, Method::GET, get, empty()).await.unwrap();
        let mut connection = read_all(response.into_body()).await.2.unwrap();
        assert!(!connection.is_stale());
        // The endpoint has no more answers: it closes once it reads the next head.
        connection
            .io
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        served.await.unwrap();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !connection.is_stale() {
            assert!(tokio::time::Instant::now() < deadline, "never seen closed");
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a").unwrap(), 26);
        assert_eq!(parse_chunk_size(b"FF ; name=value").unwrap(), 255);
        for bad in [&b""[..], b"zz", b"1 2", b";ext", b"1111111111111111"] {
            assert!(parse_chunk_size(bad).is_err(), "{bad:?}");
        }
    }
}
