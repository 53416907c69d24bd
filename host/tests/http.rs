//! HTTP Service ports end to end, in process: weir terminating HTTP/1.1 and h2c, real
//! HTTP backends (hyper, answering with their name), one client connection per case.
//! Addresses: 127.45.0.0/16 (Services on 127.45.0.x, backends on 127.45.1.x).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use weir::test_helpers::{Weir, guest_bytes, http_service_yaml, wait_until};

const T: u8 = 45;

fn ip(host: u8, n: u8) -> IpAddr {
    IpAddr::from([127, T, host, n])
}

/// An HTTP backend (HTTP/1.1 and h2c) answering every request with `name`.
struct Backend {
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn backend(address: SocketAddr) -> Backend {
    let listener = tokio::net::TcpListener::bind(address).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => accepted.unwrap(),
                () = token.cancelled() => return,
            };
            let name = address.to_string();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    // `/xff` and `/host`: the X-Forwarded-For and Host it was sent; `/hold`:
                    // its name, then a body that stays open for 30 s; `/slow`: its name
                    // after 1 s; else: its name.
                    let header = |name: &str| {
                        (request.headers().get(name))
                            .map(|v| v.to_str().unwrap_or("?").to_string())
                            .unwrap_or_else(|| "none".to_string())
                    };
                    let answer = if request.uri().path() == "/xff" {
                        header("x-forwarded-for")
                    } else if request.uri().path() == "/host" {
                        header("host")
                    } else {
                        name.clone()
                    };
                    let hold = request.uri().path() == "/hold";
                    let slow = request.uri().path() == "/slow";
                    async move {
                        if slow {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        let (sender, receiver) = tokio::sync::mpsc::channel::<
                            Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
                        >(2);
                        let _ = sender
                            .send(Ok(hyper::body::Frame::data(Bytes::from(answer + "\n"))))
                            .await;
                        if hold {
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                drop(sender);
                            });
                        }
                        let body = http_body_util::StreamBody::new(tokio_stream_from(receiver));
                        Ok::<_, std::convert::Infallible>(Response::new(body))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Backend { stop }
}

/// A Service `name` on 127.45.0.`n`:8000 with `app_protocol`, round-robin, to `endpoints`.
fn service(name: &str, n: u8, app_protocol: &str, endpoints: &[IpAddr]) -> String {
    http_service_yaml(name, ip(0, n), app_protocol, endpoints)
}

/// weir on `objects` with the library's `policy` shipped, and `config` after `[admin]`.
async fn start(objects: &[(&str, String)], policy: &str, config: &str) -> Weir {
    Weir::start(ip(0, 1), objects, &[(policy, guest_bytes(policy))], config).await
}

/// One client connection to `address` (HTTP/2 with prior knowledge when `h2`).
enum Connection {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    async fn open(address: SocketAddr, h2: bool) -> Connection {
        let stream = TokioIo::new(tokio::net::TcpStream::connect(address).await.unwrap());
        if h2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), stream)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            Connection::Http2(sender)
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(stream).await.unwrap();
            tokio::spawn(connection);
            Connection::Http1(sender)
        }
    }

    /// `GET /`: status and body.
    async fn get(&mut self) -> Result<(u16, String), String> {
        self.send(Request::get("http://weir/")).await
    }

    /// A request without a body: status and body.
    async fn send(
        &mut self,
        request: hyper::http::request::Builder,
    ) -> Result<(u16, String), String> {
        self.send_body(request, b"").await
    }

    /// `POST /` with `body` (its length known): status and body.
    async fn post(&mut self, body: &'static [u8]) -> Result<(u16, String), String> {
        self.send_body(Request::post("http://weir/"), body).await
    }

    async fn send_body(
        &mut self,
        request: hyper::http::request::Builder,
        body: &'static [u8],
    ) -> Result<(u16, String), String> {
        let request = request.body(Full::new(Bytes::from_static(body))).unwrap();
        let response = match self {
            Connection::Http1(sender) => {
                sender.ready().await.map_err(|e| e.to_string())?;
                sender.send_request(request).await
            }
            Connection::Http2(sender) => {
                sender.ready().await.map_err(|e| e.to_string())?;
                sender.send_request(request).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
            .await
            .map_err(|_| "no body in 5 s".to_string())?
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            status,
            String::from_utf8_lossy(&body).trim_end().to_string(),
        ))
    }
}

fn tally(answers: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for answer in answers {
        *counts.entry(answer.clone()).or_default() += 1;
    }
    counts
}

/// The complaint of kubernetes#38456: one long connection, every request to one pod.
/// Through weir each request is decided: 30 requests on one HTTP/1.1 keep-alive
/// connection, and 30 streams on one h2c connection, go 10/10/10 under round-robin.
/// An endpoint that leaves gets no request from the open connections, which go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_on_one_connection_is_decided() {
    let endpoints = [ip(1, 1), ip(1, 2), ip(1, 3)];
    let mut backends = Vec::new();
    for endpoint in endpoints {
        backends.push(backend(SocketAddr::new(endpoint, 8080)).await);
    }
    let objects = vec![
        ("web.yaml", service("web", 10, "http", &endpoints)),
        (
            "grpc.yaml",
            service("grpc", 11, "kubernetes.io/h2c", &endpoints),
        ),
    ];
    let weir = start(&objects, "round-robin", "metrics_linger = \"0s\"").await;
    let names = |hosts: &[u8]| -> BTreeMap<String, usize> {
        hosts
            .iter()
            .map(|n| (format!("{}:8080", ip(1, *n)), 30 / hosts.len()))
            .collect()
    };
    let mut open = Vec::new();
    for (n, h2) in [(10, false), (11, true)] {
        let mut connection = Connection::open(SocketAddr::new(ip(0, n), 8000), h2).await;
        let mut answers = Vec::new();
        for _ in 0..30 {
            let (status, body) = connection.get().await.unwrap();
            assert_eq!(status, 200, "{body}");
            answers.push(body);
        }
        assert_eq!(tally(&answers), names(&[1, 2, 3]), "h2: {h2}");
        open.push(connection);
    }

    // The third endpoint leaves; the same connections go on, without it.
    let changes = "weir_sync_proxy_rules_endpoint_changes_total";
    let before = weir.metric(changes);
    let two = [ip(1, 1), ip(1, 2)];
    weir.write_objects("web.yaml", &service("web", 10, "http", &two));
    weir.write_objects("grpc.yaml", &service("grpc", 11, "kubernetes.io/h2c", &two));
    wait_until("both changes are applied", Duration::from_secs(30), || {
        weir.metric(changes) >= before + 2
    })
    .await;
    for connection in &mut open {
        let mut answers = Vec::new();
        for _ in 0..30 {
            answers.push(connection.get().await.expect("not reset").1);
        }
        assert_eq!(tally(&answers), names(&[1, 2]));
    }
    let metrics = weir.metrics();
    assert!(
        metrics.contains(&format!(
            "weir_requests_total{{service=\"default/grpc:http\",endpoint=\"{}:8080\",code=\"200\"}}",
            ip(1, 1)
        )),
        "{metrics}"
    );
    // The departed endpoint's request series are gone with it.
    let gone = format!("{}:8080", ip(1, 3));
    wait_until(
        "the removed endpoint's series leave",
        Duration::from_secs(30),
        || !weir.metrics().contains(&format!("endpoint=\"{gone}\"")),
    )
    .await;
    drop(open);
    weir.shutdown().await;
    drop(backends);
}

/// A request whose endpoint cannot be reached is tried on another; with nothing
/// reachable, weir answers 503 and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoints_are_retried_then_answered_with_503() {
    // 127.45.2.1 has no backend: its connects are refused.
    let (alive, dead) = (ip(2, 2), ip(2, 1));
    let _backend = backend(SocketAddr::new(alive, 8080)).await;
    let objects = vec![
        ("half.yaml", service("half", 20, "http", &[dead, alive])),
        (
            "none.yaml",
            service("none", 21, "kubernetes.io/h2c", &[dead]),
        ),
    ];
    let weir = start(&objects, "round-robin", "").await;
    let mut half = Connection::open(SocketAddr::new(ip(0, 20), 8000), false).await;
    for _ in 0..10 {
        let (status, body) = half.get().await.unwrap();
        assert_eq!((status, body), (200, format!("{alive}:8080")));
    }
    // A small POST is replayed too (its body was read first); the backend answers it.
    let mut post = Connection::open(SocketAddr::new(ip(0, 20), 8000), false).await;
    for _ in 0..4 {
        let (status, body) = post.post(b"small body").await.unwrap();
        assert_eq!((status, body), (200, format!("{alive}:8080")));
    }
    let mut none = Connection::open(SocketAddr::new(ip(0, 21), 8000), true).await;
    let (status, body) = none.get().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("could be reached"), "{body}");
    assert!(
        weir.metric(
            "weir_requests_total{service=\"default/none:http\",endpoint=\"\",code=\"503\"}"
        ) >= 1
    );
    weir.shutdown().await;
}

/// gRPC through weir, framed by hand (no code generation): a bidirectional streaming call
/// on one h2c connection, where each message comes back as it is sent (streaming passes
/// through, nothing is buffered) and the `grpc-status` trailer arrives; then unary calls
/// (their small bodies are the ones weir keeps to retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_and_trailers_pass_through() {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let endpoint = SocketAddr::new(ip(3, 1), 8080);
    // An echo server: every gRPC message of the request is answered at once, then the
    // trailers.
    let listener = tokio::net::TcpListener::bind(endpoint).await.unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        let (sender, receiver) =
                            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(8);
                        let mut body = request.into_body();
                        tokio::spawn(async move {
                            while let Some(frame) = body.frame().await {
                                let Ok(frame) = frame else { return };
                                if let Ok(data) = frame.into_data() {
                                    let _ = sender.send(Ok(Frame::data(data))).await;
                                }
                            }
                            let mut trailers = hyper::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            let _ = sender.send(Ok(Frame::trailers(trailers))).await;
                        });
                        let stream = tokio_stream_from(receiver);
                        let mut response = Response::new(StreamBody::new(stream));
                        response
                            .headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let objects = vec![("grpc.yaml", service("echo", 30, "grpc", &[endpoint.ip()]))];
    let weir = start(&objects, "round-robin", "").await;
    let stream = tokio::net::TcpStream::connect(SocketAddr::new(ip(0, 30), 8000))
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let (to_server, requests) =
        tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(8);
    let request = Request::post("http://weir/echo.Echo/Chat")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(tokio_stream_from(requests)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    for n in 0u8..3 {
        // A gRPC message: uncompressed flag, length, payload.
        let message = Bytes::from(vec![0, 0, 0, 0, 1, n]);
        to_server
            .send(Ok(Frame::data(message.clone())))
            .await
            .unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("each message comes back before the call ends")
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        assert_eq!(echoed, message);
    }
    drop(to_server);
    let trailers = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_trailers()
        .expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");

    // Unary calls, on a connection of their own (their bodies have a known length).
    let stream = tokio::net::TcpStream::connect(SocketAddr::new(ip(0, 30), 8000))
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    for n in 0u8..3 {
        let message = Bytes::from(vec![0, 0, 0, 0, 2, n, n]);
        let request = Request::post("http://weir/echo.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(message.clone()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let collected = tokio::time::timeout(Duration::from_secs(5), response.collect())
            .await
            .expect("the unary call ends")
            .unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), message);
    }
    weir.shutdown().await;
}

/// A stream of a channel's items, for streaming bodies.
fn tokio_stream_from<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// `weir.dev/x-forwarded-for`: the endpoint learns the client's address, appended to
/// what the client sent; without it, nothing is added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_names_the_client() {
    let endpoint = ip(4, 1);
    let _backend = backend(SocketAddr::new(endpoint, 8080)).await;
    let tagged = service("tagged", 40, "http", &[endpoint]).replace(
        "weir.dev/policy: round-robin",
        "weir.dev/policy: round-robin\n    weir.dev/x-forwarded-for: \"true\"",
    );
    let objects = vec![
        ("tagged.yaml", tagged),
        ("plain.yaml", service("plain", 41, "http", &[endpoint])),
    ];
    let weir = start(&objects, "round-robin", "").await;
    let mut tagged = Connection::open(SocketAddr::new(ip(0, 40), 8000), false).await;
    let (_, seen) = tagged.send(Request::get("http://weir/xff")).await.unwrap();
    assert_eq!(seen, "127.0.0.1");
    let (_, seen) = tagged
        .send(Request::get("http://weir/xff").header("x-forwarded-for", "198.18.9.9"))
        .await
        .unwrap();
    assert_eq!(seen, "198.18.9.9, 127.0.0.1");
    let mut plain = Connection::open(SocketAddr::new(ip(0, 41), 8000), false).await;
    let (_, seen) = plain.send(Request::get("http://weir/xff")).await.unwrap();
    assert_eq!(seen, "none");
    // The Host the client asked for reaches the endpoint, from HTTP/1.1 and from an
    // HTTP/2 client's :authority alike.
    let (_, host) = plain
        .send(Request::get("http://shop.example/host"))
        .await
        .unwrap();
    assert_eq!(host, "shop.example");
    let mut h2 = Connection::open(SocketAddr::new(ip(0, 41), 8000), true).await;
    let (_, host) = h2
        .send(Request::get("http://shop.example/host"))
        .await
        .unwrap();
    assert_eq!(host, "shop.example");
    weir.shutdown().await;
}

/// An HTTP/1.1 upgrade (as WebSocket does) on an `appProtocol: http` port: forwarded,
/// and after the endpoint's 101 the bytes flow both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_joined_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let endpoint = SocketAddr::new(ip(5, 1), 8080);
    // A raw endpoint: reads a request head, agrees to switch, then echoes.
    let listener = tokio::net::TcpListener::bind(endpoint).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !head.contains("upgrade: echo") {
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
                    .await;
                let mut buffer = [0u8; 64];
                while let Ok(n) = stream.read(&mut buffer).await {
                    if n == 0 || stream.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let objects = vec![("ws.yaml", service("ws", 50, "http", &[endpoint.ip()]))];
    let weir = start(&objects, "round-robin", "").await;
    let mut stream = tokio::net::TcpStream::connect(SocketAddr::new(ip(0, 50), 8000))
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nhost: weir\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("an answer")
            .unwrap();
        assert_ne!(n, 0, "closed: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    for message in [&b"ping"[..], b"pong", b"bye"] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .expect("echoed")
            .unwrap();
        assert_eq!(echoed, message);
    }
    drop(stream);
    weir.shutdown().await;
}

/// A request is in flight until its response's body ends: under least-connections, a
/// long response (a gRPC stream, a download) keeps its endpoint busy, and new requests go
/// to the other one. (Counting it over at the response's head sent them to both.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_response_counts_as_in_flight_until_its_body_ends() {
    let endpoints = [ip(6, 1), ip(6, 2)];
    let mut backends = Vec::new();
    for endpoint in endpoints {
        backends.push(backend(SocketAddr::new(endpoint, 8080)).await);
    }
    let objects = vec![(
        "least.yaml",
        service("least", 60, "http", &endpoints).replace(
            "weir.dev/policy: round-robin",
            "weir.dev/policy: least-connections",
        ),
    )];
    let weir = start(&objects, "least-connections", "").await;
    let address = SocketAddr::new(ip(0, 60), 8000);
    // A held response: its head and first line arrive, its body stays open.
    let stream = TokioIo::new(tokio::net::TcpStream::connect(address).await.unwrap());
    let (mut holder, connection) = hyper::client::conn::http1::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    let held = holder
        .send_request(
            Request::get("http://weir/hold")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut held_body = held.into_body();
    let first = held_body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    let busy = String::from_utf8_lossy(&first).trim_end().to_string();
    let mut other = Connection::open(address, false).await;
    for _ in 0..10 {
        let (status, seen) = other.get().await.unwrap();
        assert_eq!(status, 200);
        assert_ne!(
            seen, busy,
            "a request went to the endpoint still busy with a response"
        );
    }
    // Once the held response is gone, both serve again.
    drop(held_body);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        seen.insert(other.get().await.unwrap().1);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    weir.shutdown().await;
    drop(backends);
}

/// A request head over the 64 KiB limit is answered 431, not forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_is_refused_with_431() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let endpoint = ip(7, 1);
    let _backend = backend(SocketAddr::new(endpoint, 8080)).await;
    let objects = vec![("big.yaml", service("big", 70, "http", &[endpoint]))];
    let weir = start(&objects, "round-robin", "").await;
    let mut stream = tokio::net::TcpStream::connect(SocketAddr::new(ip(0, 70), 8000))
        .await
        .unwrap();
    let filler = "a".repeat(100 * 1024);
    let request = format!("GET / HTTP/1.1\r\nhost: weir\r\nx-filler: {filler}\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(
        weir.metric(&format!(
            "weir_requests_total{{service=\"default/big:http\",endpoint=\"{endpoint}:8080\""
        )),
        0,
        "forwarded anyway"
    );
    weir.shutdown().await;
}

/// Contract 0.2.0 end to end: maglev hashing the `x-user` header (its `select-request`
/// reads the header through the host) keeps each user on one endpoint, over any number
/// of connections and both protocols, and spreads the users over the endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hashed_on_a_header_stick_to_one_endpoint_per_value() {
    let endpoints = [ip(8, 1), ip(8, 2), ip(8, 3)];
    let mut backends = Vec::new();
    for endpoint in endpoints {
        backends.push(backend(SocketAddr::new(endpoint, 8080)).await);
    }
    let yaml = service("users", 80, "kubernetes.io/h2c", &endpoints).replace(
        "weir.dev/policy: round-robin",
        "weir.dev/policy: maglev\n    weir.dev/policy-config: '{\"hash\": \"header\", \"header\": \"x-user\"}'",
    );
    let weir = start(&[("users.yaml", yaml)], "maglev", "").await;
    let address = SocketAddr::new(ip(0, 80), 8000);
    let mut reached: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for round in 0..3 {
        // A new connection each round: stickiness is the header's, not the connection's.
        let mut connection = Connection::open(address, round % 2 == 0).await;
        for user in 0..20 {
            let request = Request::get("http://weir/").header("x-user", format!("user-{user}"));
            let (status, body) = connection.send(request).await.unwrap();
            assert_eq!(status, 200, "{body}");
            reached
                .entry(format!("user-{user}"))
                .or_default()
                .insert(body);
        }
    }
    for (user, endpoints) in &reached {
        assert_eq!(endpoints.len(), 1, "{user} reached {endpoints:?}");
    }
    let used: std::collections::BTreeSet<&String> = reached.values().flatten().collect();
    assert!(used.len() >= 2, "20 users all on {used:?}");
    weir.shutdown().await;
    drop(backends);
}

/// Shutdown drains HTTP ports: an h2c client gets GOAWAY (no new stream starts on its
/// connection), a request in flight is answered in full, and an idle HTTP/1.1 keep-alive
/// connection is closed; then weir is done before its grace period ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_goaway_and_finishes_requests_in_flight() {
    let endpoint = ip(9, 1);
    let _backend = backend(SocketAddr::new(endpoint, 8080)).await;
    let objects = vec![
        (
            "h2.yaml",
            service("h2", 90, "kubernetes.io/h2c", &[endpoint]),
        ),
        ("h1.yaml", service("h1", 91, "http", &[endpoint])),
    ];
    let mut weir = start(
        &objects,
        "round-robin",
        "[proxy]\nshutdown_grace_period = \"20s\"",
    )
    .await;
    let mut h2 = Connection::open(SocketAddr::new(ip(0, 90), 8000), true).await;
    let mut h1 = Connection::open(SocketAddr::new(ip(0, 91), 8000), false).await;
    assert_eq!(h1.get().await.unwrap().0, 200);
    let Connection::Http2(sender) = &mut h2 else {
        unreachable!()
    };
    let mut idle = sender.clone();
    // In flight when the shutdown starts: answered after 1 s.
    let in_flight = {
        let mut sender = sender.clone();
        tokio::spawn(async move {
            let request = Request::get("http://weir/slow")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((status, body.to_bytes()))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(weir.app.take().unwrap().shutdown());
    // GOAWAY: the connection takes no new stream.
    wait_until(
        "the h2 connection refuses new streams",
        Duration::from_secs(10),
        || idle.is_closed() || !idle.is_ready(),
    )
    .await;
    let refused = idle
        .send_request(
            Request::get("http://weir/")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert!(refused.is_err(), "a new stream after GOAWAY was served");
    let (status, body) = in_flight
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(
        (status, &body[..]),
        (200, format!("{endpoint}:8080\n").as_bytes())
    );
    // The idle keep-alive connection is closed.
    let Connection::Http1(h1_sender) = &h1 else {
        unreachable!()
    };
    wait_until(
        "the idle HTTP/1.1 connection closes",
        Duration::from_secs(10),
        || h1_sender.is_closed(),
    )
    .await;
    let drained = tokio::time::timeout(Duration::from_secs(15), shutdown)
        .await
        .expect("drained before the grace period ends")
        .unwrap();
    assert!(!drained.forced, "nothing was cut");
    assert!(started.elapsed() < Duration::from_secs(15));
    drop((h1, h2));
}

/// An endpoint that says GOAWAY after every request (as a server restarting or recycling
/// connections does): weir opens another connection for the next request, and no client
/// request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_closing_its_connections_costs_no_request() {
    let endpoint = SocketAddr::new(ip(10, 1), 8080);
    let listener = tokio::net::TcpListener::bind(endpoint).await.unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let answered = std::sync::Arc::new(tokio::sync::Notify::new());
                let notify = answered.clone();
                let service = hyper::service::service_fn(move |_: Request<_>| {
                    notify.notify_one();
                    async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"recycled\n"),
                        )))
                    }
                });
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    () = answered.notified() => {}
                }
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            });
        }
    });
    let objects = vec![(
        "recycle.yaml",
        service("recycle", 100, "kubernetes.io/h2c", &[endpoint.ip()]),
    )];
    let weir = start(&objects, "round-robin", "").await;
    let mut client = Connection::open(SocketAddr::new(ip(0, 100), 8000), true).await;
    for _ in 0..10 {
        let (status, body) = client.get().await.unwrap();
        assert_eq!((status, body.as_str()), (200, "recycled"));
    }
    assert!(
        accepted.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "the endpoint's GOAWAY made weir reconnect"
    );
    weir.shutdown().await;
}
