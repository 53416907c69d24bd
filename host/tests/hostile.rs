//! A hostile policy cannot hurt weir: infinite loops, memory bombs, panics, invalid
//! answers and log floods are each contained by a deadline or a cap, counted, answered
//! with the service's failure mode, and every other service keeps its answers.

use std::net::SocketAddr;

use weir::metrics::{Call, Mode, Reason};
use weir::policy::{FailureKind, FailureMode, HostDecision, PolicyRuntime};
use weir::test_helpers::{connection, endpoints, engine, guest_bytes, input, service};

const HEALTHY: u32 = 1;
const HOSTILE: u32 = 2;

/// A runtime of the hostile guest serving a healthy service on 198.18.1.0/24 and a
/// hostile one on 198.18.2.0/24, each port with its own instance.
struct Fixture {
    runtime: PolicyRuntime,
    metrics: std::sync::Arc<weir::metrics::PolicyMetrics>,
}

fn fixture(behaviour: &str, mode: FailureMode) -> (Fixture, weir::policy::UpdateAnswer) {
    let (engine, metrics) = engine();
    let compiled = engine
        .load("hostile", "hostile.wasm", &guest_bytes("hostile"))
        .expect("hostile guest loads");
    let runtime = PolicyRuntime::new(engine, compiled, "").expect("configure");
    let healthy = runtime.update(
        HEALTHY,
        input(service("healthy", None), endpoints(1, 3), mode),
    );
    assert!(healthy.failure.is_none(), "{:?}", healthy.failure);
    let hostile = runtime.update(
        HOSTILE,
        input(service("hostile", Some(behaviour)), endpoints(2, 3), mode),
    );
    (Fixture { runtime, metrics }, hostile)
}

fn in_subnet(decision: HostDecision, subnet: u8) -> bool {
    matches!(decision, HostDecision::Forward { address: SocketAddr::V4(a), .. } if a.ip().octets()[2] == subnet)
}

impl Fixture {
    fn failures(&self, call: Call, reason: Reason) -> u64 {
        self.metrics.failures_of("hostile", call, reason)
    }

    /// The healthy service still gets the policy's own round-robin answers, from the
    /// instance it had: its position went on, nothing was replayed into a new one.
    fn healthy_service_unaffected(&self) {
        let fallbacks_before = self.metrics.fallbacks_of("hostile", Mode::open);
        let mut seen = Vec::new();
        for client in 0..6 {
            let decision = self.runtime.select(HEALTHY, &connection(client));
            assert!(in_subnet(decision, 1), "healthy service got {decision:?}");
            if let HostDecision::Forward { endpoint, .. } = decision {
                seen.push(endpoint);
            }
        }
        assert!(
            seen.len() == 6 && seen.windows(2).all(|w| w[1] == w[0] % 3 + 1),
            "round robin over all 3 endpoints, in turn: {seen:?}"
        );
        assert_eq!(
            self.metrics.fallbacks_of("hostile", Mode::open),
            fallbacks_before,
            "the healthy service never fell back"
        );
        let (eligibility, failure) = self.runtime.eligibility(HEALTHY).expect("known");
        assert!(failure.is_none());
        assert_eq!(eligibility.internal.endpoints, vec![1, 2, 3]);
    }
}

#[test]
fn infinite_loop_in_select_times_out_and_fails_open() {
    let (f, _) = fixture("loop-select", FailureMode::Open);
    let decision = f.runtime.select(HOSTILE, &connection(1));
    assert!(
        in_subnet(decision, 2),
        "open failure mode forwards with kube-default: {decision:?}"
    );
    assert_eq!(f.failures(Call::select, Reason::timeout), 1);
    assert_eq!(f.metrics.fallbacks_of("hostile", Mode::open), 1);
    f.healthy_service_unaffected();
}

#[test]
fn a_failing_select_is_quarantined_then_tried_again() {
    let limits = weir::policy::Limits {
        quarantine: std::time::Duration::from_millis(200),
        ..weir::test_helpers::test_limits()
    };
    let (engine, metrics) = weir::test_helpers::engine_with(limits);
    let compiled = engine
        .load("hostile", "hostile.wasm", &guest_bytes("hostile"))
        .unwrap();
    let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();
    let hostile = || {
        input(
            service("hostile", Some("panic-select")),
            endpoints(2, 3),
            FailureMode::Open,
        )
    };
    runtime.update(HOSTILE, hostile());
    let traps = || metrics.failures_of("hostile", Call::select, Reason::trap);

    runtime.select(HOSTILE, &connection(1));
    assert_eq!(traps(), 1);
    // The poisoned instance is not rebuilt by the data plane's call...
    assert_eq!(metrics.replacements("hostile"), 0);
    // ...but by the control plane's repair, for this port alone.
    assert_eq!(runtime.repair(), 1);
    assert_eq!(metrics.replacements("hostile"), 1);
    // Quarantined: the failure mode answers without calling the policy.
    let started = std::time::Instant::now();
    for client in 0..5 {
        assert!(in_subnet(runtime.select(HOSTILE, &connection(client)), 2));
    }
    if started.elapsed() < std::time::Duration::from_millis(200) {
        assert_eq!(traps(), 1, "no call during the quarantine");
    }
    // After the backoff the policy is tried again (and, still hostile, contained again).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while traps() < 2 {
        assert!(std::time::Instant::now() < deadline, "never retried");
        runtime.select(HOSTILE, &connection(1));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A new update builds a fresh instance and lifts the quarantine at once.
    runtime.update(HOSTILE, hostile());
    runtime.select(HOSTILE, &connection(1));
    assert_eq!(traps(), 3);
}

#[test]
fn infinite_loop_in_select_fails_closed_with_reject() {
    let (f, _) = fixture("loop-select", FailureMode::Closed);
    assert_eq!(
        f.runtime.select(HOSTILE, &connection(1)),
        HostDecision::Reject
    );
    assert_eq!(f.failures(Call::select, Reason::timeout), 1);
    assert_eq!(f.metrics.fallbacks_of("hostile", Mode::closed), 1);
    f.healthy_service_unaffected();
}

#[test]
fn infinite_loop_in_update_times_out_and_uses_kube_default_eligibility() {
    let (f, answer) = fixture("loop-update", FailureMode::Open);
    let failure = answer.failure.expect("update failed");
    assert_eq!(failure.kind, FailureKind::Timeout, "{failure}");
    assert_eq!(answer.eligibility.internal.endpoints, vec![1, 2, 3]);
    // One port, one instance: timed out once.
    assert_eq!(f.failures(Call::update, Reason::timeout), 1);
    assert!(in_subnet(f.runtime.select(HOSTILE, &connection(1)), 2));
    f.healthy_service_unaffected();
}

#[test]
fn infinite_loop_in_update_fails_closed_with_nothing_eligible() {
    let (f, answer) = fixture("loop-update", FailureMode::Closed);
    assert!(answer.failure.is_some());
    assert!(answer.eligibility.internal.endpoints.is_empty());
    assert!(answer.eligibility.external.endpoints.is_empty());
    assert_eq!(
        f.runtime.select(HOSTILE, &connection(1)),
        HostDecision::Reject
    );
    f.healthy_service_unaffected();
}

#[test]
fn memory_bomb_in_select_hits_the_cap() {
    let (f, _) = fixture("memory-select", FailureMode::Open);
    let decision = f.runtime.select(HOSTILE, &connection(1));
    assert!(in_subnet(decision, 2), "{decision:?}");
    assert_eq!(f.failures(Call::select, Reason::memory), 1);
    f.healthy_service_unaffected();
}

#[test]
fn memory_bomb_in_update_hits_the_cap() {
    let (f, answer) = fixture("memory-update", FailureMode::Open);
    assert_eq!(answer.failure.expect("failed").kind, FailureKind::Memory);
    assert_eq!(f.failures(Call::update, Reason::memory), 1);
    f.healthy_service_unaffected();
}

#[test]
fn panic_in_select_is_a_trap() {
    let (f, _) = fixture("panic-select", FailureMode::Open);
    assert!(in_subnet(f.runtime.select(HOSTILE, &connection(1)), 2));
    assert_eq!(f.failures(Call::select, Reason::trap), 1);
    f.healthy_service_unaffected();
}

#[test]
fn panic_in_update_is_a_trap() {
    let (f, answer) = fixture("panic-update", FailureMode::Closed);
    let failure = answer.failure.expect("failed");
    assert_eq!(failure.kind, FailureKind::Trap);
    assert!(failure.message.contains("update"), "{failure}");
    assert_eq!(
        f.runtime.select(HOSTILE, &connection(1)),
        HostDecision::Reject
    );
    f.healthy_service_unaffected();
}

#[test]
fn unknown_endpoint_id_from_select_is_invalid() {
    let (f, _) = fixture("unknown-id-select", FailureMode::Open);
    let decision = f.runtime.select(HOSTILE, &connection(1));
    assert!(in_subnet(decision, 2), "{decision:?}");
    assert_eq!(f.failures(Call::select, Reason::invalid_answer), 1);
    f.healthy_service_unaffected();
}

#[test]
fn unknown_endpoint_id_from_update_is_invalid() {
    let (f, answer) = fixture("unknown-id-update", FailureMode::Open);
    let failure = answer.failure.expect("failed");
    assert_eq!(failure.kind, FailureKind::InvalidAnswer);
    assert!(failure.message.contains("9999"), "{failure}");
    assert_eq!(
        answer.eligibility.internal.endpoints,
        vec![1, 2, 3],
        "kube-default's answer"
    );
    f.healthy_service_unaffected();
}

#[test]
fn log_flood_is_capped_and_counted() {
    let (f, answer) = fixture("log-flood", FailureMode::Closed);
    assert!(answer.failure.is_none(), "{:?}", answer.failure);
    assert_eq!(
        answer.eligibility.internal.endpoints,
        vec![1, 2, 3],
        "the policy's own answer stands"
    );
    assert_eq!(f.metrics.failures_total("hostile"), 0);
    // 1024 log lines and 1024 stdout lines of 4 KiB, against a 64 KiB budget.
    let dropped = f.metrics.log_dropped_of("hostile");
    assert!(
        dropped > (8 << 20) - (64 << 10) - 4096,
        "dropped {dropped} bytes"
    );
    f.healthy_service_unaffected();
}

#[test]
fn sleeping_in_select_is_refused_not_waited_for() {
    let (f, _) = fixture("sleep-select", FailureMode::Closed);
    assert_eq!(
        f.runtime.select(HOSTILE, &connection(1)),
        HostDecision::Reject
    );
    assert_eq!(f.failures(Call::select, Reason::trap), 1);
    f.healthy_service_unaffected();
}

#[test]
fn sleeping_in_update_is_refused_not_waited_for() {
    let (f, answer) = fixture("sleep-update", FailureMode::Open);
    let failure = answer.failure.expect("failed");
    assert_eq!(failure.kind, FailureKind::Trap);
    assert!(
        failure.message.contains("may not block or sleep"),
        "{failure}"
    );
    f.healthy_service_unaffected();
}

#[test]
fn forwarding_to_a_known_but_ineligible_endpoint_is_invalid() {
    let (f, answer) = fixture("ineligible-select", FailureMode::Open);
    assert_eq!(
        answer.eligibility.internal.endpoints,
        vec![1, 2],
        "update left 3 out"
    );
    let decision = f.runtime.select(HOSTILE, &connection(1));
    assert_eq!(f.failures(Call::select, Reason::invalid_answer), 1);
    assert!(
        matches!(
            decision,
            HostDecision::Forward {
                endpoint: 1..=3,
                ..
            }
        ),
        "kube-default answers instead: {decision:?}"
    );
    f.healthy_service_unaffected();
}

#[test]
fn addresses_cross_the_host_guest_boundary_intact() {
    let (engine, metrics) = engine();
    let compiled = engine
        .load("hostile", "hostile.wasm", &guest_bytes("hostile"))
        .unwrap();
    let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();

    runtime.update(
        1,
        input(
            service("v4", Some("client-echo")),
            endpoints(1, 3),
            FailureMode::Closed,
        ),
    );
    let v4 = runtime.select(1, &connection(2));
    assert_eq!(
        v4,
        HostDecision::Forward {
            endpoint: 2,
            address: "198.18.1.2:8080".parse().unwrap()
        }
    );

    let mut v6_service = service("v6", Some("client-echo"));
    v6_service.ip_family = weir_sdk::IpFamily::V6;
    v6_service.cluster_ip = "fd00::10".parse().unwrap();
    let v6_endpoints: Vec<weir_sdk::Endpoint> = (1..=3)
        .map(|id| weir_sdk::Endpoint::ready(id, format!("[fd00:1::{id}]:8080").parse().unwrap()))
        .collect();
    runtime.update(2, input(v6_service, v6_endpoints, FailureMode::Closed));
    let client = weir_sdk::Connection {
        client: "[fd00:ffff::3]:40000".parse().unwrap(),
        destination: "[fd00::10]:80".parse().unwrap(),
        scope: weir_sdk::Scope::Internal,
    };
    assert_eq!(
        runtime.select(2, &client),
        HostDecision::Forward {
            endpoint: 3,
            address: "[fd00:1::3]:8080".parse().unwrap()
        }
    );
    assert_eq!(metrics.failures_total("hostile"), 0);
}

#[test]
fn configure_refusal_is_reported() {
    let (engine, _) = engine();
    let compiled = engine
        .load("hostile", "hostile.wasm", &guest_bytes("hostile"))
        .unwrap();
    let error = PolicyRuntime::new(engine, compiled, "refuse")
        .err()
        .expect("refused");
    assert_eq!(error.kind, FailureKind::Refused);
    assert!(error.message.contains("refused on purpose"), "{error}");
}

#[test]
fn configure_panic_is_a_trap() {
    let (engine, metrics) = engine();
    let compiled = engine
        .load("hostile", "hostile.wasm", &guest_bytes("hostile"))
        .unwrap();
    let error = PolicyRuntime::new(engine, compiled, "panic")
        .err()
        .expect("trapped");
    assert_eq!(error.kind, FailureKind::Trap);
    assert_eq!(
        metrics.failures_of("hostile", Call::configure, Reason::trap),
        1
    );
}

#[test]
fn failures_racing_with_updates_never_blame_a_healthy_update() {
    let (f, _) = fixture("panic-select", FailureMode::Open);
    let f = std::sync::Arc::new(f);
    let (done, finished) = std::sync::mpsc::channel();
    let data_plane = {
        let f = f.clone();
        std::thread::spawn(move || {
            for round in 0..200u32 {
                f.runtime.select(HOSTILE, &connection(round as u8));
                f.runtime.select(HEALTHY, &connection(round as u8));
            }
        })
    };
    let control_plane = {
        let f = f.clone();
        std::thread::spawn(move || {
            for round in 0..100u32 {
                // Re-arming the hostile service lifts its quarantine, so its next select
                // fails again while updates keep arriving.
                let (name, handle, subnet) = if round % 2 == 0 {
                    ("healthy", HEALTHY, 1)
                } else {
                    ("hostile", HOSTILE, 2)
                };
                let config = (handle == HOSTILE).then_some("panic-select");
                f.runtime.update(
                    handle,
                    input(
                        service(name, config),
                        endpoints(subnet, 3),
                        FailureMode::Open,
                    ),
                );
            }
        })
    };
    std::thread::spawn(move || {
        data_plane.join().unwrap();
        control_plane.join().unwrap();
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("select and update finish without deadlock");
    for reason in [
        Reason::trap,
        Reason::timeout,
        Reason::memory,
        Reason::invalid_answer,
        Reason::instantiate,
    ] {
        assert_eq!(
            f.failures(Call::update, reason.clone()),
            0,
            "an update was blamed: {reason:?}"
        );
    }
    assert!(f.failures(Call::select, Reason::trap) >= 1);
    f.healthy_service_unaffected();
}

#[test]
fn a_failing_port_replays_nothing_for_the_policys_other_ports() {
    let (engine, metrics) = engine();
    let compiled = engine
        .load("hostile", "hostile.wasm", &guest_bytes("hostile"))
        .unwrap();
    let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();
    const FRAGILE: u32 = 3;
    const TRIGGER: u32 = 5;
    runtime.update(
        HEALTHY,
        input(service("healthy", None), endpoints(1, 3), FailureMode::Open),
    );
    // Its own instance's first update traps: only this port goes onto its failure mode.
    let answer = runtime.update(
        FRAGILE,
        input(
            service("fragile", Some("panic-if-first-update")),
            endpoints(3, 3),
            FailureMode::Closed,
        ),
    );
    let failure = answer.failure.expect("its update trapped");
    assert_eq!(failure.kind, FailureKind::Trap);
    assert_eq!(
        runtime.select(FRAGILE, &connection(1)),
        HostDecision::Reject,
        "closed: nothing eligible"
    );
    runtime.update(
        TRIGGER,
        input(
            service("trigger", Some("panic-select")),
            endpoints(2, 3),
            FailureMode::Open,
        ),
    );
    runtime.select(TRIGGER, &connection(1));
    assert_eq!(
        runtime.repair(),
        1,
        "the trigger's instance alone is rebuilt"
    );
    assert_eq!(
        metrics.failures_of("hostile", Call::select, Reason::trap),
        1
    );
    assert_eq!(
        metrics.failures_of("hostile", Call::update, Reason::trap),
        1,
        "the fragile port's own update; nothing was replayed into it"
    );
    assert_eq!(metrics.replacements("hostile"), 1);
    let (_, failure) = runtime.eligibility(HEALTHY).expect("known");
    assert!(failure.is_none());
    assert_eq!(
        metrics.fallbacks_of("hostile", Mode::open),
        1,
        "only the trigger's own connection"
    );
}

#[test]
fn one_port_whose_update_traps_among_500_is_the_only_one_on_its_failure_mode() {
    let (engine, metrics) = engine();
    let compiled = engine
        .load("hostile", "hostile.wasm", &guest_bytes("hostile"))
        .unwrap();
    let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();
    const BROKEN: u32 = 250;
    let started = std::time::Instant::now();
    for handle in 1..=500u32 {
        let config = (handle == BROKEN).then_some("panic-update");
        let name = format!("svc-{handle}");
        let answer = runtime.update(
            handle,
            input(service(&name, config), endpoints(1, 3), FailureMode::Closed),
        );
        assert_eq!(answer.failure.is_some(), handle == BROKEN, "{name}");
    }
    eprintln!(
        "500 ports, each with its instance, in {:?}",
        started.elapsed()
    );
    assert_eq!(runtime.ports(), 500);
    for handle in 1..=500u32 {
        let decision = runtime.select(handle, &connection(1));
        if handle == BROKEN {
            assert_eq!(decision, HostDecision::Reject);
        } else {
            assert!(in_subnet(decision, 1), "svc-{handle}: {decision:?}");
        }
    }
    assert_eq!(metrics.failures_total("hostile"), 1);
    assert_eq!(metrics.replacements("hostile"), 0);
}

#[test]
fn hoarding_wasi_resources_hits_the_cap_and_fails_alone() {
    let (f, answer) = fixture("resource-flood-update", FailureMode::Open);
    let failure = answer.failure.expect("stopped");
    assert_eq!(failure.kind, FailureKind::Trap, "{failure}");
    assert_eq!(f.failures(Call::update, Reason::trap), 1);
    f.healthy_service_unaffected();
}

#[test]
fn asking_for_64_mib_of_randomness_is_refused_at_once() {
    let started = std::time::Instant::now();
    let (f, answer) = fixture("random-bomb-update", FailureMode::Open);
    let failure = answer.failure.expect("refused");
    assert_eq!(failure.kind, FailureKind::Trap, "{failure}");
    assert!(
        failure.message.contains("67108864") && failure.message.contains("limit 4096"),
        "the refusal names what was asked and the limit: {failure}"
    );
    eprintln!("refused in {:?}", started.elapsed());
    f.healthy_service_unaffected();
}
