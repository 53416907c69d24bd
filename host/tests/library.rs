//! The policy library through the real host runtime, on fixture YAML: distributions within
//! statistical bounds for the seeded random policies, determinism and disruption bounds
//! for the hashing ones, spill for locality, fairness for least-connections.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use weir::cli::policy_test::{ClientSpec, Options, Outcome, Report, ScopeReport, run};
use weir::policy::{FailureMode, HostDecision, PolicyRuntime};
use weir::test_helpers::{connection, endpoints, engine, guest_bytes, guest_path, input, service};
use weir_sdk::{Outcome as ConnectionOutcome, OutcomeKind};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/policy-test")
}

fn options(module: &str) -> Options {
    Options {
        module: guest_path(module),
        objects: vec![fixtures().join("objects.yaml")],
        node: "node-a".into(),
        config: String::new(),
        connections: 5000,
        clients: ClientSpec::Random,
        script: None,
        seed: 7,
        requests: false,
        headers: Vec::new(),
        values: 100,
    }
}

fn report(options: &Options) -> Report {
    match run(options) {
        Outcome::Report(report) => {
            assert!(report.ok, "{:?}", report.failures);
            report
        }
        Outcome::BadInput(message) => panic!("{message}"),
    }
}

fn web(report: &Report) -> &ScopeReport {
    &report
        .services
        .iter()
        .find(|s| s.service == "default/web")
        .unwrap()
        .internal
}

fn shares(scope: &ScopeReport) -> BTreeMap<String, f64> {
    scope
        .endpoints
        .iter()
        .map(|e| (e.endpoint.clone(), e.share))
        .collect()
}

#[test]
fn random_spreads_evenly_within_bounds() {
    let r = report(&options("random"));
    for (endpoint, share) in shares(web(&r)) {
        assert!((share - 0.1).abs() < 0.02, "{endpoint}: {share}");
    }
}

#[test]
fn weighted_random_follows_its_weights() {
    let mut o = options("random");
    o.config = r#"{"weights": {"198.18.0.1": 11}}"#.into();
    let r = report(&o);
    let s = shares(web(&r));
    assert!((s["198.18.0.1:8080"] - 0.55).abs() < 0.03, "{s:?}");
    assert!((s["198.18.0.2:8080"] - 0.05).abs() < 0.015, "{s:?}");
}

#[test]
fn hashing_policies_are_deterministic_whatever_the_seed() {
    // The same client IPs (their ports, and the policy's randomness, follow the seed).
    let clients: Vec<std::net::IpAddr> = (0..500u32)
        .map(|i| std::net::IpAddr::from([198, 19, (i / 250) as u8, (i % 250) as u8]))
        .collect();
    for module in ["maglev", "ring-hash"] {
        let mut first = options(module);
        first.clients = ClientSpec::Fixed(clients.clone());
        let mut second = first.clone();
        second.seed = 99;
        let (a, b) = (report(&first), report(&second));
        assert_eq!(shares(web(&a)), shares(web(&b)), "{module}");
    }
}

#[test]
fn hashing_policies_keep_each_header_value_on_one_endpoint() {
    for module in ["maglev", "ring-hash"] {
        let mut o = options(module);
        o.requests = true;
        o.headers = vec!["x-user: user-{n}".parse().unwrap()];
        o.values = 200;
        o.config = r#"{"hash": "header", "header": "X-User"}"#.into();
        let r = report(&o);
        assert_eq!(r.contract, "0.2.0");
        let keys = web(&r).header_values.as_ref().unwrap();
        assert_eq!(keys.distinct, 200, "{module}");
        assert_eq!(keys.on_one_endpoint, 200, "{module}: every value sticks");
        // Spread over the endpoints, not all on one.
        let used = shares(web(&r)).values().filter(|s| **s > 0.02).count();
        assert!(used >= 8, "{module}: {:?}", shares(web(&r)));

        // Hashing the client instead, the same values land all over (the clients are
        // random): it is the header that keeps them together above.
        o.config = String::new();
        let r = report(&o);
        let keys = web(&r).header_values.as_ref().unwrap();
        assert!(keys.on_one_endpoint < 20, "{module}: {keys:?}");

        // Requests without the header hash their client, as connections do.
        o.config = r#"{"hash": "header", "header": "x-tenant"}"#.into();
        let by_header = report(&o);
        o.requests = false;
        o.headers.clear();
        o.config = String::new();
        let by_client = report(&o);
        assert_eq!(shares(web(&by_header)), shares(web(&by_client)), "{module}");
    }
}

#[test]
fn a_header_key_without_a_header_name_is_refused() {
    let mut o = options("maglev");
    o.config = r#"{"hash": "header"}"#.into();
    match run(&o) {
        Outcome::BadInput(message) => {
            assert!(
                message.to_string().contains("needs `\"header\"`"),
                "{message}"
            )
        }
        Outcome::Report(_) => panic!("a header key without its name was accepted"),
    }
}

#[test]
fn a_policy_built_against_0_1_0_decides_requests_with_select() {
    let mut o = options("contract-0-1");
    o.requests = true;
    o.connections = 1000;
    let r = report(&o);
    assert_eq!(r.contract, "0.1.0");
    let web = web(&r);
    assert_eq!(web.forwarded, 1000);
    // Its round robin, one request at a time.
    for (endpoint, share) in shares(web) {
        assert!((share - 0.1).abs() < 0.001, "{endpoint}: {share}");
    }
}

#[test]
fn hashing_policies_move_about_one_nth_when_one_of_n_goes() {
    for module in ["maglev", "ring-hash"] {
        let mut o = options(module);
        o.script = Some(fixtures().join("script.yaml"));
        let r = report(&o);
        let removal = &r.steps[0];
        let web = removal
            .ports
            .iter()
            .find(|p| p.service == "default/web" && p.scope == "internal")
            .unwrap();
        let share = web.moved as f64 / web.clients as f64;
        // One of ten endpoints left: its ~10% of clients must move; little else may.
        assert!((0.07..=0.14).contains(&share), "{module} moved {share}");
    }
}

#[test]
fn random_moves_most_clients_on_any_change() {
    let mut o = options("random");
    o.script = Some(fixtures().join("script.yaml"));
    let r = report(&o);
    let web = r.steps[0]
        .ports
        .iter()
        .find(|p| p.service == "default/web")
        .unwrap();
    assert!(
        web.moved as f64 / web.clients as f64 > 0.8,
        "the contrast that makes hashing worth it"
    );
}

#[test]
fn locality_keeps_traffic_on_this_node_then_spills() {
    let r = report(&options("locality"));
    let s = shares(web(&r));
    assert!(
        (s["198.18.0.1:8080"] + s["198.18.0.2:8080"] - 1.0).abs() < 1e-9,
        "{s:?}"
    );

    let mut o = options("locality");
    o.config = r#"{"min_fraction": 0.3}"#.into();
    let r = report(&o);
    let s = shares(web(&r));
    let zone_a: f64 = (1..=4).map(|i| s[&format!("198.18.0.{i}:8080")]).sum();
    assert!(
        (zone_a - 1.0).abs() < 1e-9,
        "two of ten on this node is below 0.3: zone-a serves: {s:?}"
    );
    for i in 1..=4 {
        assert!(
            (s[&format!("198.18.0.{i}:8080")] - 0.25).abs() < 0.03,
            "{s:?}"
        );
    }
}

#[test]
fn client_ip_affinity_keeps_each_client_on_one_endpoint() {
    let mut o = options("client-ip-affinity");
    o.clients = "198.19.0.1,198.19.0.2,198.19.0.3".parse().unwrap();
    o.connections = 300;
    let r = report(&o);
    let used: Vec<usize> = web(&r)
        .endpoints
        .iter()
        .map(|e| e.connections)
        .filter(|c| *c > 0)
        .collect();
    assert!(
        used.len() <= 3,
        "three clients, at most three endpoints: {used:?}"
    );
    assert!(
        used.iter().all(|c| c % 100 == 0),
        "each client always lands on the same endpoint: {used:?}"
    );
}

#[test]
fn least_connections_is_fair_under_uneven_connection_lengths() {
    let (engine, metrics) = engine();
    let compiled = engine
        .load(
            "least-connections",
            "lc.wasm",
            &guest_bytes("least-connections"),
        )
        .unwrap();
    let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();
    runtime.update(
        1,
        input(service("web", None), endpoints(1, 4), FailureMode::Closed),
    );
    // Endpoint 1's connections last forever, the others' close at once: endpoint 1 must
    // end up with one connection, the rest shared evenly.
    let mut counts = [0u32; 5];
    for client in 0..400u32 {
        let HostDecision::Forward { endpoint, .. } = runtime.select(1, &connection(client as u8))
        else {
            panic!("forward");
        };
        counts[endpoint as usize] += 1;
        if endpoint != 1 {
            runtime.observe(
                1,
                &ConnectionOutcome {
                    endpoint,
                    kind: OutcomeKind::Closed,
                    micros: 1000,
                },
            );
        }
    }
    assert_eq!(counts[1], 1, "{counts:?}");
    let others = &counts[2..];
    assert!(
        others.iter().max().unwrap() - others.iter().min().unwrap() <= 1,
        "{counts:?}"
    );
    assert_eq!(metrics.failures_total("least-connections"), 0);
}

#[test]
fn p2c_ewma_avoids_a_slow_endpoint_through_the_host() {
    let (engine, _) = engine();
    let compiled = engine
        .load("p2c-ewma", "p2c.wasm", &guest_bytes("p2c-ewma"))
        .unwrap();
    let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();
    runtime.update(
        1,
        input(service("web", None), endpoints(1, 4), FailureMode::Closed),
    );
    let mut counts = [0u32; 5];
    for client in 0..2000u32 {
        let HostDecision::Forward { endpoint, .. } = runtime.select(1, &connection(client as u8))
        else {
            panic!("forward");
        };
        counts[endpoint as usize] += 1;
        let micros = if endpoint == 4 { 200_000 } else { 2_000 };
        runtime.observe(
            1,
            &ConnectionOutcome {
                endpoint,
                kind: OutcomeKind::Connected,
                micros,
            },
        );
        runtime.observe(
            1,
            &ConnectionOutcome {
                endpoint,
                kind: OutcomeKind::Closed,
                micros: 0,
            },
        );
    }
    assert!(counts[4] < 100, "{counts:?}");
}

#[test]
fn every_library_policy_serves_a_thousand_endpoints() {
    let eps: Vec<weir_sdk::Endpoint> = (1..=1024u32)
        .map(|id| {
            let ip = std::net::IpAddr::from([198, 18, (id >> 8) as u8, id as u8]);
            weir_sdk::Endpoint::ready(id, std::net::SocketAddr::new(ip, 8080))
        })
        .collect();
    for module in [
        "kube-default",
        "round-robin",
        "random",
        "least-connections",
        "p2c-ewma",
        "maglev",
        "ring-hash",
        "locality",
        "client-ip-affinity",
    ] {
        // Whether each policy works at this size; what it costs is the benchmark's question
        // (deadlines are wall-clock, so tests on a loaded machine keep them out of the way).
        let limits = weir::policy::Limits {
            update_deadline: std::time::Duration::from_secs(5),
            ..weir::test_helpers::test_limits()
        };
        let (engine, metrics) = weir::test_helpers::engine_with(limits);
        let compiled = engine.load(module, module, &guest_bytes(module)).unwrap();
        let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();
        let answer = runtime.update(
            1,
            input(service("web", None), eps.clone(), FailureMode::Closed),
        );
        assert!(answer.failure.is_none(), "{module}: {:?}", answer.failure);
        assert_eq!(
            answer.eligibility.internal.endpoints.len(),
            1024,
            "{module}"
        );
        for client in 0..200u32 {
            let decision = runtime.select(1, &connection(client as u8));
            assert!(
                matches!(decision, HostDecision::Forward { .. }),
                "{module}: {decision:?}"
            );
        }
        assert_eq!(metrics.failures_total(module), 0, "{module}");
    }
}
