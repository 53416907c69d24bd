//! Kubernetes mode end to end, in process: weir's real kube-rs client against the test API
//! server (list, watch, bookmarks, 410 Gone, dropped connections, restarts), real
//! listeners and backends on 127.0.0.0/8. Each test owns 127.T.0.0/16 (T = 31..): Services
//! on 127.T.0.x, backends on 127.T.1.x, the node at 127.T.0.1.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir::app::App;
use weir::test_helpers::apiserver::ApiServer;
use weir::test_helpers::kube_objects::{
    kubernetes_config, node_json, policies_json, service_json, slice_json,
};
use weir::test_helpers::{backends, guest_bytes, wait_until, who};

const WAIT: Duration = Duration::from_secs(30);

fn ip(test: u8, host: u8, n: u8) -> IpAddr {
    IpAddr::from([127, test, host, n])
}

fn node(test: u8) -> Value {
    node_json("node-a", &ip(test, 0, 1).to_string())
}

fn service(name: &str, cluster_ip: IpAddr, policy: Option<&str>) -> Value {
    service_json(name, &cluster_ip.to_string(), 8000, policy)
}

fn slice(service: &str, endpoints: &[IpAddr]) -> Value {
    let endpoints: Vec<(String, &str)> = endpoints
        .iter()
        .map(|ip| (ip.to_string(), "node-a"))
        .collect();
    let endpoints: Vec<(&str, &str)> = endpoints.iter().map(|(ip, n)| (ip.as_str(), *n)).collect();
    slice_json(service, &endpoints)
}

fn policies(modules: &[(&str, Vec<u8>)], settings: Option<&str>) -> Value {
    policies_json(modules, settings)
}

/// weir in Kubernetes mode, in process, against `api`.
struct KubeWeir {
    app: Option<App>,
    _dir: tempfile::TempDir,
}

impl KubeWeir {
    /// Starts weir; returns at once (not waiting for it to be ready).
    fn start(api: &ApiServer, extra: &str) -> KubeWeir {
        let dir = tempfile::tempdir().unwrap();
        let path = kubernetes_config(
            api,
            dir.path(),
            "capture_interface = \"\"",
            &format!(
                "{extra}\n[admin]\naddress = \"127.0.0.1:0\"\n\
                 [limits]\nselect_deadline = \"50ms\"\nupdate_deadline = \"500ms\"\n"
            ),
        );
        let config = weir::config::Config::load(&path).expect("valid test config");
        let app = App::start(config).expect("weir starts");
        KubeWeir {
            app: Some(app),
            _dir: dir,
        }
    }

    async fn ready(api: &ApiServer, extra: &str) -> KubeWeir {
        let weir = KubeWeir::start(api, extra);
        let app = weir.app();
        wait_until("weir is ready", WAIT, || app.pending().is_empty()).await;
        weir
    }

    fn app(&self) -> &App {
        self.app.as_ref().unwrap()
    }

    fn metric(&self, sample: &str) -> u64 {
        self.app()
            .metrics()
            .encode()
            .lines()
            .find(|l| l.starts_with(sample))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }
}

impl Drop for KubeWeir {
    fn drop(&mut self) {
        if let Some(app) = self.app.take() {
            // Closes its listeners; the test's runtime is still there to drive it.
            let handle = tokio::runtime::Handle::current();
            let _ = std::thread::scope(|s| s.spawn(|| handle.block_on(app.shutdown())).join());
        }
    }
}

fn names(test: u8, hosts: &[u8]) -> BTreeSet<String> {
    hosts
        .iter()
        .map(|n| format!("{}:8080", ip(test, 1, *n)))
        .collect()
}

/// Waits until `count` connections to `address` are answered by exactly `expected`.
async fn wait_for_backends(address: SocketAddr, count: usize, expected: &BTreeSet<String>) {
    let end = std::time::Instant::now() + WAIT;
    loop {
        let mut seen = BTreeSet::new();
        for _ in 0..count {
            if let Ok(name) = who(address, None).await {
                seen.insert(name);
            }
        }
        if &seen == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "{address}: answered by {seen:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn event_with(api: &ApiServer, reason: &str, text: &str) -> Option<Value> {
    api.wait_for_event(
        |e| e["reason"] == reason && e["note"].as_str().is_some_and(|n| n.contains(text)),
        WAIT,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_slices_appear_change_and_disappear() {
    const T: u8 = 31;
    let _backends = backends(T, 3).await;
    let api = ApiServer::start();
    api.apply(node(T));
    api.apply(service("web", ip(T, 0, 10), None));
    api.apply(slice("web", &[ip(T, 1, 1), ip(T, 1, 2)]));
    // Headless, ExternalName and another proxy's Services are not weir's.
    let mut headless = service("headless", ip(T, 0, 11), None);
    headless["spec"]["clusterIP"] = json!("None");
    api.apply(headless);
    let mut other = service("other", ip(T, 0, 12), None);
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "cilium"});
    api.apply(other);
    api.apply(slice("other", &[ip(T, 1, 3)]));

    let weir = KubeWeir::ready(&api, "").await;
    let web = SocketAddr::new(ip(T, 0, 10), 8000);
    wait_for_backends(web, 20, &names(T, &[1, 2])).await;
    let other = SocketAddr::new(ip(T, 0, 12), 8000);
    assert!(who(other, None).await.is_err(), "another proxy's Service");

    // Endpoints change; a Service appears; one is relabelled away; one is deleted.
    api.apply(slice("web", &[ip(T, 1, 3)]));
    wait_for_backends(web, 10, &names(T, &[3])).await;
    api.apply(service("api", ip(T, 0, 13), None));
    api.apply(slice("api", &[ip(T, 1, 1)]));
    let api_address = SocketAddr::new(ip(T, 0, 13), 8000);
    wait_for_backends(api_address, 5, &names(T, &[1])).await;
    let mut relabelled = service("api", ip(T, 0, 13), None);
    relabelled["metadata"]["labels"] =
        json!({"service.kubernetes.io/service-proxy-name": "cilium"});
    api.apply(relabelled);
    wait_until("a relabelled Service is let go", WAIT, || {
        !weir
            .app()
            .routes()
            .iter()
            .any(|(address, _, _)| *address == api_address)
    })
    .await;
    // kube-proxy's node eligibility: a Node tainted for deletion fails /healthz.
    let admin = weir.app().admin_address();
    let healthz = || async move {
        let response = weir::test_helpers::http_get(admin, "/healthz")
            .await
            .unwrap();
        response[9..12].to_string()
    };
    assert_eq!(healthz().await, "200");
    let mut tainted = node(T);
    tainted["spec"] = json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}]});
    api.apply(tainted);
    let end = std::time::Instant::now() + WAIT;
    while healthz().await != "503" {
        assert!(
            std::time::Instant::now() < end,
            "/healthz stays 200 on a tainted Node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.apply(node(T));

    assert!(api.delete("Service", Some("default"), "web"));
    wait_until("a deleted Service is let go", WAIT, || {
        !weir
            .app()
            .routes()
            .iter()
            .any(|(address, _, _)| *address == web)
    })
    .await;
    assert!(who(web, None).await.is_err(), "refused once deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_the_first_list_and_survives_the_api_server() {
    const T: u8 = 32;
    let _backends = backends(T, 3).await;
    let api = ApiServer::start();
    api.apply(node(T));
    api.apply(service("web", ip(T, 0, 10), None));
    api.apply(slice("web", &[ip(T, 1, 1)]));
    api.stop();

    // Not ready while the API server is away, and says why.
    let weir = KubeWeir::start(&api, "");
    wait_until("/readyz names what it waits for", WAIT, || {
        weir.app()
            .pending()
            .iter()
            .any(|p| p.starts_with("services:"))
    })
    .await;
    api.restart();
    wait_until("weir is ready", WAIT, || weir.app().pending().is_empty()).await;
    let web = SocketAddr::new(ip(T, 0, 10), 8000);
    wait_for_backends(web, 5, &names(T, &[1])).await;

    // A client loop runs through watch expiry, dropped connections and a restart.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let client = tokio::spawn({
        let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                match who(web, None).await {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
    });

    let lists = api.requests("services", false);
    api.expire();
    wait_until("a relist after 410 Gone", WAIT, || {
        api.requests("services", false) > lists
    })
    .await;
    api.apply(slice("web", &[ip(T, 1, 1), ip(T, 1, 2)]));
    wait_for_backends(web, 20, &names(T, &[1, 2])).await;

    api.drop_connections();
    api.apply(slice("web", &[ip(T, 1, 2)]));
    wait_for_backends(web, 10, &names(T, &[2])).await;

    // Away for a while: routing stays; what changed meanwhile arrives on return.
    api.stop();
    let before = served.load(Ordering::Relaxed);
    wait_until("traffic flows with the API server away", WAIT, || {
        served.load(Ordering::Relaxed) > before + 20
    })
    .await;
    api.apply(slice("web", &[ip(T, 1, 3)]));
    api.restart();
    wait_for_backends(web, 10, &names(T, &[3])).await;

    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed connections");
    assert!(served.load(Ordering::Relaxed) > 0);
}

/// The API server is away long enough for a growing backoff to reach tens of seconds,
/// and its history is compacted meanwhile (each watch's resourceVersion is then 410
/// Expired): a change made right after it returns is routed within seconds, not after
/// the 8-56 s that kube-runtime's default backoff took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_follows_a_change_within_seconds_of_the_api_servers_return() {
    const T: u8 = 40;
    let _backends = backends(T, 3).await;
    let api = ApiServer::start();
    api.apply(node(T));
    api.apply(service("web", ip(T, 0, 10), None));
    api.apply(slice("web", &[ip(T, 1, 1)]));
    let weir = KubeWeir::ready(&api, "").await;
    let web = SocketAddr::new(ip(T, 0, 10), 8000);
    wait_for_backends(web, 5, &names(T, &[1])).await;

    api.stop();
    // The outage itself: its length is the scenario, not a wait for something.
    tokio::time::sleep(Duration::from_secs(15)).await;
    // Changes made meanwhile, then compacted away: every watch's resourceVersion is gone.
    api.apply(service("other", ip(T, 0, 11), None));
    api.expire();
    api.restart();
    let back = Instant::now();
    api.apply(slice("web", &[ip(T, 1, 2)]));
    // The target is 3 s (a 2 s cap on the backoff, then a relist at once); the deadline
    // leaves room for a loaded machine and is below what the default backoff takes.
    let deadline = Duration::from_secs(5);
    loop {
        let mut seen = BTreeSet::new();
        for _ in 0..5 {
            if let Ok(name) = who(web, None).await {
                seen.insert(name);
            }
        }
        if seen == names(T, &[2]) {
            break;
        }
        assert!(
            back.elapsed() < deadline,
            "still routed to {seen:?} {:?} after the API server came back",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "routing followed {:?} after the API server came back",
        back.elapsed()
    );
    assert!(weir.app().pending().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_policies_swap_with_events() {
    const T: u8 = 33;
    let _backends = backends(T, 3).await;
    let api = ApiServer::start();
    api.apply(node(T));
    api.apply(service("web", ip(T, 0, 10), Some("maglev")));
    api.apply(slice("web", &[ip(T, 1, 1), ip(T, 1, 2), ip(T, 1, 3)]));
    api.apply(policies(&[("maglev", guest_bytes("maglev"))], None));
    let weir = KubeWeir::ready(&api, "").await;
    let maglev_sha = weir::policy::sha256_hex(&guest_bytes("maglev"));
    let loaded = event_with(&api, "PolicyLoaded", &maglev_sha).expect("a PolicyLoaded Event");
    assert_eq!(loaded["regarding"]["kind"], "ConfigMap");
    assert_eq!(loaded["regarding"]["name"], "weir-policies");
    assert_eq!(loaded["type"], "Normal");
    // maglev: one client address always reaches one backend.
    let web = SocketAddr::new(ip(T, 0, 10), 8000);
    let first = who(web, None).await.unwrap();
    for _ in 0..10 {
        assert_eq!(
            who(web, None).await.unwrap(),
            first,
            "maglev keeps a client"
        );
    }

    // Round-robin swapped in: all three backends take turns.
    let round_robin = guest_bytes("round-robin");
    api.apply(policies(
        &[
            ("maglev", round_robin.clone()),
            ("spare", guest_bytes("random")),
        ],
        None,
    ));
    wait_for_backends(web, 9, &names(T, &[1, 2, 3])).await;
    event_with(
        &api,
        "PolicyLoaded",
        &weir::policy::sha256_hex(&round_robin),
    )
    .unwrap_or_else(|| panic!("{:#?}", api.events()));

    // A broken module: rejected with an Event naming it, its digest and why; the
    // version loaded keeps serving.
    let broken = b"\0asm but not really".to_vec();
    let broken_sha = weir::policy::sha256_hex(&broken);
    api.apply(policies(&[("maglev", broken)], None));
    let rejected = event_with(&api, "PolicyRejected", &broken_sha).expect("PolicyRejected");
    let note = rejected["note"].as_str().unwrap();
    assert!(
        note.contains("maglev.wasm") && note.contains("keeps serving"),
        "{note}"
    );
    assert_eq!(rejected["type"], "Warning");
    assert!(weir.metric("weir_policy_rejections_total{policy=\"maglev\"") >= 1);
    wait_for_backends(web, 9, &names(T, &[1, 2, 3])).await;

    // A pinned digest refuses any other module.
    let pin = weir::policy::sha256_hex(&round_robin);
    let maglev = guest_bytes("maglev");
    api.apply(policies(
        &[("maglev", maglev.clone())],
        Some(&format!("[maglev]\nsha256 = \"{pin}\"\n")),
    ));
    let pinned = event_with(&api, "PolicyRejected", "pins").expect("pin mismatch");
    assert!(pinned["note"].as_str().unwrap().contains(&maglev_sha));
    // The pinned module gzipped (maglev.wasm.gz) is that module: it loads, and the pin
    // names the module's own digest, not the gzip's.
    let loads_of_pin = || {
        (api.events().iter())
            .filter(|e| e["reason"] == "PolicyLoaded")
            .filter(|e| e["note"].as_str().is_some_and(|n| n.contains(&pin)))
            .count()
    };
    let before = loads_of_pin();
    let gzipped = {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&round_robin).unwrap();
        encoder.finish().unwrap()
    };
    api.apply(policies(
        &[("maglev", gzipped)],
        Some(&format!("[maglev]\nsha256 = \"{pin}\"\n")),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while loads_of_pin() == before {
        assert!(Instant::now() < deadline, "maglev.wasm.gz did not load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Settings that do not parse change nothing, and say so.
    api.apply(policies(
        &[("maglev", maglev)],
        Some("[maglev]\nfailure = 1\n"),
    ));
    event_with(&api, "PolicyRejected", "policies.toml: line 2").expect("bad settings");
    wait_for_backends(web, 9, &names(T, &[1, 2, 3])).await;

    // A Service naming a policy that is not shipped gets an Event, and kube-default.
    api.apply(service("api", ip(T, 0, 11), Some("absent")));
    api.apply(slice("api", &[ip(T, 1, 1)]));
    let fallback = event_with(&api, "PolicyFallback", "absent").expect("PolicyFallback");
    assert_eq!(fallback["regarding"]["kind"], "Service");
    assert_eq!(fallback["regarding"]["name"], "api");
    assert_eq!(fallback["regarding"]["namespace"], "default");
    wait_for_backends(SocketAddr::new(ip(T, 0, 11), 8000), 3, &names(T, &[1])).await;

    // The module removed: its Services go back to kube-default.
    api.apply(policies(&[], None));
    event_with(&api, "PolicyRemoved", "maglev.wasm").expect("PolicyRemoved");
    wait_for_backends(web, 12, &names(T, &[1, 2, 3])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_proxy_name_selects_the_labelled_services() {
    const T: u8 = 34;
    let _backends = backends(T, 2).await;
    let api = ApiServer::start();
    api.apply(node(T));
    api.apply(service("plain", ip(T, 0, 10), None));
    api.apply(slice("plain", &[ip(T, 1, 1)]));
    let mut ours = service("ours", ip(T, 0, 11), None);
    ours["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "weir"});
    api.apply(ours);
    let mut ours_slice = slice("ours", &[ip(T, 1, 2)]);
    ours_slice["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("weir");
    api.apply(ours_slice);
    let weir = KubeWeir::ready(&api, "service_proxy_name = \"weir\"").await;
    wait_for_backends(SocketAddr::new(ip(T, 0, 11), 8000), 3, &names(T, &[2])).await;
    let routes: Vec<SocketAddr> = weir.app().routes().iter().map(|r| r.0).collect();
    assert_eq!(
        routes,
        [SocketAddr::new(ip(T, 0, 11), 8000)],
        "only the labelled Service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_from_configmaps_selected_by_label() {
    const T: u8 = 35;
    let _backends = backends(T, 1).await;
    let api = ApiServer::start();
    api.apply(node(T));
    let named = |name: &str, module: &str, labelled: bool| {
        let mut map = policies(&[(module, guest_bytes("round-robin"))], None);
        map["metadata"]["name"] = json!(name);
        if labelled {
            map["metadata"]["labels"] = json!({"weir.dev/policies": "true"});
        }
        map
    };
    api.apply(named("policies-a", "first", true));
    api.apply(named("policies-b", "second", true));
    api.apply(named("elsewhere", "third", false));
    api.apply(service("web", ip(T, 0, 10), Some("second")));
    api.apply(slice("web", &[ip(T, 1, 1)]));
    api.apply(service("api", ip(T, 0, 11), Some("third")));
    api.apply(slice("api", &[ip(T, 1, 1)]));
    let _weir = KubeWeir::ready(&api, "[policies]\nselector = \"weir.dev/policies=true\"").await;
    for (map, module) in [("policies-a", "first"), ("policies-b", "second")] {
        let loaded = event_with(&api, "PolicyLoaded", &format!("{module}.wasm"))
            .unwrap_or_else(|| panic!("{module} loaded: {:#?}", api.events()));
        assert_eq!(loaded["regarding"]["name"], map);
    }
    // An unlabelled ConfigMap is not weir's: its module is not loaded.
    let fallback = event_with(&api, "PolicyFallback", "third").expect("PolicyFallback");
    assert_eq!(fallback["regarding"]["name"], "api");
    wait_for_backends(SocketAddr::new(ip(T, 0, 10), 8000), 3, &names(T, &[1])).await;

    // "second" moves from policies-b to policies-a, unchanged: nothing to load, nothing
    // removed. Then policies-a's settings break: it is held as it was, and the module
    // it now ships keeps serving.
    let mut moved = policies(
        &[
            ("first", guest_bytes("round-robin")),
            ("second", guest_bytes("round-robin")),
        ],
        None,
    );
    moved["metadata"]["name"] = json!("policies-a");
    moved["metadata"]["labels"] = json!({"weir.dev/policies": "true"});
    api.apply(moved.clone());
    assert!(api.delete("ConfigMap", Some("weir"), "policies-b"));
    moved["data"] = json!({"policies.toml": "[second\n"});
    api.apply(moved);
    let held = event_with(&api, "PolicyRejected", "policies.toml").expect("bad settings");
    assert_eq!(held["regarding"]["name"], "policies-a");
    assert!(
        !api.events().iter().any(|e| e["reason"] == "PolicyRemoved"),
        "nothing was removed: {:#?}",
        api.events()
    );
    wait_for_backends(SocketAddr::new(ip(T, 0, 10), 8000), 3, &names(T, &[1])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_module_follows_its_settings_until_removed() {
    const T: u8 = 36;
    let _backends = backends(T, 1).await;
    let api = ApiServer::start();
    api.apply(node(T));
    api.apply(service("web", ip(T, 0, 10), Some("solo")));
    api.apply(slice("web", &[ip(T, 1, 1)]));
    // Only a broken module, and settings that close its Services when it is unavailable.
    let broken = b"not a component".to_vec();
    api.apply(policies(
        &[("solo", broken.clone())],
        Some("[solo]\nfailure_mode = \"closed\"\n"),
    ));
    let weir = KubeWeir::ready(&api, "").await;
    event_with(&api, "PolicyRejected", &weir::policy::sha256_hex(&broken)).expect("rejected");
    let fallback = event_with(&api, "PolicyFallback", "solo").expect("PolicyFallback");
    let note = fallback["note"].as_str().unwrap();
    assert!(note.contains("rejects its traffic"), "{note}");
    let web = SocketAddr::new(ip(T, 0, 10), 8000);
    assert!(who(web, None).await.is_err(), "failure mode closed");

    // The same module again, beside a new one: the new one is loaded, the refused one
    // is not tried again (nothing about it changed).
    let rejections = weir.metric("weir_policy_rejections_total{policy=\"solo\"");
    api.apply(policies(
        &[("solo", broken), ("other", guest_bytes("round-robin"))],
        Some("[solo]\nfailure_mode = \"closed\"\n"),
    ));
    event_with(&api, "PolicyLoaded", "other.wasm").expect("the new module loaded");
    assert_eq!(
        weir.metric("weir_policy_rejections_total{policy=\"solo\""),
        rejections,
        "an unchanged module is not tried again"
    );
    assert_eq!(
        api.events()
            .iter()
            .filter(|e| e["reason"] == "PolicyRejected")
            .count(),
        1,
        "one PolicyRejected for one refused module"
    );
    // Removed: forgotten, announced, and its Services are back on kube-default.
    api.apply(policies(&[], None));
    event_with(&api, "PolicyRemoved", "solo.wasm").expect("PolicyRemoved");
    wait_for_backends(web, 3, &names(T, &[1])).await;
}

/// A module whose `configure` refuses is refused until it or its configuration changes
/// (it was retried every 5 s, with a new PolicyRejected each time); an Event that happens
/// again is one Event with a series count, as client-go's events library keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_not_retried_and_repeated_events_are_counted() {
    const T: u8 = 42;
    let _backends = backends(T, 1).await;
    let api = ApiServer::start();
    api.apply(node(T));
    api.apply(service("web", ip(T, 0, 10), Some("solo")));
    api.apply(slice("web", &[ip(T, 1, 1)]));
    let hostile = guest_bytes("hostile");
    api.apply(policies(
        &[("solo", hostile.clone())],
        Some("[solo]\nconfig = \"refuse\"\n"),
    ));
    let weir = KubeWeir::ready(&api, "").await;
    event_with(&api, "PolicyRejected", "refused on purpose").expect("rejected");
    let rejections = |weir: &KubeWeir| weir.metric("weir_policy_rejections_total{policy=\"solo\"");
    assert_eq!(rejections(&weir), 1);
    // Watched over more than the old 5 s retry: never tried again.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(7) {
        assert_eq!(
            rejections(&weir),
            1,
            "a refused configuration was tried again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rejected: Vec<Value> = (api.events().into_iter())
        .filter(|e| e["reason"] == "PolicyRejected")
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");

    // Loaded, replaced, and loaded again: the third is the first Event, counted twice.
    let (a, b) = (guest_bytes("round-robin"), guest_bytes("random"));
    let a_sha = weir::policy::sha256_hex(&a);
    for module in [&a, &b, &a] {
        api.apply(policies(&[("solo", module.clone())], None));
        let sha = weir::policy::sha256_hex(module);
        event_with(&api, "PolicyLoaded", &sha).expect("loaded");
    }
    let again = api
        .wait_for_event(
            |e| {
                e["reason"] == "PolicyLoaded"
                    && e["note"].as_str().is_some_and(|n| n.contains(&a_sha))
                    && e["series"]["count"] == 2
            },
            WAIT,
        )
        .expect("the repeat is the first Event's series");
    assert!(again["series"]["lastObservedTime"].is_string(), "{again}");
    let names: BTreeSet<String> = (api.events().into_iter())
        .filter(|e| {
            e["reason"] == "PolicyLoaded" && e["note"].as_str().is_some_and(|n| n.contains(&a_sha))
        })
        .map(|e| e["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 1, "one Event, patched: {names:?}");
}

#[test]
fn an_unusable_kubeconfig_is_an_error_not_a_panic() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nclusters: [oops\n").unwrap();
    let text = format!(
        "[node]\nname = \"node-a\"\ncapture_interface = \"\"\n[source]\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\n[admin]\naddress = \"127.0.0.1:0\"\n",
        kubeconfig.display()
    );
    let config = weir::config::Config::parse(&text, dir.path()).unwrap();
    let error = runtime
        .block_on(async { App::start(config).err() })
        .expect("an error");
    let message = format!("{error:#}");
    assert!(
        message.contains("source.kubeconfig: cannot use") && message.contains("kubeconfig"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipped_default_policy_and_memory_budgets_fail_a_port_alone_with_an_event() {
    const T: u8 = 39;
    let _backends = backends(T, 2).await;
    let api = ApiServer::start();
    api.apply(node(T));
    // The node's default policy comes from policies.toml; each of its updates needs 8 MiB
    // and its ports get 4 MiB, unless their Service asks for more.
    api.apply(policies(
        &[("hostile", guest_bytes("hostile"))],
        Some(
            "[default]\npolicy = \"hostile\"\nconfig = \"allocate-8mib-update\"\n\
             [hostile]\nmemory_mib = 4\n",
        ),
    ));
    api.apply(service("small", ip(T, 0, 10), None));
    api.apply(slice("small", &[ip(T, 1, 1), ip(T, 1, 2)]));
    let mut roomy = service("roomy", ip(T, 0, 11), None);
    roomy["metadata"]["annotations"]["weir.dev/policy-memory-mib"] = json!("16");
    api.apply(roomy);
    api.apply(slice("roomy", &[ip(T, 1, 1), ip(T, 1, 2)]));
    let weir = KubeWeir::ready(&api, "").await;

    let fallback = event_with(&api, "PolicyFallback", "budget of 4 MiB").expect("PolicyFallback");
    assert_eq!(fallback["regarding"]["name"], "small");
    let note = fallback["note"].as_str().unwrap();
    assert!(
        note.contains("hostile") && note.contains("default/small"),
        "names the Service and the policy: {note}"
    );
    assert_eq!(
        weir.metric(
            "weir_policy_service_failed{service=\"default/small:http\",policy=\"hostile\",reason=\"memory\"}"
        ),
        1
    );
    // The failing port falls back to kube-default (open) and is still served; the other
    // port of the same policy, with 16 MiB, is served by the policy itself.
    wait_for_backends(SocketAddr::new(ip(T, 0, 10), 8000), 12, &names(T, &[1, 2])).await;
    wait_for_backends(SocketAddr::new(ip(T, 0, 11), 8000), 6, &names(T, &[1, 2])).await;
    assert!(
        !api.events()
            .iter()
            .any(|e| e["reason"] == "PolicyFallback" && e["regarding"]["name"] == "roomy"),
        "the roomy port did not fail"
    );
    assert_eq!(
        weir.metric(
            "weir_policy_failures_total{policy=\"hostile\",call=\"update\",reason=\"memory\"}"
        ),
        1,
        "one port failed, once"
    );
}
