//! gRPC through an HTTP port with tonic on both sides, as users run it: tonic's client on
//! one `Channel` (one HTTP/2 connection), tonic's server on the endpoints. No code
//! generation (no protoc here): the messages derive `prost::Message`, and the service
//! routes its two methods by path, as generated code does.
//! Addresses: 127.47.0.0/16 (the Service on 127.47.0.x, endpoints on 127.47.1.x).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::client::Grpc;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use weir::test_helpers::{Weir, guest_bytes, http_service_yaml};

fn ip(host: u8, n: u8) -> IpAddr {
    IpAddr::from([127, 47, host, n])
}

#[derive(Clone, PartialEq, prost::Message)]
struct Ask {
    #[prost(string, tag = "1")]
    text: String,
    /// How many replies a `Count` call streams back.
    #[prost(uint32, tag = "2")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Reply {
    /// The endpoint that answered.
    #[prost(string, tag = "1")]
    endpoint: String,
    #[prost(string, tag = "2")]
    text: String,
}

/// `echo.Echo/Say`: the text back, with the endpoint's name; `fail` is NOT_FOUND.
struct Say(String);

impl tonic::server::UnaryService<Ask> for Say {
    type Response = Reply;
    type Future = std::future::Ready<Result<tonic::Response<Reply>, Status>>;

    fn call(&mut self, request: tonic::Request<Ask>) -> Self::Future {
        let ask = request.into_inner();
        std::future::ready(if ask.text == "fail" {
            Err(Status::not_found("nothing is called fail"))
        } else {
            Ok(tonic::Response::new(Reply {
                endpoint: self.0.clone(),
                text: ask.text,
            }))
        })
    }
}

/// `echo.Echo/Count`: `count` replies, `0`, `1`, ..., streamed.
struct Count(String);

type Replies = Pin<Box<dyn Stream<Item = Result<Reply, Status>> + Send>>;

impl tonic::server::ServerStreamingService<Ask> for Count {
    type Response = Reply;
    type ResponseStream = Replies;
    type Future = std::future::Ready<Result<tonic::Response<Replies>, Status>>;

    fn call(&mut self, request: tonic::Request<Ask>) -> Self::Future {
        let endpoint = self.0.clone();
        let replies = (0..request.into_inner().count).map(move |n| {
            Ok(Reply {
                endpoint: endpoint.clone(),
                text: n.to_string(),
            })
        });
        std::future::ready(Ok(tonic::Response::new(Box::pin(futures::stream::iter(
            replies,
        )))))
    }
}

/// A tonic gRPC server on `address`, its replies named after its IP.
async fn endpoint(address: SocketAddr) {
    let listener = tokio::net::TcpListener::bind(address).await.unwrap();
    let name = address.ip().to_string();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let name = name.clone();
                    async move { Ok::<_, Infallible>(route(name, request).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn route(name: String, request: Request<Incoming>) -> Response<tonic::body::Body> {
    let mut grpc = tonic::server::Grpc::new(ProstCodec::<Reply, Ask>::default());
    match request.uri().path() {
        "/echo.Echo/Say" => grpc.unary(Say(name), request).await,
        "/echo.Echo/Count" => grpc.server_streaming(Count(name), request).await,
        _ => Status::unimplemented("no such method").into_http(),
    }
}

/// Two endpoints (127.47.`n`.1 and .2) behind an `appProtocol: grpc` port (round-robin.wasm),
/// and a tonic client connected to the Service.
async fn setup(n: u8) -> (Weir, Grpc<Channel>) {
    let endpoints = [ip(n, 1), ip(n, 2)];
    for address in endpoints {
        endpoint(SocketAddr::new(address, 8080)).await;
    }
    let objects = vec![(
        "echo.yaml",
        http_service_yaml("echo", ip(0, 10 + n), "grpc", &endpoints),
    )];
    let policy = "round-robin";
    let weir = Weir::start(ip(0, n), &objects, &[(policy, guest_bytes(policy))], "").await;
    let channel = Channel::from_shared(format!("http://{}:8000", ip(0, 10 + n)))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    (weir, Grpc::new(channel))
}

async fn say(client: &mut Grpc<Channel>, text: &str) -> Result<Reply, Status> {
    client.ready().await.unwrap();
    let ask = Ask {
        text: text.into(),
        count: 0,
    };
    let path = PathAndQuery::from_static("/echo.Echo/Say");
    let codec = ProstCodec::<Ask, Reply>::default();
    let reply = client.unary(tonic::Request::new(ask), path, codec).await?;
    Ok(reply.into_inner())
}

/// Unary calls on one client connection are balanced call by call (the per-connection
/// balancer of kube-proxy pins them all to one pod), and a call's error status reaches
/// the client with its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_on_one_connection_spread_and_keep_their_status() {
    let (weir, mut client) = setup(1).await;
    let mut seen = std::collections::BTreeMap::new();
    for n in 0..10 {
        let text = format!("call {n}");
        let reply = say(&mut client, &text).await.expect("an OK call");
        assert_eq!(reply.text, text);
        *seen.entry(reply.endpoint).or_insert(0) += 1;
    }
    let expected: std::collections::BTreeMap<String, i32> = [ip(1, 1), ip(1, 2)]
        .iter()
        .map(|ip| (ip.to_string(), 5))
        .collect();
    assert_eq!(seen, expected, "round-robin, call by call");
    let failed = say(&mut client, "fail")
        .await
        .expect_err("a NOT_FOUND call");
    assert_eq!(failed.code(), Code::NotFound);
    assert_eq!(failed.message(), "nothing is called fail");
    weir.shutdown().await;
}

/// A server-streaming call: every reply arrives, from the one endpoint that took the
/// call, and its `grpc-status` trailer comes through (tonic's client takes a stream
/// that ends without one for a success, so the trailer is looked at).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_streaming_call_arrives_whole() {
    let (weir, mut client) = setup(2).await;
    for _ in 0..2 {
        client.ready().await.unwrap();
        let ask = Ask {
            text: String::new(),
            count: 100,
        };
        let path = PathAndQuery::from_static("/echo.Echo/Count");
        let codec = ProstCodec::<Ask, Reply>::default();
        let mut replies = (client.server_streaming(tonic::Request::new(ask), path, codec))
            .await
            .expect("the call starts")
            .into_inner();
        let mut texts = Vec::new();
        let mut endpoints = std::collections::BTreeSet::new();
        while let Some(reply) = replies.next().await {
            let reply = reply.expect("no error status in the stream or at its end");
            texts.push(reply.text);
            endpoints.insert(reply.endpoint);
        }
        let trailers = (replies.trailers().await)
            .expect("no error status at the end")
            .expect("a trailer section");
        let status = trailers
            .get("grpc-status")
            .map(|value| value.to_str().unwrap());
        assert_eq!(status, Some("0"), "{trailers:?}");
        let expected: Vec<String> = (0..100).map(|n| n.to_string()).collect();
        assert_eq!(texts, expected);
        assert_eq!(endpoints.len(), 1, "one call, one endpoint: {endpoints:?}");
    }
    weir.shutdown().await;
}
