//! UDP Services end to end, in process, DNS-shaped: a Service with 53-style UDP and TCP
//! ports on one clusterIP, a UDP responder per endpoint. Each test owns 127.<T>.0.0/16
//! (T from 60): Services on 127.T.0.x, endpoints on 127.T.1.x, the node on 127.T.0.1.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use weir::test_helpers::{Backend, Weir, guest_bytes, wait_until, who};

const PORT: u16 = 5353;

fn ip(test: u8, host: u8, n: u8) -> IpAddr {
    IpAddr::from([127, test, host, n])
}

/// Answers every datagram with its name, a space, and the datagram: a DNS server as far as
/// flows can tell.
struct Responder {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn responder(address: SocketAddr) -> Responder {
    let socket = UdpSocket::bind(address).await.expect("bind the responder");
    let name = address.to_string();
    let task = tokio::spawn(async move {
        let mut buffer = vec![0u8; 65536];
        loop {
            let Ok((length, from)) = socket.recv_from(&mut buffer).await else {
                continue;
            };
            let mut answer = format!("{name} ").into_bytes();
            answer.extend_from_slice(&buffer[..length]);
            let _ = socket.send_to(&answer, from).await;
        }
    });
    Responder { task }
}

/// Responders on 127.T.1.1..=count:8053 and TCP backends on :8080 of the same hosts.
async fn endpoints(test: u8, count: u8) -> (Vec<Responder>, Vec<Backend>) {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for n in 1..=count {
        udp.push(responder(SocketAddr::new(ip(test, 1, n), 8053)).await);
        let address = SocketAddr::new(ip(test, 1, n), 8080);
        tcp.push(Backend::start(address, &address.to_string()).await.unwrap());
    }
    (udp, tcp)
}

/// Service `dns` with `dns` (UDP) and `dns-tcp` (TCP) on one clusterIP, both PORT, and its
/// slice with `hosts` (127.T.1.n) ready on node-a.
fn dns(test: u8, hosts: &[u8], annotations: &str) -> String {
    let mut endpoints = String::new();
    for n in hosts {
        endpoints.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: node-a\n  conditions: {{ready: true}}\n",
            ip(test, 1, *n)
        ));
    }
    if endpoints.is_empty() {
        endpoints = "[]\n".to_string();
    } else {
        endpoints.insert(0, '\n');
    }
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: dns
  namespace: default
  annotations: {{{annotations}}}
spec:
  clusterIP: {cluster}
  ports:
  - {{name: dns, port: {PORT}, protocol: UDP}}
  - {{name: dns-tcp, port: {PORT}, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-1
  namespace: default
  labels: {{kubernetes.io/service-name: dns}}
addressType: IPv4
ports:
- {{name: dns, port: 8053, protocol: UDP}}
- {{name: dns-tcp, port: 8080, protocol: TCP}}
endpoints: {endpoints}",
        cluster = ip(test, 0, 10)
    )
}

/// A client socket on `source`, connected to the Service: it accepts datagrams from the
/// Service address alone, as a resolver's does.
async fn client(test: u8, service: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind(SocketAddr::new(ip(test, 9, 9), 0))
        .await
        .unwrap();
    socket.connect(service).await.unwrap();
    socket
}

/// Sends `query` and waits up to a second for the answer: the responder's name.
async fn ask(socket: &UdpSocket, query: &[u8]) -> std::io::Result<String> {
    socket.send(query).await?;
    let mut buffer = vec![0u8; 70_000];
    let length = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buffer))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    let answer = &buffer[..length];
    let space = answer.iter().position(|b| *b == b' ').expect("name, space");
    assert_eq!(
        &answer[space + 1..],
        query,
        "the answer carries the query whole"
    );
    Ok(String::from_utf8_lossy(&answer[..space]).into_owned())
}

fn responders(test: u8, hosts: &[u8]) -> BTreeSet<String> {
    (hosts.iter())
        .map(|n| format!("{}:8053", ip(test, 1, *n)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_and_tcp_on_one_address_flows_pinned_and_balanced() {
    const T: u8 = 60;
    let (_udp, _tcp) = endpoints(T, 3).await;
    let weir = Weir::start(
        ip(T, 0, 1),
        &[("dns.yaml", dns(T, &[1, 2, 3], ""))],
        &[],
        "",
    )
    .await;
    let service = SocketAddr::new(ip(T, 0, 10), PORT);

    // One socket is one flow: every query of it reaches one responder.
    let socket = client(T, service).await;
    let first = ask(&socket, b"query 0").await.expect("answered");
    for n in 1..20 {
        let answer = ask(&socket, format!("query {n}").as_bytes()).await.unwrap();
        assert_eq!(answer, first, "a flow keeps its endpoint");
    }
    // Replies come from the address the client sent to: an unconnected socket sees it.
    let open = UdpSocket::bind(SocketAddr::new(ip(T, 9, 9), 0))
        .await
        .unwrap();
    open.send_to(b"from?", service).await.unwrap();
    let mut buffer = [0u8; 256];
    let (_, from) = tokio::time::timeout(Duration::from_secs(1), open.recv_from(&mut buffer))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(from, service, "the reply's source is the Service address");

    // Many sockets: kube-default spreads flows over every endpoint.
    // Each socket is kept until the end: a closed one's port can be handed to the next,
    // which would then be the same client, on the same flow.
    let mut seen = BTreeSet::new();
    let mut sockets = Vec::new();
    for _ in 0..60 {
        let socket = client(T, service).await;
        seen.insert(ask(&socket, b"hello").await.unwrap());
        sockets.push(socket);
    }
    assert_eq!(seen, responders(T, &[1, 2, 3]));

    // The TCP port on the same address and number is its own listener.
    let name = who(service, None).await.expect("TCP answered");
    assert!(name.ends_with(":8080"), "{name}");

    let metrics = weir.metrics();
    for series in [
        "weir_udp_flows_opened_total{service=\"default/dns:dns\"",
        "weir_udp_datagrams_total{service=\"default/dns:dns\"",
        "weir_udp_flows_active{service=\"default/dns:dns\"",
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }
    let opened: u64 = (1..=3u8)
        .map(|n| {
            weir.metric(&format!(
                "weir_udp_flows_opened_total{{service=\"default/dns:dns\",endpoint=\"{}:8053\"}}",
                ip(T, 1, n)
            ))
        })
        .sum();
    assert_eq!(opened, 62, "one flow per client socket");
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_moves_within_a_second_when_its_endpoint_leaves() {
    const T: u8 = 61;
    let (_udp, _tcp) = endpoints(T, 2).await;
    let weir = Weir::start(ip(T, 0, 1), &[("dns.yaml", dns(T, &[1, 2], ""))], &[], "").await;
    let service = SocketAddr::new(ip(T, 0, 10), PORT);
    let socket = client(T, service).await;
    let pinned = ask(&socket, b"before").await.unwrap();
    let other = if pinned == format!("{}:8053", ip(T, 1, 1)) {
        2
    } else {
        1
    };
    let leaving = if other == 1 { 2 } else { 1 };

    // The endpoint leaves the slice; its responder still runs, so only weir can move
    // the flow.
    weir.write_objects("dns.yaml", &dns(T, &[other], ""));
    let changed = Instant::now();
    let deadline = changed + Duration::from_secs(5);
    loop {
        let answer = ask(&socket, b"after").await.unwrap();
        if answer == format!("{}:8053", ip(T, 1, other)) {
            break;
        }
        assert!(Instant::now() < deadline, "still on the endpoint that left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The flow ended by the sweep or at its next datagram, whichever came first.
    wait_until("the old flow is counted as ended", Duration::from_secs(2), || {
        weir.metric(&format!(
            "weir_udp_flows_ended_total{{service=\"default/dns:dns\",endpoint=\"{}:8053\",reason=\"endpoint_gone\"}}",
            ip(T, 1, leaving)
        )) == 1
    })
    .await;
    // From now on the flow stays on the endpoint that serves.
    for _ in 0..10 {
        assert_eq!(
            ask(&socket, b"again").await.unwrap(),
            format!("{}:8053", ip(T, 1, other))
        );
    }
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_to_zero_refuses_and_the_same_socket_is_served_when_endpoints_return() {
    const T: u8 = 62;
    let (_udp, _tcp) = endpoints(T, 1).await;
    let weir = Weir::start(ip(T, 0, 1), &[("dns.yaml", dns(T, &[1], ""))], &[], "").await;
    let service = SocketAddr::new(ip(T, 0, 10), PORT);
    let socket = client(T, service).await;
    ask(&socket, b"up").await.expect("served");

    weir.write_objects("dns.yaml", &dns(T, &[], ""));
    // No listener: the kernel answers port unreachable, the client sees ECONNREFUSED.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ask(&socket, b"down").await {
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => assert!(
                Instant::now() < deadline,
                "not refused after scaling to zero"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Endpoints return: the very same socket is served again (kubernetes#48370).
    weir.write_objects("dns.yaml", &dns(T, &[1], ""));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(name) = ask(&socket, b"back").await {
            assert_eq!(name, format!("{}:8053", ip(T, 1, 1)));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served after the endpoints returned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_of_64_kib_pass_whole_both_ways() {
    const T: u8 = 63;
    let (_udp, _tcp) = endpoints(T, 1).await;
    let weir = Weir::start(ip(T, 0, 1), &[("dns.yaml", dns(T, &[1], ""))], &[], "").await;
    let service = SocketAddr::new(ip(T, 0, 10), PORT);
    let socket = client(T, service).await;
    // The largest that fits with the responder's name in front of it on the way back.
    let big: Vec<u8> = (0..65_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        ask(&socket, &big).await.expect("answered whole"),
        format!("{}:8053", ip(T, 1, 1))
    );
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_end_refusing_endpoints_are_left_and_caps_count_drops() {
    const T: u8 = 64;
    // Responder 1 runs; nothing listens on endpoint 9's UDP port (it answers ICMP).
    let (_udp, _tcp) = endpoints(T, 1).await;
    let annotations = "weir.dev/udp-timeout: 1s";
    let weir = Weir::start(
        ip(T, 0, 1),
        &[("dns.yaml", dns(T, &[1, 9], annotations))],
        &[],
        "[proxy]\nmax_udp_flows_per_service = 3\n",
    )
    .await;
    let service = SocketAddr::new(ip(T, 0, 10), PORT);

    // A flow sent to the dead endpoint ends on its ICMP error, and the client's next
    // datagram goes to one that answers: every client is answered within a few tries.
    let mut refused_once = false;
    for _ in 0..12 {
        let socket = client(T, service).await;
        let mut answered = false;
        for _ in 0..5 {
            if ask(&socket, b"q").await.is_ok() {
                answered = true;
                break;
            }
            refused_once = true;
        }
        assert!(
            answered,
            "a client stuck on the dead endpoint\n{}",
            weir.metrics()
        );
    }
    assert!(
        refused_once,
        "kube-default never picked the dead endpoint in 12 flows"
    );
    let dead = format!("{}:8053", ip(T, 1, 9));
    assert!(
        weir.metric(&format!(
            "weir_udp_flows_ended_total{{service=\"default/dns:dns\",endpoint=\"{dead}\",reason=\"endpoint_refused\"}}"
        )) > 0,
        "{}",
        weir.metrics()
    );

    // Twelve one-query flows under a cap of three: the oldest were evicted to make room.
    let live = format!("{}:8053", ip(T, 1, 1));
    let evicted = format!(
        "weir_udp_flows_ended_total{{service=\"default/dns:dns\",endpoint=\"{live}\",reason=\"evicted\"}}"
    );
    assert!(weir.metric(&evicted) > 0, "{}", weir.metrics());

    // Idle for the Service's 1 s: flows end.
    let idle = format!(
        "weir_udp_flows_ended_total{{service=\"default/dns:dns\",endpoint=\"{live}\",reason=\"idle\"}}"
    );
    wait_until(
        "idle flows end after the Service's timeout",
        Duration::from_secs(5),
        || {
            weir.metric(&idle) > 0
                && weir.metric(&format!(
                    "weir_udp_flows_active{{service=\"default/dns:dns\",endpoint=\"{live}\"}}"
                )) == 0
        },
    )
    .await;

    // Three streams fill the Service's cap; a fourth flow has nothing to evict (streams
    // are kept) and is dropped, counted.
    weir.write_objects("dns.yaml", &dns(T, &[1], annotations));
    let mut streams = Vec::new();
    for _ in 0..3 {
        let socket = client(T, service).await;
        // Both ways, then the client again: a stream. Until the change is applied, a
        // first datagram may still go to the dead endpoint and be lost, and the client
        // asks again, as a resolver does.
        let mut answered = false;
        for _ in 0..3 {
            if ask(&socket, b"one").await.is_ok() {
                answered = true;
                break;
            }
        }
        assert!(answered, "not served\n{}", weir.metrics());
        assert_eq!(ask(&socket, b"two").await.unwrap(), live);
        streams.push(socket);
    }
    let fourth = client(T, service).await;
    assert!(
        ask(&fourth, b"over the cap").await.is_err(),
        "a fourth flow was served"
    );
    assert_eq!(
        weir.metric(
            "weir_udp_dropped_total{service=\"default/dns:dns\",reason=\"service_flow_cap\"}"
        ),
        1
    );
    // The streams are still served.
    for socket in &streams {
        assert_eq!(ask(socket, b"three").await.unwrap(), live);
    }
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_swap_keeps_flows_on_endpoints_that_still_serve() {
    const T: u8 = 65;
    let (_udp, _tcp) = endpoints(T, 3).await;
    let annotation = "weir.dev/policy: dns-policy";
    let weir = Weir::start(
        ip(T, 0, 1),
        &[("dns.yaml", dns(T, &[1, 2, 3], annotation))],
        &[("dns-policy", guest_bytes("round-robin"))],
        "",
    )
    .await;
    let service = SocketAddr::new(ip(T, 0, 10), PORT);
    let mut sockets = Vec::new();
    let mut pinned = Vec::new();
    for _ in 0..6 {
        let socket = client(T, service).await;
        pinned.push(ask(&socket, b"first").await.unwrap());
        sockets.push(socket);
    }
    assert_eq!(
        pinned.iter().collect::<BTreeSet<_>>().len(),
        3,
        "round-robin spreads"
    );

    // Swap the module for maglev, which would send each new flow elsewhere: the
    // existing flows stay where they are.
    weir.write_policy("dns-policy", &guest_bytes("maglev"));
    wait_until("maglev serves the Service", Duration::from_secs(20), || {
        weir.metrics().contains("policy=\"dns-policy\"")
            && weir.metric("weir_reloads_total{what=\"dns-policy\",result=\"accepted\"}") >= 2
    })
    .await;
    for (socket, before) in sockets.iter().zip(&pinned) {
        for _ in 0..5 {
            assert_eq!(&ask(socket, b"after").await.unwrap(), before);
        }
    }
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_flows_on_their_endpoints() {
    const T: u8 = 66;
    let (_udp, _tcp) = endpoints(T, 3).await;
    let state = tempfile::tempdir().unwrap();
    let config = format!("[proxy]\nstate_dir = \"{}\"\n", state.path().display());
    let objects = [("dns.yaml", dns(T, &[1, 2, 3], ""))];
    let weir = Weir::start(ip(T, 0, 1), &objects, &[], &config).await;
    let service = SocketAddr::new(ip(T, 0, 10), PORT);
    let mut sockets = Vec::new();
    let mut pinned = Vec::new();
    for _ in 0..8 {
        let socket = client(T, service).await;
        pinned.push(ask(&socket, b"before").await.unwrap());
        sockets.push(socket);
    }
    weir.shutdown().await;
    assert!(state.path().join("udp-flows.json").exists(), "flows saved");

    // A new weir, as after a rollout: each client keeps its endpoint (kube-default picks
    // at random, so 8 flows would not all land where they were by chance).
    let weir = Weir::start(ip(T, 0, 1), &objects, &[], &config).await;
    for (socket, before) in sockets.iter().zip(&pinned) {
        let mut answer = ask(socket, b"after").await;
        // The listener may open just after readiness is reported.
        for _ in 0..20 {
            if answer.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            answer = ask(socket, b"after").await;
        }
        assert_eq!(&answer.expect("served after the restart"), before);
    }
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_outcomes_reach_a_policy_that_counts_them() {
    const T: u8 = 67;
    let (_udp, _tcp) = endpoints(T, 2).await;
    let annotations = "weir.dev/policy: fewest, weir.dev/udp-timeout: 1s";
    let weir = Weir::start(
        ip(T, 0, 1),
        &[("dns.yaml", dns(T, &[1, 2], annotations))],
        &[("fewest", guest_bytes("least-connections"))],
        "",
    )
    .await;
    let service = SocketAddr::new(ip(T, 0, 10), PORT);
    // Four flows: least-connections counts each opened flow, so they split two and two.
    let mut flows = Vec::new();
    for _ in 0..4 {
        let socket = client(T, service).await;
        let endpoint = ask(&socket, b"open").await.unwrap();
        flows.push((socket, endpoint));
    }
    let x = format!("{}:8053", ip(T, 1, 1));
    let on_x = flows.iter().filter(|(_, e)| *e == x).count();
    assert_eq!(
        on_x,
        2,
        "opened flows are counted: {flows:?}",
        flows = flows.iter().map(|f| &f.1).collect::<Vec<_>>()
    );

    // The flows on endpoint 2 stay busy; those on endpoint 1 go idle and close. The
    // policy is told, so endpoint 1 has 0 flows and endpoint 2 has 2.
    let idle_closed = format!(
        "weir_udp_flows_ended_total{{service=\"default/dns:dns\",endpoint=\"{x}\",reason=\"idle\"}}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while weir.metric(&idle_closed) < 2 {
        assert!(Instant::now() < deadline, "idle flows did not close");
        for (socket, endpoint) in &flows {
            if *endpoint != x {
                assert_eq!(&ask(socket, b"busy").await.unwrap(), endpoint);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // So the next two flows both go to endpoint 1.
    for _ in 0..2 {
        let socket = client(T, service).await;
        assert_eq!(
            ask(&socket, b"new").await.unwrap(),
            x,
            "closed flows are counted"
        );
        flows.push((socket, x.clone()));
    }
    weir.shutdown().await;
}
