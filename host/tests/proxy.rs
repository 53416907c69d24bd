//! The proxy end to end, in process, on 127.0.0.0/8: real listeners, real backends, the
//! real policy modules. Each test owns a /16 of loopback (127.<test>.0.0) so tests can
//! run in parallel: services on 127.T.0.x, backends on 127.T.1.x, node 127.T.0.1,
//! "outside" clients from 127.T.9.9.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::metrics::ReloadResult;
use weir::test_helpers::{
    Ep, Weir, backends, connect, greet, guest_bytes, http_get, service_yaml, slice_yaml,
    wait_until, who,
};

/// Where [`service_yaml`]'s port takes a `nodePort`: `.replace(NODE_PORT_AT, &node_port(N))`.
const NODE_PORT_AT: &str = "protocol: TCP\n";

fn node_port(port: u16) -> String {
    format!("{NODE_PORT_AT}    nodePort: {port}\n")
}

/// One file: Service `name` (port 8000 on `cluster_ip`, `spec` lines, a nodePort when
/// given) and its EndpointSlice (port 8080).
fn service_file(
    name: &str,
    cluster_ip: IpAddr,
    spec: &str,
    node_port_number: Option<u16>,
    eps: &[Ep],
) -> String {
    let mut service = service_yaml(name, cluster_ip, 8000, spec, "");
    if let Some(port) = node_port_number {
        service = service.replace(NODE_PORT_AT, &node_port(port));
    }
    service + "---\n" + &slice_yaml(name, 8080, eps)
}

fn ip(test: u8, host: u8, n: u8) -> IpAddr {
    IpAddr::from([127, test, host, n])
}

/// The backends answering `count` connections to `address`.
async fn answers(address: SocketAddr, source: Option<IpAddr>, count: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..count {
        seen.insert(who(address, source).await.expect("an answer"));
    }
    seen
}

fn names(test: u8, hosts: &[u8]) -> BTreeSet<String> {
    hosts
        .iter()
        .map(|n| format!("{}:8080", ip(test, 1, *n)))
        .collect()
}

/// The connection is accepted, but closed without a reply once the client has written.
async fn assert_dropped(address: SocketAddr, source: Option<IpAddr>) {
    let started = Instant::now();
    match who(address, source).await {
        Ok(name) => panic!("{address} answered ({name}); it should drop"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ),
            "{address}: {e}"
        ),
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed after the first bytes"
    );
}

fn assert_refused(result: std::io::Result<tokio::net::TcpStream>, what: &str) {
    match result {
        Ok(_) => panic!("{what}: connected; it should be refused"),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{what}: {e}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_reaches_exactly_the_eligible_endpoints() {
    const T: u8 = 21;
    let _backends = backends(T, 4).await;
    let node = ip(T, 0, 1);
    let outside = Some(ip(T, 9, 9));
    let eps = vec![
        Ep::ready(ip(T, 1, 1), "node-a"),
        Ep::ready(ip(T, 1, 2), "node-a"),
        Ep::ready(ip(T, 1, 3), "node-b"),
        Ep::terminating(ip(T, 1, 4), "node-a"),
    ];
    let remote_only = vec![Ep::ready(ip(T, 1, 3), "node-b")];
    let local = "externalTrafficPolicy: Local";
    let objects = vec![
        (
            "web.yaml",
            service_file(
                "web",
                ip(T, 0, 10),
                &format!("type: NodePort\n{local}"),
                Some(30080),
                &eps,
            ),
        ),
        (
            "api.yaml",
            service_file(
                "api",
                ip(T, 0, 11),
                "internalTrafficPolicy: Local",
                None,
                &eps,
            ),
        ),
        (
            "far.yaml",
            service_file(
                "far",
                ip(T, 0, 12),
                &format!("type: NodePort\n{local}"),
                Some(30081),
                &remote_only,
            ),
        ),
        (
            "near.yaml",
            service_file(
                "near",
                ip(T, 0, 14),
                "internalTrafficPolicy: Local",
                None,
                &remote_only,
            ),
        ),
        (
            "empty.yaml",
            service_file("empty", ip(T, 0, 13), "type: NodePort", Some(30082), &[]),
        ),
    ];
    let weir = Weir::start(node, &objects, &[], "").await;

    // clusterIP: every ready endpoint, never the terminating one.
    let cluster = SocketAddr::new(ip(T, 0, 10), 8000);
    assert_eq!(answers(cluster, None, 40).await, names(T, &[1, 2, 3]));
    // nodePort from outside with eTP=Local: this node's ready endpoints only.
    let node_port = SocketAddr::new(node, 30080);
    assert_eq!(answers(node_port, outside, 40).await, names(T, &[1, 2]));
    // nodePort from the node itself: the Cluster set, as kube-proxy does.
    assert_eq!(
        answers(node_port, Some(node), 40).await,
        names(T, &[1, 2, 3])
    );
    // iTP=Local: this node's ready endpoints.
    let api = SocketAddr::new(ip(T, 0, 11), 8000);
    assert_eq!(answers(api, None, 40).await, names(T, &[1, 2]));

    // eTP=Local without local endpoints: dropped from outside, served from the node.
    let far_node_port = SocketAddr::new(node, 30081);
    assert_dropped(far_node_port, outside).await;
    assert_eq!(answers(far_node_port, Some(node), 5).await, names(T, &[3]));
    assert_eq!(
        answers(SocketAddr::new(ip(T, 0, 12), 8000), None, 5).await,
        names(T, &[3])
    );
    // iTP=Local without local endpoints: the clusterIP drops.
    assert_dropped(SocketAddr::new(ip(T, 0, 14), 8000), None).await;

    // No endpoints at all: refused on every address, as kube-proxy's REJECT.
    assert_refused(
        connect(SocketAddr::new(ip(T, 0, 13), 8000), None).await,
        "clusterIP",
    );
    assert_refused(
        connect(SocketAddr::new(node, 30082), outside).await,
        "nodePort",
    );

    let metrics = weir.metrics();
    assert!(
        metrics.contains(&format!(
            "weir_connections_opened_total{{service=\"default/web:http\",endpoint=\"{}:8080\"}}",
            ip(T, 1, 1)
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_decisions_total{service=\"default/far:http\",action=\"drop\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "weir_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 1"
        ),
        "{metrics}"
    );
    weir.shutdown().await;
}

/// Splits a raw HTTP response into status line, headers (in order) and body.
fn parse(response: &str) -> (String, Vec<(String, String)>, String) {
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().to_string();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").expect("a header");
            (k.to_string(), v.to_string())
        })
        .collect();
    (status, headers, body.to_string())
}

fn assert_go_time(text: &str) {
    // 2026-11-25 09:30:02.886819705 +0000 UTC m=+0.434406875
    let (wall, monotonic) = text.split_once(" +0000 UTC m=+").expect("Go's time format");
    let (date, time) = wall.split_once(' ').expect("date and time");
    assert_eq!(date.len(), 10, "{text}");
    assert!(time.len() >= 8 && !time.ends_with('0'), "{text}");
    let (secs, nanos) = monotonic.split_once('.').expect("monotonic reading");
    assert!(secs.parse::<u64>().is_ok() && nanos.len() == 9, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_are_kube_proxys() {
    const T: u8 = 22;
    let _backends = backends(T, 3).await;
    let node = ip(T, 0, 1);
    let service = |eps: &[Ep]| {
        service_yaml(
            "lb",
            ip(T, 0, 10),
            8000,
            "type: LoadBalancer\nexternalTrafficPolicy: Local\nhealthCheckNodePort: 30256",
            "",
        )
        .replace(NODE_PORT_AT, &node_port(30080))
            + "---\n"
            + &slice_yaml("lb", 8080, eps)
    };
    let local = [
        Ep::ready(ip(T, 1, 1), "node-a"),
        Ep::ready(ip(T, 1, 2), "node-a"),
        Ep::terminating(ip(T, 1, 3), "node-a"),
    ];
    let weir = Weir::start(node, &[("lb.yaml", service(&local))], &[], "").await;
    let health_port = SocketAddr::new(node, 30256);

    let response = http_get(health_port, "/").await.unwrap();
    let (status, headers, body) = parse(&response);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "Content-Type",
            "X-Content-Type-Options",
            "X-Load-Balancing-Endpoint-Weight",
            "Date",
            "Content-Length",
            // As Go's net/http, for a request that asked for `Connection: close`.
            "Connection",
        ]
    );
    assert_eq!(headers[0].1, "application/json");
    assert_eq!(headers[1].1, "nosniff");
    assert_eq!(headers[2].1, "2", "terminating endpoints never count");
    assert!(headers[3].1.ends_with(" GMT"), "{}", headers[3].1);
    assert_eq!(headers[4].1, body.len().to_string());
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"lb\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );
    // Any path, any method.
    let mut stream = connect(health_port, None).await.unwrap();
    stream
        .write_all(
            b"POST /whatever HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut other = String::new();
    stream.read_to_string(&mut other).await.unwrap();
    assert_eq!(parse(&other).2, body);

    // No local endpoints: 503 and a count of 0.
    weir.write_objects("lb.yaml", &service(&[Ep::ready(ip(T, 1, 3), "node-b")]));
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        last = http_get(health_port, "/").await.unwrap();
        if last.starts_with("HTTP/1.1 503") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, headers, body) = parse(&last);
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert_eq!(
        headers[2],
        ("X-Load-Balancing-Endpoint-Weight".into(), "0".into())
    );
    assert!(body.contains("\"localEndpoints\": 0,"), "{body}");

    // Dual-stack: one server for the Service, counting one family (as kube-proxy), so a
    // pod with an address of each family counts once.
    let dual = service_yaml(
        "lb",
        ip(T, 0, 10),
        8000,
        &format!(
            "type: LoadBalancer\nexternalTrafficPolicy: Local\nhealthCheckNodePort: 30256\nipFamilyPolicy: RequireDualStack\nipFamilies: [IPv4, IPv6]\nclusterIPs: [\"{}\", \"fd00::10\"]",
            ip(T, 0, 10)
        ),
        "",
    )
    .replace(NODE_PORT_AT, &node_port(30080))
        + "---\n"
        + &slice_yaml("lb", 8080, &local)
        + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: lb-v6\n  namespace: default\n  labels:\n    kubernetes.io/service-name: lb\naddressType: IPv6\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n- addresses: [\"fd00::1\"]\n  nodeName: node-a\n- addresses: [\"fd00::2\"]\n  nodeName: node-a\n- addresses: [\"fd00::3\"]\n  nodeName: node-a\n";
    weir.write_objects("lb.yaml", &dual);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = http_get(health_port, "/").await.unwrap();
        if response.starts_with("HTTP/1.1 200") {
            let (_, headers, body) = parse(&response);
            assert_eq!(headers[2].1, "2", "IPv4's count, not both families'");
            assert!(body.contains("\"localEndpoints\": 2,"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{response}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // /healthz and /livez.
    let admin = weir.app().admin_address();
    let (status, headers, body) = parse(&http_get(admin, "/healthz").await.unwrap());
    assert_eq!(status, "HTTP/1.1 200 OK");
    let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "Content-Type",
            "X-Content-Type-Options",
            "Date",
            "Content-Length",
            "Connection"
        ]
    );
    let rest = body
        .strip_prefix("{\"lastUpdated\": \"")
        .expect("lastUpdated first");
    let (last_updated, rest) = rest
        .split_once("\",\"currentTime\": \"")
        .expect("currentTime");
    let (current, rest) = rest.split_once('"').unwrap();
    assert_eq!(rest, ", \"nodeEligible\": true}");
    assert_eq!(
        last_updated, current,
        "healthy: lastUpdated is the current time"
    );
    assert_go_time(current);
    let (status, _, body) = parse(&http_get(admin, "/livez").await.unwrap());
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.starts_with("{\"lastUpdated\": \"") && body.ends_with("\"}"),
        "{body}"
    );
    assert!(!body.contains("nodeEligible"));
    assert_eq!(weir.admin_get("/readyz").await.0, 200);

    // A Node being drained by the autoscaler is not eligible: /healthz fails, /livez not.
    weir.write_objects(
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nspec:\n  taints:\n  - key: ToBeDeletedByClusterAutoscaler\n    effect: NoSchedule\n",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut healthz = (0, String::new());
    while Instant::now() < deadline {
        healthz = weir.admin_get("/healthz").await;
        if healthz.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(healthz.0, 503, "{}", healthz.1);
    assert!(
        healthz.1.ends_with(", \"nodeEligible\": false}"),
        "{}",
        healthz.1
    );
    assert_eq!(weir.admin_get("/livez").await.0, 200);
    let metrics = weir.metrics();
    assert!(
        metrics.contains("weir_proxy_healthz_total{code=\"503\"}"),
        "{metrics}"
    );
    weir.shutdown().await;
}

/// A client opening connections in a loop, recording every answer and every failure.
struct Traffic {
    answers: Arc<Mutex<Vec<String>>>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(address: SocketAddr, source: Option<IpAddr>) -> Traffic {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let (answers, failures, stop) = (answers.clone(), failures.clone(), stop.clone());
            async move {
                while !stop.is_cancelled() {
                    match who(address, source).await {
                        Ok(name) => answers.lock().unwrap().push(name),
                        Err(e) => failures.lock().unwrap().push(format!("{address}: {e}")),
                    }
                }
            }
        });
        Traffic {
            answers,
            failures,
            stop,
            task,
        }
    }

    fn count(&self) -> usize {
        self.answers.lock().unwrap().len()
    }

    /// The distinct answers among the last `n`, once there are `n` after `since`.
    fn recent(&self, since: usize, n: usize) -> Option<BTreeSet<String>> {
        let answers = self.answers.lock().unwrap();
        (answers.len() >= since + n).then(|| answers[answers.len() - n..].iter().cloned().collect())
    }

    /// Waits until the last `n` answers, all given after now, satisfy `check`.
    async fn until(&self, what: &str, n: usize, check: impl Fn(&BTreeSet<String>) -> bool) {
        let since = self.count();
        wait_until(what, Duration::from_secs(10), || {
            self.recent(since, n).is_some_and(|seen| check(&seen))
        })
        .await;
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.cancel();
        self.task.await.unwrap();
        let count = self.answers.lock().unwrap().len();
        let failures = self.failures.lock().unwrap().clone();
        (count, failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_changes_under_continuous_traffic() {
    const T: u8 = 23;
    let _backends = backends(T, 4).await;
    let node = ip(T, 0, 1);
    let web = |port: u16, eps: &[Ep]| {
        service_yaml(
            "web",
            ip(T, 0, 10),
            port,
            "type: NodePort",
            // Closed: a failure would reject, but a deleted module is no failure.
            "weir.dev/policy: web-policy\nweir.dev/failure-mode: closed",
        )
        .replace(NODE_PORT_AT, &node_port(30080))
            + "---\n"
            + &slice_yaml("web", 8080, eps)
    };
    let ready = |hosts: &[u8]| -> Vec<Ep> {
        hosts
            .iter()
            .map(|n| Ep::ready(ip(T, 1, *n), "node-a"))
            .collect()
    };
    let round_robin = guest_bytes("round-robin");
    let maglev = guest_bytes("maglev");
    let weir = Weir::start(
        node,
        &[("web.yaml", web(8000, &ready(&[1, 2])))],
        &[("web-policy", round_robin.clone())],
        "",
    )
    .await;
    let node_port = SocketAddr::new(node, 30080);
    let cluster = SocketAddr::new(ip(T, 0, 10), 8000);
    let outside = Some(ip(T, 9, 9));
    let via_node_port = Traffic::start(node_port, outside);
    let via_cluster_ip = Traffic::start(cluster, None);
    via_node_port
        .until("both endpoints serve", 10, |s| *s == names(T, &[1, 2]))
        .await;

    // Scale up, scale down, one endpoint terminating.
    weir.write_objects("web.yaml", &web(8000, &ready(&[1, 2, 3])));
    via_node_port
        .until("the new endpoint serves", 12, |s| {
            *s == names(T, &[1, 2, 3])
        })
        .await;
    weir.write_objects("web.yaml", &web(8000, &ready(&[2, 3])));
    via_node_port
        .until("the removed endpoint is gone", 12, |s| {
            *s == names(T, &[2, 3])
        })
        .await;
    let mut eps = ready(&[2, 3]);
    eps[0] = Ep::terminating(ip(T, 1, 2), "node-a");
    weir.write_objects("web.yaml", &web(8000, &eps));
    via_node_port
        .until("the terminating endpoint takes nothing new", 12, |s| {
            *s == names(T, &[3])
        })
        .await;
    weir.write_objects("web.yaml", &web(8000, &ready(&[1, 2, 3])));
    via_node_port
        .until("all three serve again", 12, |s| *s == names(T, &[1, 2, 3]))
        .await;

    // Twenty swaps: maglev sends one client to one endpoint, round-robin to all three.
    let accepted = || {
        weir.app()
            .metrics()
            .proxy
            .reloads_of("web-policy", ReloadResult::accepted)
    };
    for swap in 0..20 {
        let before = accepted();
        let to_maglev = swap % 2 == 0;
        weir.write_policy("web-policy", if to_maglev { &maglev } else { &round_robin });
        wait_until("the swap is accepted", Duration::from_secs(10), || {
            accepted() > before
        })
        .await;
        if to_maglev {
            via_node_port
                .until("maglev routes", 6, |s| s.len() == 1)
                .await;
        } else {
            via_node_port
                .until("round-robin routes", 6, |s| s.len() == 3)
                .await;
        }
    }

    // A broken module is rejected and reported; round-robin keeps serving.
    let rejected = || {
        weir.app()
            .metrics()
            .proxy
            .reloads_of("web-policy", ReloadResult::rejected)
    };
    weir.write_policy("web-policy", b"\0asm not really a module");
    wait_until(
        "the broken module is rejected",
        Duration::from_secs(10),
        || rejected() == 1,
    )
    .await;
    via_node_port
        .until("round-robin still routes", 6, |s| s.len() == 3)
        .await;
    let metrics = weir.metrics();
    assert!(
        metrics.contains("weir_reloads_total{what=\"web-policy\",result=\"rejected\"} 1")
            && metrics.contains(
                "weir_policy_rejections_total{policy=\"web-policy\",reason=\"not_component\"} 1"
            ),
        "{metrics}"
    );

    // The module is deleted: the Service falls back to kube-default, failure mode or not.
    std::fs::remove_file(weir.dir.path().join("policies/web-policy.wasm")).unwrap();
    let kube_default =
        || weir.metric("weir_policy_select_duration_seconds_count{policy=\"kube-default\"}");
    wait_until("kube-default decides", Duration::from_secs(10), || {
        kube_default() > 20
    })
    .await;

    // The Service's port moves: the clusterIP listener follows; the nodePort stays.
    let (cluster_count, cluster_failures) = via_cluster_ip.stop().await;
    // A client of the old port while it moves: each connection is served, or refused
    // once the listener is gone; none is accepted and then reset.
    let on_old_port = Traffic::start(cluster, None);
    on_old_port
        .until("the old port serves", 5, |s| s.len() == 3)
        .await;
    weir.write_objects("web.yaml", &web(8001, &ready(&[1, 2, 3])));
    let moved = SocketAddr::new(ip(T, 0, 10), 8001);
    let deadline = Instant::now() + Duration::from_secs(10);
    while who(moved, None).await.is_err() {
        assert!(Instant::now() < deadline, "the new port never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_refused(connect(cluster, None).await, "the old port");
    let (_, old_port_failures) = on_old_port.stop().await;
    let not_refused: Vec<&String> = old_port_failures
        .iter()
        .filter(|f| !f.contains("refused"))
        .collect();
    assert!(not_refused.is_empty(), "{not_refused:?}");
    via_node_port
        .until("the nodePort serves on", 6, |s| *s == names(T, &[1, 2, 3]))
        .await;

    let (count, failures) = via_node_port.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed of {count}: {failures:?}",
        failures.len()
    );
    assert!(
        cluster_failures.is_empty(),
        "{} failed of {cluster_count}: {cluster_failures:?}",
        cluster_failures.len()
    );
    assert!(
        count > 100 && cluster_count > 100,
        "{count} {cluster_count}"
    );
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_connections_survive_swaps_and_slice_changes() {
    const T: u8 = 24;
    let _backends = backends(T, 2).await;
    let node = ip(T, 0, 1);
    let web = |eps: &[Ep]| {
        service_yaml("web", ip(T, 0, 10), 8000, "", "weir.dev/policy: web-policy")
            + "---\n"
            + &slice_yaml("web", 8080, eps)
    };
    let both = [
        Ep::ready(ip(T, 1, 1), "node-a"),
        Ep::ready(ip(T, 1, 2), "node-a"),
    ];
    let weir = Weir::start(
        node,
        &[("web.yaml", web(&both))],
        &[("web-policy", guest_bytes("round-robin"))],
        "",
    )
    .await;
    let cluster = SocketAddr::new(ip(T, 0, 10), 8000);
    let mut stream = connect(cluster, None).await.unwrap();
    let first = greet(&mut stream).await.unwrap();
    let serving: IpAddr = first.split(':').next().unwrap().parse().unwrap();

    // Swap the policy and remove the endpoint this connection is on.
    let metrics = weir.app().metrics().proxy.clone();
    weir.write_policy("web-policy", &guest_bytes("random"));
    wait_until("the swap", Duration::from_secs(10), || {
        metrics.reloads_of("web-policy", ReloadResult::accepted) == 2
    })
    .await;
    let other: Vec<Ep> = both.iter().filter(|e| e.ip != serving).cloned().collect();
    weir.write_objects("web.yaml", &web(&other));
    let remaining = format!("{}:8080", other[0].ip);
    let deadline = Instant::now() + Duration::from_secs(10);
    while answers(cluster, None, 10).await != BTreeSet::from([remaining.clone()]) {
        assert!(
            Instant::now() < deadline,
            "new connections still reach the removed endpoint"
        );
    }

    // The old connection still carries data both ways, and closes cleanly: the client's
    // half-close reaches the backend, which finishes and closes its side.
    stream.write_all(b"still here\n").await.unwrap();
    let mut echoed = vec![0u8; 11];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"still here\n");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?} {rest:?}");
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_connections() {
    const T: u8 = 25;
    let _backends = backends(T, 1).await;
    let node = ip(T, 0, 1);
    let objects = [(
        "web.yaml",
        service_yaml("web", ip(T, 0, 10), 8000, "", "")
            + "---\n"
            + &slice_yaml("web", 8080, &[Ep::ready(ip(T, 1, 1), "node-a")]),
    )];
    let cluster = SocketAddr::new(ip(T, 0, 10), 8000);

    // Within the grace period: the transfer finishes.
    let weir = Weir::start(
        node,
        &objects,
        &[],
        "[proxy]\nshutdown_grace_period = \"20s\"",
    )
    .await;
    let mut stream = connect(cluster, None).await.unwrap();
    greet(&mut stream).await.unwrap();
    let mut buffer = vec![0u8; 64];
    let app = weir.app.as_ref().unwrap();
    wait_until("the connection is tracked", Duration::from_secs(5), || {
        app.connections() == 1
    })
    .await;
    let mut weir = weir;
    let app = weir.app.take().unwrap();
    let metrics = app.metrics().clone();
    let shutdown = tokio::spawn(app.shutdown());
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(cluster, None).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!shutdown.is_finished(), "waits for the open connection");
    let payload = vec![7u8; 1 << 20];
    let (mut reader, mut writer) = stream.into_split();
    let sender = tokio::spawn(async move {
        writer.write_all(&payload).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let mut received = Vec::new();
    reader.read_to_end(&mut received).await.unwrap();
    sender.await.unwrap();
    assert_eq!(received.len(), 1 << 20, "every byte echoed");
    let drained = tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown ends once the connection closes")
        .unwrap();
    assert!(!drained.forced);
    let text = metrics.encode();
    let bytes = |direction: &str| {
        format!(
            "weir_bytes_total{{service=\"default/web:http\",endpoint=\"{}:8080\",direction=\"{direction}\"}} {}",
            ip(T, 1, 1),
            (1 << 20) + 4
        )
    };
    // "who\n" and the payload each way (the backend echoes; its name line comes first).
    assert!(text.contains(&bytes("client_to_endpoint")), "{text}");

    // Past the grace period: the connection is closed by force.
    let weir = Weir::start(
        node,
        &objects,
        &[],
        "[proxy]\nshutdown_grace_period = \"200ms\"",
    )
    .await;
    let mut stream = connect(cluster, None).await.unwrap();
    greet(&mut stream).await.unwrap();
    let drained = weir.shutdown().await;
    assert!(drained.forced);
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection is closed: {read:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_retried_on_another() {
    const T: u8 = 26;
    // Endpoint 1 answers; endpoint 9 has nothing listening (connect is refused).
    let _backends = backends(T, 1).await;
    let node = ip(T, 0, 1);
    let eps = [
        Ep::ready(ip(T, 1, 1), "node-a"),
        Ep::ready(ip(T, 1, 9), "node-a"),
    ];
    let objects = [(
        "web.yaml",
        service_file("web", ip(T, 0, 10), "", None, &eps),
    )];
    let weir = Weir::start(node, &objects, &[], "").await;
    let cluster = SocketAddr::new(ip(T, 0, 10), 8000);
    // Every connection is served, whichever endpoint kube-default picks first.
    assert_eq!(answers(cluster, None, 40).await, names(T, &[1]));
    let metrics = weir.metrics();
    let unreachable = weir.metric(
        &format!(
            "weir_connections_failed_total{{service=\"default/web:http\",endpoint=\"{}:8080\",reason=\"endpoint_unreachable\"}}",
            ip(T, 1, 9)
        ),
    );
    assert!(
        unreachable > 0,
        "kube-default picked the dead endpoint at least once in 40\n{metrics}"
    );
    assert!(
        metrics.contains(
            "weir_connections_failed_total{service=\"default/web:http\",endpoint=\"\",reason=\"gave_up\"} 0"
        ),
        "{metrics}"
    );

    // With every endpoint dead, the client is reset after the attempts run out.
    weir.write_objects(
        "web.yaml",
        &service_file(
            "web",
            ip(T, 0, 10),
            "",
            None,
            &[Ep::ready(ip(T, 1, 9), "node-a")],
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match who(cluster, None).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "still served by the removed endpoint"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_ips_load_balancer_ips_and_source_ranges() {
    const T: u8 = 27;
    let _backends = backends(T, 2).await;
    let node = ip(T, 0, 1);
    let eps = [
        Ep::ready(ip(T, 1, 1), "node-a"),
        Ep::ready(ip(T, 1, 2), "node-b"),
    ];
    let spec = format!(
        "type: LoadBalancer\nexternalIPs: [\"{}\"]\nloadBalancerSourceRanges: [\"127.{T}.9.0/24\"]",
        ip(T, 0, 30)
    );
    let service = service_yaml("lb", ip(T, 0, 10), 8000, &spec, "")
        .replace(NODE_PORT_AT, &node_port(30080))
        + &format!(
            "status:\n  loadBalancer:\n    ingress:\n    - ip: {}\n",
            ip(T, 0, 20)
        )
        + "---\n"
        + &slice_yaml("lb", 8080, &eps);
    let weir = Weir::start(node, &[("lb.yaml", service)], &[], "").await;
    let both = names(T, &[1, 2]);
    let allowed = Some(ip(T, 9, 9));
    let denied = Some(ip(T, 8, 8));
    let lb = SocketAddr::new(ip(T, 0, 20), 8000);
    assert_eq!(answers(lb, allowed, 30).await, both);
    // Outside the source ranges: dropped at the LoadBalancer IP...
    assert_dropped(lb, denied).await;
    // ...but not at the externalIP or the nodePort, which the ranges do not cover.
    assert_eq!(
        answers(SocketAddr::new(ip(T, 0, 30), 8000), denied, 30).await,
        both
    );
    assert_eq!(
        answers(SocketAddr::new(node, 30080), denied, 30).await,
        both
    );
    let metrics = weir.metrics();
    assert!(
        metrics.contains(
            "weir_connections_failed_total{service=\"default/lb:http\",endpoint=\"\",reason=\"source_range\"} 1"
        ),
        "{metrics}"
    );
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_loses_nothing_and_keeps_the_node_healthy() {
    const T: u8 = 28;
    let _backends = backends(T, 2).await;
    let node = ip(T, 0, 1);
    let web = |policy: &str| {
        service_yaml(
            "web",
            ip(T, 0, 10),
            8000,
            "",
            &format!("weir.dev/policy: {policy}"),
        ) + "---\n"
            + &slice_yaml(
                "web",
                8080,
                &[
                    Ep::ready(ip(T, 1, 1), "node-a"),
                    Ep::ready(ip(T, 1, 2), "node-a"),
                ],
            )
    };
    let quiet = service_yaml(
        "quiet",
        ip(T, 0, 11),
        8000,
        "internalTrafficPolicy: Local",
        "",
    ) + "---\n"
        + &slice_yaml("quiet", 8080, &[Ep::ready(ip(T, 1, 1), "node-b")]);
    let weir = Weir::start(
        node,
        &[("web.yaml", web("a")), ("quiet.yaml", quiet)],
        &[
            ("a", guest_bytes("round-robin")),
            ("b", guest_bytes("maglev")),
        ],
        "health_timeout = \"300ms\"\n[proxy]\ndrop_timeout = \"300ms\"",
    )
    .await;
    let cluster = SocketAddr::new(ip(T, 0, 10), 8000);
    let traffic = Traffic::start(cluster, None);
    traffic
        .until("round-robin serves both", 6, |s| *s == names(T, &[1, 2]))
        .await;

    // A broken module and a broken objects file: both rejected, nothing lost.
    let metrics = weir.app().metrics().proxy.clone();
    weir.write_policy("a", b"not wasm");
    weir.write_objects("web.yaml", "kind: Service\nmetadata: [broken");
    wait_until("both are rejected", Duration::from_secs(10), || {
        metrics.reloads_of("a", ReloadResult::rejected) == 1
            && metrics.reloads_of("objects", ReloadResult::rejected) >= 1
    })
    .await;
    // Past the health timeout, the node stays healthy: a rejected change is not pending.
    let until = Instant::now() + Duration::from_millis(900);
    while Instant::now() < until {
        assert_eq!(
            weir.admin_get("/livez").await.0,
            200,
            "a rejection made the node unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    traffic
        .until("round-robin still serves both", 6, |s| {
            *s == names(T, &[1, 2])
        })
        .await;

    // The Service moves to another policy under traffic: maglev pins this client.
    weir.write_objects("web.yaml", &web("b"));
    traffic.until("maglev serves", 8, |s| s.len() == 1).await;
    // And to a policy that does not exist: the built-in kube-default.
    weir.write_objects("web.yaml", &web("missing"));
    traffic
        .until("kube-default serves", 20, |s| s.len() == 2)
        .await;

    // A drop without client bytes: closed after the drop timeout, with nothing sent.
    let mut stream = connect(SocketAddr::new(ip(T, 0, 11), 8000), None)
        .await
        .unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "dropped without a reply: {read:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "held for the drop timeout"
    );

    let (count, failures) = traffic.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed of {count}: {failures:?}",
        failures.len()
    );
    assert_eq!(weir.admin_get("/healthz").await.0, 200);
    weir.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_applied_one_by_one_equal_a_fresh_start() {
    const T: u8 = 29;
    let node = ip(T, 0, 1);
    let eps = |hosts: &[u8], node: &'static str| -> Vec<Ep> {
        hosts
            .iter()
            .map(|n| Ep::ready(ip(T, 1, *n), node))
            .collect()
    };
    let lb = |local: &[u8]| {
        service_yaml(
            "lb",
            ip(T, 0, 10),
            8000,
            "type: LoadBalancer\nexternalTrafficPolicy: Local\nhealthCheckNodePort: 30256",
            "",
        )
        .replace(NODE_PORT_AT, &node_port(30080))
            + "---\n"
            + &slice_yaml("lb", 8080, &eps(local, "node-a"))
    };
    let plain = |name: &str, host: u8, port: u16| service_yaml(name, ip(T, 0, host), port, "", "");
    let weir = Weir::start(
        node,
        &[
            ("lb.yaml", lb(&[1, 2])),
            ("b.yaml", plain("b", 11, 8000)),
            ("b-slice.yaml", slice_yaml("b", 8080, &eps(&[3], "node-b"))),
            (
                "c.yaml",
                service_file("c", ip(T, 0, 12), "", None, &eps(&[4], "node-a")),
            ),
        ],
        &[],
        "",
    )
    .await;
    let app = weir.app();
    // Each change, then wait until it shows, so that every one is its own sync.
    weir.write_objects("lb.yaml", &lb(&[1]));
    wait_until("lb counts 1", Duration::from_secs(10), || {
        app.health_counts().get(&("default".into(), "lb".into())) == Some(&1)
    })
    .await;
    std::fs::remove_file(weir.dir.path().join("objects/c.yaml")).unwrap();
    wait_until("c is gone", Duration::from_secs(10), || {
        !app.routes().iter().any(|(a, _, _)| a.ip() == ip(T, 0, 12))
    })
    .await;
    // b's slice moves into b's file; b's port moves.
    std::fs::remove_file(weir.dir.path().join("objects/b-slice.yaml")).unwrap();
    weir.write_objects(
        "b.yaml",
        &(plain("b", 11, 8001) + "---\n" + &slice_yaml("b", 8080, &eps(&[3, 5], "node-b"))),
    );
    wait_until("b moved", Duration::from_secs(10), || {
        app.routes().iter().any(|(a, s, _)| {
            *a == SocketAddr::new(ip(T, 0, 11), 8001) && *s == weir_sdk::Scope::Internal
        })
    })
    .await;
    // d takes the address c had.
    weir.write_objects(
        "d.yaml",
        &(service_file("d", ip(T, 0, 12), "", None, &eps(&[6], "node-a"))),
    );
    wait_until("d serves", Duration::from_secs(10), || {
        app.routes().iter().any(|(a, _, _)| a.ip() == ip(T, 0, 12))
    })
    .await;
    // e wants d's address while d has it; once d is gone, e gets it, as at a fresh start.
    let syncs = || weir.metric("weir_sync_proxy_rules_duration_seconds_count");
    let before = syncs();
    weir.write_objects(
        "e.yaml",
        &(service_file("e", ip(T, 0, 12), "", None, &eps(&[7], "node-a"))),
    );
    wait_until("e is applied", Duration::from_secs(10), || syncs() > before).await;
    let owner = |service: &str| {
        app.routes()
            .iter()
            .any(|(a, _, s)| a.ip() == ip(T, 0, 12) && s == service)
    };
    assert!(owner("default/d:http"), "d keeps its address while e waits");
    std::fs::remove_file(weir.dir.path().join("objects/d.yaml")).unwrap();
    // Whether e's file was read before d left (e waits, then is retried) or with d's
    // removal, e ends up with the address, as at a fresh start.
    wait_until(
        "e takes the address d left",
        Duration::from_secs(10),
        || owner("default/e:http"),
    )
    .await;
    // "aa" comes before "e": it takes the address over, as it would at a fresh start.
    weir.write_objects(
        "aa.yaml",
        &(service_file("aa", ip(T, 0, 12), "", None, &eps(&[8], "node-a"))),
    );
    wait_until("aa owns the address", Duration::from_secs(10), || {
        owner("default/aa:http")
    })
    .await;
    let (routes, counts) = (app.routes(), app.health_counts());
    let mut files: Vec<(String, String)> = std::fs::read_dir(weir.dir.path().join("objects"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    assert!(!weir.shutdown().await.forced);

    // A fresh weir on the same files builds the same table.
    let objects: Vec<(&str, String)> = files.iter().map(|(n, y)| (n.as_str(), y.clone())).collect();
    let fresh = Weir::start(node, &objects, &[], "").await;
    assert_eq!(fresh.app().routes(), routes);
    assert_eq!(fresh.app().health_counts(), counts);
    assert_eq!(
        routes.len(),
        // lb: clusterIP, nodePort; b: clusterIP; d: clusterIP.
        4,
        "{routes:?}"
    );
    fresh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_without_a_policy_get_the_nodes_default_and_kube_default_opts_out() {
    const T: u8 = 37;
    let _backends = backends(T, 3).await;
    let node = ip(T, 0, 1);
    let eps = [
        Ep::ready(ip(T, 1, 1), "node-a"),
        Ep::ready(ip(T, 1, 2), "node-a"),
        Ep::ready(ip(T, 1, 3), "node-a"),
    ];
    let plain = service_yaml("plain", ip(T, 0, 10), 8000, "", "")
        + "---\n"
        + &slice_yaml("plain", 8080, &eps);
    let opted_out = service_yaml(
        "opted-out",
        ip(T, 0, 11),
        8000,
        "",
        "weir.dev/policy: kube-default",
    ) + "---\n"
        + &slice_yaml("opted-out", 8080, &eps);
    // The default policy is the test guest; with this config it always answers the first
    // eligible endpoint.
    let weir = Weir::start(
        node,
        &[("plain.yaml", plain), ("opted-out.yaml", opted_out)],
        &[("echo", guest_bytes("hostile"))],
        "[policies]\ndefault = \"echo\"\ndefault_config = \"spin-select:0\"\n",
    )
    .await;
    let plain = answers(SocketAddr::new(ip(T, 0, 10), 8000), None, 20).await;
    assert_eq!(plain.len(), 1, "the default policy decides: {plain:?}");
    let opted_out = answers(SocketAddr::new(ip(T, 0, 11), 8000), None, 30).await;
    assert!(opted_out.len() > 1, "kube-default spreads: {opted_out:?}");
    assert_eq!(weir.metric("weir_policy_failures_total"), 0);
    weir.shutdown().await;
}

/// A valid component of `functions` empty functions: cheap to ship, costly to compile.
fn compile_bomb(functions: u32) -> Vec<u8> {
    use wasm_encoder::{CodeSection, Function, FunctionSection, Instruction, Module, TypeSection};
    let mut types = TypeSection::new();
    types.ty().function([], []);
    let mut declared = FunctionSection::new();
    let mut code = CodeSection::new();
    let mut body = Function::new([]);
    body.instruction(&Instruction::End);
    for _ in 0..functions {
        declared.function(0);
        code.function(&body);
    }
    let mut module = Module::new();
    module.section(&types).section(&declared).section(&code);
    let mut component = wasm_encoder::Component::new();
    component.section(&wasm_encoder::ModuleSection(&module));
    component.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_bomb_is_refused_while_object_changes_keep_applying() {
    const T: u8 = 38;
    let _backends = backends(T, 2).await;
    let node = ip(T, 0, 1);
    let web = |n: u8| {
        service_yaml("web", ip(T, 0, 10), 8000, "", "")
            + "---\n"
            + &slice_yaml("web", 8080, &[Ep::ready(ip(T, 1, n), "node-a")])
    };
    let weir = Weir::start(
        node,
        &[("web.yaml", web(1))],
        &[],
        "[limits]\ncompile_timeout = \"4s\"\n",
    )
    .await;
    let cluster = SocketAddr::new(ip(T, 0, 10), 8000);
    assert_eq!(answers(cluster, None, 3).await, names(T, &[1]));

    let refused = "weir_policy_rejections_total{policy=\"bomb\",reason=\"compile_budget\"}";
    // The bomb and an object change arrive together: the change must not wait for it.
    weir.write_policy("bomb", &compile_bomb(400_000));
    weir.write_objects("web.yaml", &web(2));
    let deadline = Instant::now() + Duration::from_secs(30);
    while answers(cluster, None, 1).await != names(T, &[2]) {
        assert!(Instant::now() < deadline, "the object change never applied");
    }
    assert_eq!(
        weir.metric(refused),
        0,
        "the change applied while the bomb was still compiling, not after"
    );
    wait_until("the bomb is refused", Duration::from_secs(30), || {
        weir.metric(refused) == 1
    })
    .await;
    // Still serving, and nothing of it was cached or loaded.
    assert_eq!(answers(cluster, None, 3).await, names(T, &[2]));
    weir.shutdown().await;
}

/// The series of an endpoint that left, and of a Service that is gone, leave /metrics;
/// with `admin.metrics_address` set, /metrics moves there and the admin port keeps the
/// probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_what_is_served_and_can_move_off_the_admin_port() {
    const T: u8 = 41;
    let _backends = backends(T, 3).await;
    let two = [
        Ep::ready(ip(T, 1, 1), "node-a"),
        Ep::ready(ip(T, 1, 2), "node-a"),
    ];
    let objects = vec![
        (
            "web.yaml",
            service_file("web", ip(T, 0, 10), "", None, &two),
        ),
        (
            "api.yaml",
            service_file(
                "api",
                ip(T, 0, 11),
                "",
                None,
                &[Ep::ready(ip(T, 1, 3), "node-a")],
            ),
        ),
    ];
    let weir = Weir::start(
        ip(T, 0, 1),
        &objects,
        &[],
        "metrics_address = \"127.0.0.1:0\"\nmetrics_linger = \"0s\"",
    )
    .await;
    let web = SocketAddr::new(ip(T, 0, 10), 8000);
    assert_eq!(answers(web, None, 40).await, names(T, &[1, 2]));
    assert_eq!(
        answers(SocketAddr::new(ip(T, 0, 11), 8000), None, 3).await,
        names(T, &[3])
    );

    let metrics_address = weir.app().metrics_address().expect("a metrics port");
    let (status, body) = weir.admin_get("/metrics").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains(&metrics_address.to_string()), "{body}");
    assert_eq!(weir.admin_get("/livez").await.0, 200);
    let scrape = http_get(metrics_address, "/metrics").await.unwrap();
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    let second = format!("endpoint=\"{}:8080\"", ip(T, 1, 2));
    assert!(scrape.contains(&second), "{scrape}");
    assert!(scrape.contains("service=\"default/api:http\""), "{scrape}");

    // One endpoint leaves: its series go, the other's stay.
    weir.write_objects(
        "web.yaml",
        &service_file("web", ip(T, 0, 10), "", None, &two[..1]),
    );
    let wait = Duration::from_secs(30);
    wait_until("the endpoint's series leave", wait, || {
        !weir.metrics().contains(&second)
    })
    .await;
    let first = format!("endpoint=\"{}:8080\"", ip(T, 1, 1));
    assert!(weir.metrics().contains(&first));

    // The Service leaves: every series of its port goes.
    weir.remove_objects("api.yaml");
    wait_until("the Service's series leave", wait, || {
        !weir.metrics().contains("service=\"default/api:http\"")
    })
    .await;
    weir.shutdown().await;
}

/// `proxy.max_connections_per_service`: past it the listener stops accepting (the
/// client waits in the backlog, nothing spins) until a connection closes, and the wait
/// is counted. A Service's `weir.dev/idle-timeout` closes connections that stay silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_pause_accepting_and_idle_connections_are_closed() {
    const T: u8 = 43;
    let _backends = backends(T, 1).await;
    let one = [Ep::ready(ip(T, 1, 1), "node-a")];
    let idle_service = service_yaml("idle", ip(T, 0, 11), 8000, "", "weir.dev/idle-timeout: 1s")
        + "---\n"
        + &slice_yaml("idle", 8080, &one);
    let objects = vec![
        (
            "web.yaml",
            service_file("web", ip(T, 0, 10), "", None, &one),
        ),
        ("idle.yaml", idle_service),
    ];
    let weir = Weir::start(
        ip(T, 0, 1),
        &objects,
        &[],
        "[proxy]\nmax_connections_per_service = 3\n",
    )
    .await;
    let web = SocketAddr::new(ip(T, 0, 10), 8000);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = connect(web, None).await.unwrap();
        greet(&mut stream).await.expect("served");
        held.push(stream);
    }
    let limit =
        "weir_connection_limit_reached_total{service=\"default/web:http\",limit=\"service\"}";
    wait_until("the cap is counted", Duration::from_secs(10), || {
        weir.metric(limit) >= 1
    })
    .await;
    // A fourth client's handshake completes in the kernel; weir does not take it yet.
    let fourth = tokio::spawn(who(web, None));
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_millis(500) {
        assert!(!fourth.is_finished(), "served past the cap");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held.pop());
    let name = tokio::time::timeout(Duration::from_secs(5), fourth)
        .await
        .expect("served once one closed")
        .unwrap()
        .unwrap();
    assert_eq!(name, format!("{}:8080", ip(T, 1, 1)));

    // Idle for its Service's 1 s: closed by weir (end of stream), and counted.
    let mut idle = connect(SocketAddr::new(ip(T, 0, 11), 8000), None)
        .await
        .unwrap();
    greet(&mut idle).await.expect("served");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "an idle connection stayed open");
    let timed_out =
        "weir_connections_timed_out_total{service=\"default/idle:http\",timeout=\"idle\"}";
    assert_eq!(weir.metric(timed_out), 1);
    // The other Service has no idle timeout: its connections stay.
    assert_eq!(
        weir.metric(
            "weir_connections_timed_out_total{service=\"default/web:http\",timeout=\"idle\"}"
        ),
        0
    );
    drop(held);
    weir.shutdown().await;
}

/// `weir.dev/proxy-protocol`: real receivers (HAProxy `accept-proxy` for v2, nginx
/// `proxy_protocol` for v1) see the client's own address and port. With
/// `weir.dev/accept-proxy-protocol`, the header a load balancer sends on the
/// LoadBalancer IP gives the client instead, one without it is refused and counted, and
/// the clusterIP expects none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_see_the_client_through_the_proxy_protocol() {
    use weir::proxy::proxy_protocol::{Transport, Version, encode};
    use weir::test_helpers::peers::{self, Peer};
    const T: u8 = 44;
    if !peers::available(
        &["haproxy", "nginx"],
        "endpoints_see_the_client_through_the_proxy_protocol",
    ) {
        return;
    }
    let haproxy = Peer::haproxy(SocketAddr::new(ip(T, 1, 1), 8080));
    let nginx = Peer::nginx(SocketAddr::new(ip(T, 1, 2), 8080));
    let file = |name: &str, cluster: u8, endpoint: &Peer, annotations: &str, extra: &str| {
        service_yaml(name, ip(T, 0, cluster), 8000, extra, annotations)
            + "---\n"
            + &slice_yaml(name, 8080, &[Ep::ready(endpoint.address.ip(), "node-a")])
    };
    let lb_ip = ip(T, 0, 30);
    let load_balancer = file(
        "lb",
        12,
        &haproxy,
        "weir.dev/proxy-protocol: v2\nweir.dev/accept-proxy-protocol: \"true\"",
        "type: LoadBalancer",
    )
    .replacen(
        "---\n",
        &format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {lb_ip}\n---\n"),
        1,
    );
    let objects = vec![
        (
            "v2.yaml",
            file("v2", 10, &haproxy, "weir.dev/proxy-protocol: v2", ""),
        ),
        (
            "v1.yaml",
            file("v1", 11, &nginx, "weir.dev/proxy-protocol: v1", ""),
        ),
        ("lb.yaml", load_balancer),
    ];
    let weir = Weir::start(ip(T, 0, 1), &objects, &[], "").await;

    for (cluster, receiver) in [(10, "haproxy"), (11, "nginx")] {
        let stream = connect(SocketAddr::new(ip(T, 0, cluster), 8000), Some(ip(T, 9, 9)))
            .await
            .unwrap();
        let client = stream.local_addr().unwrap();
        let seen = peers::get(stream, b"").await.unwrap();
        assert_eq!(
            seen,
            client.to_string(),
            "{receiver} saw weir, not the client"
        );
    }

    // From a load balancer: its header names the client, which the endpoint sees.
    let lb = SocketAddr::new(lb_ip, 8000);
    let original: SocketAddr = "198.18.5.5:4242".parse().unwrap();
    let header = encode(Version::V1, Transport::Stream, original, lb);
    let stream = connect(lb, Some(ip(T, 9, 8))).await.unwrap();
    assert_eq!(
        peers::get(stream, &header).await.unwrap(),
        original.to_string()
    );
    let header = encode(Version::V2, Transport::Stream, original, lb);
    let stream = connect(lb, Some(ip(T, 9, 8))).await.unwrap();
    assert_eq!(
        peers::get(stream, &header).await.unwrap(),
        original.to_string()
    );
    // Without one: refused, counted.
    let stream = connect(lb, Some(ip(T, 9, 8))).await.unwrap();
    assert!(
        peers::get(stream, b"").await.is_err(),
        "served without a header"
    );
    assert_eq!(
        weir.metric("weir_proxy_protocol_refused_total{service=\"default/lb:http\"}"),
        1
    );
    // The clusterIP of the same Service is not behind the load balancer.
    let stream = connect(SocketAddr::new(ip(T, 0, 12), 8000), Some(ip(T, 9, 7)))
        .await
        .unwrap();
    let client = stream.local_addr().unwrap();
    assert_eq!(peers::get(stream, b"").await.unwrap(), client.to_string());
    weir.shutdown().await;
    drop((haproxy, nginx));
}
