//! The policy engine's plumbing: the compiled-artifact cache, instances per worker, and
//! configurable limits.

use std::sync::Arc;
use std::time::Duration;

use weir::metrics::{Call, PolicyMetrics, Reason};
use weir::policy::{FailureMode, HostDecision, Limits, PolicyEngine, PolicyRuntime};
use weir::test_helpers::{
    connection, endpoints, engine, engine_with, guest_bytes, input, service, test_limits,
};

#[test]
fn compiled_components_are_cached_by_sha256() {
    let cache = tempfile::tempdir().unwrap();
    let bytes = guest_bytes("round-robin");
    let metrics = Arc::new(PolicyMetrics::default());

    let engine = PolicyEngine::new(test_limits(), Some(cache.path()), metrics.clone()).unwrap();
    let first = engine.load("round-robin", "rr.wasm", &bytes).unwrap();
    assert!(!first.from_cache);
    assert_eq!(
        std::fs::read_dir(cache.path()).unwrap().count(),
        0,
        "nothing is cached before the module is accepted"
    );
    engine.keep(&first);
    let files: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 1);
    assert!(
        files[0].to_string_lossy().starts_with(&first.sha256),
        "{files:?}"
    );
    drop(engine);

    // A new engine (a restart) loads the artifact instead of compiling, and it works.
    let engine = PolicyEngine::new(test_limits(), Some(cache.path()), metrics).unwrap();
    let second = engine.load("round-robin", "rr.wasm", &bytes).unwrap();
    assert!(second.from_cache);
    assert_eq!(second.sha256, first.sha256);
    let runtime = PolicyRuntime::new(engine, second, "").unwrap();
    runtime.update(
        1,
        input(service("web", None), endpoints(1, 2), FailureMode::Closed),
    );
    assert!(matches!(
        runtime.select(1, &connection(1)),
        HostDecision::Forward { .. }
    ));
}

#[test]
fn a_corrupt_cache_entry_is_discarded_and_recompiled() {
    let cache = tempfile::tempdir().unwrap();
    let bytes = guest_bytes("round-robin");
    let metrics = Arc::new(PolicyMetrics::default());
    let engine = PolicyEngine::new(Limits::default(), Some(cache.path()), metrics).unwrap();
    let loaded = engine.load("round-robin", "rr.wasm", &bytes).unwrap();
    engine.keep(&loaded);
    let entry = std::fs::read_dir(cache.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&entry, b"garbage").unwrap();
    let again = engine.load("round-robin", "rr.wasm", &bytes).unwrap();
    assert!(!again.from_cache, "the garbage was not trusted");
    assert!(!entry.exists(), "and was removed");
    engine.keep(&again);
    assert_ne!(
        std::fs::read(&entry).unwrap(),
        b"garbage",
        "and was replaced"
    );
}

#[test]
fn a_service_port_has_one_instance_whatever_the_workers() {
    let (engine, _) = engine();
    let compiled = engine
        .load("round-robin", "rr.wasm", &guest_bytes("round-robin"))
        .unwrap();
    let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();
    runtime.update(
        1,
        input(service("web", None), endpoints(1, 2), FailureMode::Closed),
    );
    // Every connection meets the same round-robin position, from whichever thread.
    let picks: Vec<u32> = std::thread::scope(|scope| {
        (0..4)
            .map(|client| {
                let runtime = &runtime;
                scope.spawn(move || match runtime.select(1, &connection(client)) {
                    HostDecision::Forward { endpoint, .. } => endpoint,
                    other => panic!("{other:?}"),
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    });
    assert_eq!(picks.iter().filter(|&&e| e == 1).count(), 2, "{picks:?}");
    assert_eq!(picks.iter().filter(|&&e| e == 2).count(), 2, "{picks:?}");
    // An update that removes endpoint 1 is what every later connection sees.
    let mut only_two = endpoints(1, 2);
    only_two.remove(0);
    runtime.update(
        1,
        input(service("web", None), only_two, FailureMode::Closed),
    );
    for client in 0..4 {
        let decision = runtime.select(1, &connection(client));
        assert!(
            matches!(decision, HostDecision::Forward { endpoint: 2, .. }),
            "{decision:?}"
        );
    }
}

#[test]
fn removed_services_are_rejected() {
    let (engine, _) = engine();
    let compiled = engine.load_kube_default().unwrap();
    let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();
    runtime.update(
        1,
        input(service("web", None), endpoints(1, 2), FailureMode::Open),
    );
    assert!(matches!(
        runtime.select(1, &connection(1)),
        HostDecision::Forward { .. }
    ));
    runtime.remove(1);
    assert_eq!(runtime.select(1, &connection(1)), HostDecision::Reject);
    assert!(runtime.eligibility(1).is_none());
}

/// A runtime of the hostile guest under `limits`, with one service behaving as `config`.
fn hostile(
    limits: Limits,
    config: &str,
) -> (
    PolicyRuntime,
    Arc<PolicyMetrics>,
    Option<weir::policy::CallError>,
) {
    let (engine, metrics) = engine_with(limits);
    let compiled = engine
        .load("hostile", "hostile.wasm", &guest_bytes("hostile"))
        .unwrap();
    let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();
    let answer = runtime.update(
        1,
        input(
            service("svc", Some(config)),
            endpoints(1, 2),
            FailureMode::Closed,
        ),
    );
    (runtime, metrics, answer.failure)
}

#[test]
fn select_deadline_is_the_configured_one() {
    // A select that works for 100 ms: far too long for the default 1 ms, fine within 1 s.
    // (Wide margins: deadlines are wall-clock ticks, and a loaded machine delays both the
    // ticker and the policy.)
    let (runtime, metrics, _) = hostile(Limits::default(), "spin-select:100");
    assert_eq!(runtime.select(1, &connection(1)), HostDecision::Reject);
    assert_eq!(
        metrics.failures_of("hostile", Call::select, Reason::timeout),
        1
    );

    let limits = Limits {
        select_deadline: Duration::from_secs(1),
        ..Limits::default()
    };
    let (runtime, metrics, _) = hostile(limits, "spin-select:100");
    assert!(matches!(
        runtime.select(1, &connection(1)),
        HostDecision::Forward { .. }
    ));
    assert_eq!(metrics.failures_total("hostile"), 0);
}

#[test]
fn memory_cap_is_the_configured_one() {
    // An update that needs 8 MiB: fine under the default 16 MiB, refused under 4 MiB.
    let (_, metrics, failure) = hostile(weir::test_helpers::test_limits(), "allocate-8mib-update");
    assert!(failure.is_none(), "{failure:?}");
    assert_eq!(metrics.failures_total("hostile"), 0);

    let limits = Limits {
        memory_bytes: 4 << 20,
        ..weir::test_helpers::test_limits()
    };
    let (_, metrics, failure) = hostile(limits, "allocate-8mib-update");
    assert_eq!(
        failure.expect("refused").kind,
        weir::policy::FailureKind::Memory
    );
    assert_eq!(
        metrics.failures_of("hostile", Call::update, Reason::memory),
        1
    );
}

#[test]
fn kube_default_is_embedded_and_answers_like_kube_proxy() {
    let (engine, metrics) = engine();
    let compiled = engine.load_kube_default().unwrap();
    assert_eq!(compiled.name, "kube-default");
    let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();
    let mut eps = endpoints(1, 3);
    eps[2].ready = false;
    let answer = runtime.update(1, input(service("web", None), eps, FailureMode::Closed));
    assert!(answer.failure.is_none());
    assert_eq!(answer.eligibility.internal.endpoints, vec![1, 2]);
    let mut seen = std::collections::BTreeSet::new();
    for client in 0..64 {
        if let HostDecision::Forward { endpoint, .. } = runtime.select(1, &connection(client)) {
            seen.insert(endpoint);
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec![1, 2],
        "random over the ready ones"
    );
    assert_eq!(metrics.failures_total("kube-default"), 0);
}

#[test]
fn the_built_in_kube_default_runs_natively_with_the_components_answers() {
    let (engine, metrics) = engine();
    let component =
        PolicyRuntime::new(engine.clone(), engine.load_kube_default().unwrap(), "").unwrap();
    let native = PolicyRuntime::native(engine);
    assert_eq!(native.sha256(), "built-in");
    assert!(native.compiled().is_none(), "no module, no instance");
    let mut eps = endpoints(1, 4);
    eps[2].ready = false;
    eps[3].is_local = true;
    let mut svc = service("web", None);
    svc.internal_traffic_local = true;
    let wasm = component.update(1, input(svc.clone(), eps.clone(), FailureMode::Closed));
    let own = native.update(1, input(svc, eps, FailureMode::Closed));
    assert_eq!(own.eligibility, wasm.eligibility);
    assert_eq!(own.eligibility.internal.endpoints, vec![4]);
    assert_eq!(
        native.select(1, &connection(1)),
        HostDecision::Forward {
            endpoint: 4,
            address: "198.18.1.4:8080".parse().unwrap()
        }
    );
    assert_eq!(metrics.failures_total("kube-default"), 0);
}

#[test]
fn each_service_port_has_its_own_memory_budget_within_the_ceiling() {
    let (engine, metrics) = weir::test_helpers::engine_with(weir::test_helpers::test_limits());
    let compiled = engine
        .load("hostile", "hostile.wasm", &guest_bytes("hostile"))
        .unwrap();
    let runtime = PolicyRuntime::new(engine, compiled, "").unwrap();
    // Each update needs 8 MiB.
    let port = |name: &str, memory_mib: Option<u32>| weir::policy::ServiceInput {
        memory_mib,
        ..input(
            service(name, Some("allocate-8mib-update")),
            endpoints(1, 2),
            FailureMode::Closed,
        )
    };
    let small = runtime.update(1, port("small", Some(4)));
    let default = runtime.update(2, port("default", None));
    let huge = runtime.update(3, port("huge", Some(100_000)));
    let failure = small.failure.expect("4 MiB is too little");
    assert_eq!(failure.kind, weir::policy::FailureKind::Memory);
    assert!(failure.message.contains("budget of 4 MiB"), "{failure}");
    assert!(default.failure.is_none(), "{:?}", default.failure);
    assert!(
        huge.failure.is_none(),
        "held to the ceiling, which fits: {:?}",
        huge.failure
    );
    assert_eq!(
        metrics.failures_of("hostile", Call::update, Reason::memory),
        1,
        "only the small port failed"
    );
}

/// A module shipped gzipped (`NAME.wasm.gz`, so that the library fits one ConfigMap) is
/// the same module: same sha256 (pins name the `.wasm`), same answers; a stream that does
/// not inflate, or inflates past the module limit, is refused with its reason.
#[test]
fn gzipped_modules_load_as_the_module_they_hold() {
    use std::io::Write;
    let gzip = |bytes: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    };
    let bytes = guest_bytes("round-robin");
    let packed = gzip(&bytes);
    assert!(
        packed.len() * 2 < bytes.len(),
        "{} of {}",
        packed.len(),
        bytes.len()
    );
    let (engine, _) = engine();
    let plain = engine.load("round-robin", "rr.wasm", &bytes).unwrap();
    let inflated = engine.load("round-robin", "rr.wasm.gz", &packed).unwrap();
    assert_eq!(plain.sha256, inflated.sha256);
    let max = engine.limits().max_module_bytes;
    assert_eq!(weir::policy::module_sha256(&packed, max), plain.sha256);

    let mut corrupt = packed.clone();
    corrupt.truncate(packed.len() / 2);
    let error = engine
        .load("round-robin", "rr.wasm.gz", &corrupt)
        .err()
        .expect("refused");
    assert!(error.to_string().contains("does not inflate"), "{error}");

    // 64 MiB of zeros gzip to about 64 KiB: a bomb, refused at the module limit.
    let bomb = gzip(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 1 << 20);
    let error = engine
        .load("bomb", "bomb.wasm.gz", &bomb)
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("inflates to more than"),
        "{error}"
    );
}
