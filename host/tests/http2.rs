//! The edges of HTTP/2 on both sides of an HTTP port, against endpoints written with
//! the `h2` crate or by hand on a raw socket, so that each can misbehave exactly as a
//! real one does: refusing streams, writing HTTP/1.1-only headers. Clients are hyper's.
//! Addresses: 127.46.0.0/16 (Services on 127.46.0.x, endpoints on 127.46.1.x).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::test_helpers::{Weir, guest_bytes, http_service_yaml};

fn ip(host: u8, n: u8) -> IpAddr {
    IpAddr::from([127, 46, host, n])
}

async fn start(objects: &[(&str, String)]) -> Weir {
    let policy = "round-robin";
    Weir::start(ip(0, 1), objects, &[(policy, guest_bytes(policy))], "").await
}

/// `GET /` on a new HTTP/2 (`h2`) or HTTP/1.1 connection with `headers`: status and body.
async fn get(address: SocketAddr, h2: bool, headers: &[(&str, &str)]) -> (u16, String) {
    let stream = TokioIo::new(tokio::net::TcpStream::connect(address).await.unwrap());
    let mut request = Request::get(format!("http://{address}/"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::<Bytes>::new()).unwrap();
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), stream)
                .await
                .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(stream).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await
    };
    let response = response.expect("an answer");
    let status = response.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .expect("a body in 5 s")
        .expect("a whole body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An HTTP/1.1 endpoint written by hand: on each connection it reads one request's head,
/// writes `answer` as it is, and closes the connection, whatever the answer said. Returns
/// how many connections it has taken.
async fn raw_http1_endpoint(address: SocketAddr, answer: &'static str) -> Arc<AtomicUsize> {
    let listener = tokio::net::TcpListener::bind(address).await.unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n @ 1..) = stream.read(&mut buffer).await else {
                        return;
                    };
                    request.extend_from_slice(&buffer[..n]);
                }
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    accepted
}

/// An HTTP/2 endpoint written with the `h2` crate: `on_stream` gets each stream with its
/// number on its connection (0 for the first), and answers it, resets it or keeps it.
async fn h2_endpoint<F>(address: SocketAddr, on_stream: F)
where
    F: Fn(usize, Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind(address).await.unwrap();
    let on_stream = Arc::new(on_stream);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let on_stream = on_stream.clone();
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(stream).await.unwrap();
                let mut n = 0;
                while let Some(Ok((request, respond))) = connection.accept().await {
                    on_stream(n, request, respond);
                    n += 1;
                }
            });
        }
    });
}

/// Answers a stream 200 with `body`.
fn answer(mut respond: h2::server::SendResponse<Bytes>, body: impl Into<Bytes>) {
    let mut sending = respond
        .send_response(hyper::Response::new(()), false)
        .unwrap();
    sending.send_data(body.into(), true).unwrap();
}

/// An endpoint that refuses the first stream of every connection (RST_STREAM with
/// REFUSED_STREAM: "not processed, try again"), as a server at its stream limit does:
/// weir sends the request once more, on a new connection, and the client never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_again() {
    let endpoint = SocketAddr::new(ip(1, 1), 8080);
    let (refused, served) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (refusals, answers) = (refused.clone(), served.clone());
    h2_endpoint(endpoint, move |n, _, mut respond| {
        if n == 0 {
            refusals.fetch_add(1, Ordering::Relaxed);
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        } else {
            answers.fetch_add(1, Ordering::Relaxed);
            answer(respond, "second try");
        }
    })
    .await;
    let objects = vec![(
        "refuse.yaml",
        http_service_yaml("refuse", ip(0, 10), "kubernetes.io/h2c", &[endpoint.ip()]),
    )];
    let weir = start(&objects).await;
    let service = SocketAddr::new(ip(0, 10), 8000);
    assert_eq!(get(service, true, &[]).await, (200, "second try".into()));
    assert_eq!(get(service, false, &[]).await, (200, "second try".into()));
    assert_eq!(
        refused.load(Ordering::Relaxed),
        2,
        "one refusal per connection"
    );
    assert_eq!(served.load(Ordering::Relaxed), 2);
    weir.shutdown().await;
}

/// An HTTP/1.1 endpoint writing the headers HTTP/1.1 keeps for one hop (`Connection`,
/// `Keep-Alive`, `Transfer-Encoding`), as nginx does: they are not passed to an HTTP/2
/// client, which would take the response as malformed and fail the stream; the body,
/// chunked on the endpoint's side, arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_only_response_headers_stay_off_http2() {
    let endpoint = SocketAddr::new(ip(1, 2), 8080);
    let answer = "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
        Transfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n\
        6\r\nhello \r\n8\r\nthrough!\r\n0\r\n\r\n";
    let _ = raw_http1_endpoint(endpoint, answer).await;
    let objects = vec![(
        "hop.yaml",
        http_service_yaml("hop", ip(0, 11), "http", &[endpoint.ip()]),
    )];
    let weir = start(&objects).await;
    let service = SocketAddr::new(ip(0, 11), 8000);
    assert_eq!(
        get(service, true, &[]).await,
        (200, "hello through!".into())
    );
    assert_eq!(
        get(service, false, &[]).await,
        (200, "hello through!".into())
    );
    weir.shutdown().await;
}

/// `TE` other than `trailers` is HTTP/1.1's own and HTTP/2 forbids it: an HTTP/1.1
/// client's `TE: gzip` is left out of the request to an h2c endpoint (else the request
/// could not be sent), and `TE: trailers`, which gRPC needs, goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_goes_to_http2_endpoints_only_as_trailers() {
    let endpoint = SocketAddr::new(ip(1, 3), 8080);
    h2_endpoint(endpoint, |_, request, respond| {
        let te = (request.headers().get("te"))
            .map(|te| te.to_str().unwrap().to_string())
            .unwrap_or_else(|| "none".into());
        answer(respond, format!("te: {te}"));
    })
    .await;
    let objects = vec![(
        "te.yaml",
        http_service_yaml("te", ip(0, 12), "kubernetes.io/h2c", &[endpoint.ip()]),
    )];
    let weir = start(&objects).await;
    let service = SocketAddr::new(ip(0, 12), 8000);
    let gzip = [("te", "gzip")];
    assert_eq!(get(service, false, &gzip).await, (200, "te: none".into()));
    let trailers = [("te", "trailers")];
    assert_eq!(
        get(service, false, &trailers).await,
        (200, "te: trailers".into())
    );
    assert_eq!(
        get(service, true, &trailers).await,
        (200, "te: trailers".into())
    );
    weir.shutdown().await;
}

/// A client that gives up on a request (RST_STREAM) frees the endpoint's stream too:
/// weir resets its stream to the endpoint (CANCEL) instead of waiting for an answer
/// nobody will read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_reaches_the_endpoint() {
    let endpoint = SocketAddr::new(ip(1, 4), 8080);
    let (reset_seen, mut reset) = tokio::sync::mpsc::channel(1);
    let (stream_seen, mut arrived) = tokio::sync::mpsc::channel(1);
    h2_endpoint(endpoint, move |_, _, mut respond| {
        let _ = stream_seen.try_send(());
        // Never answers; tells what the stream's end was.
        let reset_seen = reset_seen.clone();
        tokio::spawn(async move {
            let reason = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
            let _ = reset_seen.send(reason.ok()).await;
        });
    })
    .await;
    let objects = vec![(
        "gone.yaml",
        http_service_yaml("gone", ip(0, 13), "kubernetes.io/h2c", &[endpoint.ip()]),
    )];
    let weir = start(&objects).await;
    let stream = tokio::net::TcpStream::connect(SocketAddr::new(ip(0, 13), 8000))
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = Request::get("http://gone/").body(()).unwrap();
    let (_response, mut sent) = client.send_request(request, true).unwrap();
    // The request reaches the endpoint before the client gives up.
    tokio::time::timeout(Duration::from_secs(5), arrived.recv())
        .await
        .expect("the request reached the endpoint within 5 s");
    sent.send_reset(h2::Reason::CANCEL);
    let reason = tokio::time::timeout(Duration::from_secs(5), reset.recv())
        .await
        .expect("the endpoint's stream ended within 5 s");
    assert_eq!(reason, Some(Some(h2::Reason::CANCEL)));
    weir.shutdown().await;
}

/// An HTTP/1.1 endpoint that closes every connection after one response, though it said
/// keep-alive (as a server past its keepalive_requests, or restarting, does): the closed
/// connection weir pooled takes no request, so the request goes on a new one, and none
/// fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_endpoint_closed_costs_no_request() {
    let endpoint = SocketAddr::new(ip(1, 5), 8080);
    let answer = "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\nonce";
    let accepted = raw_http1_endpoint(endpoint, answer).await;
    let objects = vec![(
        "once.yaml",
        http_service_yaml("once", ip(0, 14), "http", &[endpoint.ip()]),
    )];
    let weir = start(&objects).await;
    let service = SocketAddr::new(ip(0, 14), 8000);
    for _ in 0..5 {
        assert_eq!(get(service, false, &[]).await, (200, "once".into()));
    }
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        5,
        "one connection per request"
    );
    weir.shutdown().await;
}

/// An endpoint that takes one stream at a time (SETTINGS_MAX_CONCURRENT_STREAMS 1) and is
/// slow to answer: requests with bodies larger than a stream's window, sent at once on
/// one client connection, wait at weir for its stream limit, their bodies for window, and
/// each one's body still goes out when its turn comes (nothing waiting for the limit is
/// left without a wake-up by the requests that come after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_the_endpoints_stream_limit_all_go_through() {
    let endpoint = SocketAddr::new(ip(1, 6), 8080);
    let listener = tokio::net::TcpListener::bind(endpoint).await.unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut connection = h2::server::Builder::new()
                    .max_concurrent_streams(1)
                    .handshake::<_, Bytes>(stream)
                    .await
                    .unwrap();
                while let Some(Ok((request, respond))) = connection.accept().await {
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        let mut length = 0;
                        while let Some(Ok(data)) = body.data().await {
                            length += data.len();
                            let _ = body.flow_control().release_capacity(data.len());
                        }
                        // Slow: the other requests are queued at weir meanwhile.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        answer(respond, format!("{length}"));
                    });
                }
            });
        }
    });
    let objects = vec![(
        "limit.yaml",
        http_service_yaml("limit", ip(0, 60), "kubernetes.io/h2c", &[endpoint.ip()]),
    )];
    let weir = start(&objects).await;
    let service = SocketAddr::new(ip(0, 60), 8000);
    let stream = TokioIo::new(tokio::net::TcpStream::connect(service).await.unwrap());
    let (sender, connection) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), stream)
            .await
            .unwrap();
    tokio::spawn(connection);
    // weir's connection to the endpoint is made, and the endpoint's limit known, first
    // (before its SETTINGS arrive, a client may open streams past it, and the endpoint
    // refuses them: a request whose body is streamed cannot be sent again).
    let warm_up = Request::get(format!("http://{service}/")).body(Default::default());
    let response = sender.clone().send_request(warm_up.unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    let size = 200 * 1024;
    let mut requests = Vec::new();
    for _ in 0..4 {
        let mut sender = sender.clone();
        requests.push(tokio::spawn(async move {
            let body = Full::new(Bytes::from(vec![b'x'; size]));
            let request = Request::post(format!("http://{service}/"))
                .body(body)
                .unwrap();
            let response = sender.send_request(request).await.expect("an answer");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8_lossy(&body).into_owned()
        }));
    }
    for request in requests {
        let answered = tokio::time::timeout(Duration::from_secs(10), request)
            .await
            .expect("every request answered within 10 s")
            .unwrap();
        assert_eq!(answered, size.to_string());
    }
    weir.shutdown().await;
}
