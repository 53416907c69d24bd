//! `kube-default`: kube-proxy's behaviour as a weir policy, and weir's built-in default.
//!
//! Eligibility is exactly kube-proxy's (EndpointSlice readiness, terminating fallback,
//! topology hints, internal/external traffic policy Local, reject vs drop; see
//! `weir_sdk::kube`). Selection is uniform random among the eligible endpoints, as
//! kube-proxy's iptables `statistic --mode random` and nftables `numgen random` rules do,
//! with `sessionAffinity: ClientIP` keeping a client on its endpoint within the timeout.

use weir_sdk::affinity::ClientIpAffinity;
use weir_sdk::{Connection, Decision, EndpointId, Policy, Service};

/// Takes no configuration.
#[derive(Debug, Default)]
pub struct KubeDefault;

/// Per service port: the client IP affinity table (used only with `sessionAffinity: ClientIP`).
#[derive(Debug, Default)]
pub struct State {
    affinity: ClientIpAffinity,
}

impl Policy for KubeDefault {
    type State = State;

    fn configure(config: &str) -> Result<Self, String> {
        if config.trim().is_empty() || config.trim() == "{}" {
            Ok(KubeDefault)
        } else {
            Err(format!(
                "kube-default takes no configuration, got {:?}; remove it",
                truncate(config)
            ))
        }
    }

    fn update(
        &self,
        state: &mut State,
        service: &Service,
        node: &weir_sdk::Node,
        endpoints: &[weir_sdk::Endpoint],
    ) -> weir_sdk::Eligibility {
        let eligibility = weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints);
        state.affinity.retain_eligible(&eligibility);
        eligibility
    }

    fn select(
        &self,
        state: &mut State,
        service: &Service,
        eligible: &[EndpointId],
        connection: &Connection,
    ) -> Decision {
        let random = || eligible[weir_sdk::random_below(eligible.len())];
        let endpoint = match service.session_affinity_timeout {
            Some(timeout) => state.affinity.select(
                connection.client.ip(),
                timeout,
                eligible,
                weir_sdk::now_nanos(),
                random,
            ),
            None => random(),
        };
        Decision::Forward(endpoint)
    }
}

fn truncate(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

weir_sdk::export_policy!(KubeDefault);

#[cfg(test)]
mod tests {
    //! kube-default driven natively through `weir_sdk::Driver`, with the SDK's seedable
    //! randomness and frozen clock standing in for the host's.

    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use weir_sdk::host::testing::{seed_random, set_clock};
    use weir_sdk::{Driver, EmptyAction, Endpoint, Node, Scope, ZONE_LABEL};

    use super::*;

    const HANDLE: u32 = 7;
    const SECOND: u64 = 1_000_000_000;
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
    const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);

    /// A NodePort service, both traffic policies Cluster, no affinity.
    fn service() -> Service {
        Service {
            port_name: String::new(),
            node_port: 30080,
            ..Service::cluster_ip("default", "web", IpAddr::V4(CLUSTER_IP), 80)
        }
    }

    fn etp_local() -> Service {
        Service {
            external_traffic_local: true,
            ..service()
        }
    }

    fn itp_local() -> Service {
        Service {
            internal_traffic_local: true,
            ..service()
        }
    }

    fn with_affinity(timeout_seconds: u32) -> Service {
        Service {
            session_affinity_timeout: Some(timeout_seconds),
            ..service()
        }
    }

    fn node() -> Node {
        Node {
            name: "node-a".into(),
            labels: vec![(ZONE_LABEL.into(), "zone-a".into())],
        }
    }

    /// A ready endpoint on another node.
    fn remote(id: EndpointId) -> Endpoint {
        let address = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 244, 1, id as u8)), 8080);
        Endpoint {
            node_name: Some("node-b".into()),
            ..Endpoint::ready(id, address)
        }
    }

    /// A ready endpoint on this node.
    fn local(id: EndpointId) -> Endpoint {
        Endpoint {
            node_name: Some("node-a".into()),
            is_local: true,
            ..remote(id)
        }
    }

    fn not_ready(endpoint: Endpoint) -> Endpoint {
        Endpoint {
            ready: false,
            serving: false,
            ..endpoint
        }
    }

    fn serving_terminating(endpoint: Endpoint) -> Endpoint {
        Endpoint {
            ready: false,
            serving: true,
            terminating: true,
            ..endpoint
        }
    }

    fn client(host: u32, port: u16) -> SocketAddr {
        let [a, b, c, d] = (0xc633_6400u32 + host).to_be_bytes(); // 198.51.100.0 + host
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port)
    }

    fn connection(client: SocketAddr, scope: Scope) -> Connection {
        let destination = match scope {
            Scope::Internal => SocketAddr::new(IpAddr::V4(CLUSTER_IP), 80),
            Scope::External => SocketAddr::new(IpAddr::V4(NODE_IP), 30080),
        };
        Connection {
            client,
            destination,
            scope,
        }
    }

    fn driver() -> Driver<KubeDefault> {
        Driver::configure("").unwrap_or_else(|e| panic!("configure(\"\") failed: {e}"))
    }

    fn forwarded(decision: Decision) -> EndpointId {
        match decision {
            Decision::Forward(id) => id,
            other => panic!("expected a forward, got {other:?}"),
        }
    }

    /// One connection per call from `host`, with a fresh source port each time.
    fn pick(driver: &mut Driver<KubeDefault>, host: u32, port: u16, scope: Scope) -> EndpointId {
        forwarded(driver.select(HANDLE, &connection(client(host, port), scope)))
    }

    fn counts(driver: &mut Driver<KubeDefault>, n: u32, scope: Scope) -> BTreeMap<EndpointId, u32> {
        let mut counts = BTreeMap::new();
        for i in 0..n {
            let id = pick(driver, i % 1000, 1024 + (i % 60000) as u16, scope);
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    fn assert_uniform(counts: &BTreeMap<EndpointId, u32>, expected: &[EndpointId], n: u32) {
        assert_eq!(
            counts.keys().copied().collect::<Vec<_>>(),
            expected,
            "picked endpoints {counts:?}"
        );
        let fair = 1.0 / expected.len() as f64;
        for (id, count) in counts {
            let share = f64::from(*count) / f64::from(n);
            assert!(
                (share - fair).abs() <= 0.03 * fair,
                "endpoint {id} got share {share:.4}, want {fair:.4} ± 3%: {counts:?}"
            );
        }
    }

    // ---- (a) uniform random selection among eligible endpoints.

    #[test]
    fn selection_is_uniform_among_eligible_endpoints() {
        seed_random(0x5eed_0001);
        let mut driver = driver();
        driver.update(
            HANDLE,
            service(),
            &node(),
            &[remote(1), local(2), remote(3)],
        );
        let n = 30_000;
        assert_uniform(&counts(&mut driver, n, Scope::Internal), &[1, 2, 3], n);
        assert_uniform(&counts(&mut driver, n, Scope::External), &[1, 2, 3], n);
    }

    #[test]
    fn external_traffic_under_etp_local_is_uniform_over_local_endpoints_only() {
        seed_random(0x5eed_0002);
        let mut driver = driver();
        let endpoints = [
            local(1),
            local(2),
            local(3),
            remote(4),                      // remote: internal only
            not_ready(local(5)),            // never
            serving_terminating(local(6)),  // a ready local one exists: never
            serving_terminating(remote(7)), // ready ones exist: never
        ];
        let eligibility = driver.update(HANDLE, etp_local(), &node(), &endpoints);
        assert_eq!(eligibility.external.endpoints, [1, 2, 3]);
        assert_eq!(eligibility.internal.endpoints, [1, 2, 3, 4]);
        let n = 30_000;
        assert_uniform(&counts(&mut driver, n, Scope::External), &[1, 2, 3], n);
        assert_uniform(&counts(&mut driver, n, Scope::Internal), &[1, 2, 3, 4], n);
    }

    #[test]
    fn not_ready_endpoints_are_never_picked() {
        seed_random(0x5eed_0003);
        let mut driver = driver();
        let endpoints = [
            not_ready(remote(1)),
            remote(2),
            not_ready(local(3)),
            local(4),
        ];
        driver.update(HANDLE, service(), &node(), &endpoints);
        for scope in [Scope::Internal, Scope::External] {
            let seen: BTreeSet<_> = counts(&mut driver, 3_000, scope).into_keys().collect();
            assert_eq!(seen, BTreeSet::from([2, 4]), "{scope:?}");
        }
    }

    #[test]
    fn serving_terminating_endpoints_are_used_when_none_is_ready() {
        seed_random(0x5eed_0004);
        let mut driver = driver();
        let endpoints = [
            serving_terminating(remote(1)),
            serving_terminating(local(2)),
            not_ready(remote(3)),
            Endpoint {
                terminating: true,
                ..not_ready(remote(4))
            },
        ];
        driver.update(HANDLE, service(), &node(), &endpoints);
        let seen: BTreeSet<_> = counts(&mut driver, 3_000, Scope::Internal)
            .into_keys()
            .collect();
        assert_eq!(seen, BTreeSet::from([1, 2]));
    }

    #[test]
    fn without_session_affinity_one_client_is_spread_over_all_endpoints() {
        seed_random(0x5eed_0005);
        set_clock(Some(1_000 * SECOND));
        let mut driver = driver();
        driver.update(
            HANDLE,
            service(),
            &node(),
            &[remote(1), remote(2), remote(3)],
        );
        let seen: BTreeSet<_> = (0..300)
            .map(|_| pick(&mut driver, 1, 40_000, Scope::Internal))
            .collect();
        assert_eq!(seen, BTreeSet::from([1, 2, 3]));
    }

    // ---- (b) empty eligible sets: reject or drop.

    #[test]
    fn no_endpoints_rejects_both_scopes() {
        let mut driver = driver();
        driver.update(HANDLE, etp_local(), &node(), &[]);
        for scope in [Scope::Internal, Scope::External] {
            let decision = driver.select(HANDLE, &connection(client(1, 40_000), scope));
            assert_eq!(decision, Decision::Reject, "{scope:?}");
        }
    }

    #[test]
    fn only_unusable_endpoints_rejects_both_scopes() {
        let mut driver = driver();
        let endpoints = [
            not_ready(local(1)),
            Endpoint {
                terminating: true,
                ..not_ready(remote(2))
            },
        ];
        let eligibility = driver.update(HANDLE, itp_local(), &node(), &endpoints);
        assert_eq!(eligibility.internal.when_empty, EmptyAction::Reject);
        for scope in [Scope::Internal, Scope::External] {
            let decision = driver.select(HANDLE, &connection(client(1, 40_000), scope));
            assert_eq!(decision, Decision::Reject, "{scope:?}");
        }
    }

    #[test]
    fn itp_local_without_local_endpoints_drops_internal_and_serves_external() {
        seed_random(0x5eed_0006);
        let mut driver = driver();
        let eligibility = driver.update(HANDLE, itp_local(), &node(), &[remote(1), remote(2)]);
        assert_eq!(eligibility.internal.endpoints, [] as [EndpointId; 0]);
        assert_eq!(eligibility.internal.when_empty, EmptyAction::Drop);
        for port in 0..50 {
            let internal = driver.select(HANDLE, &connection(client(1, port), Scope::Internal));
            assert_eq!(internal, Decision::Drop);
            let external = pick(&mut driver, 1, port, Scope::External);
            assert!([1, 2].contains(&external), "external picked {external}");
        }
    }

    #[test]
    fn etp_local_without_local_endpoints_drops_external_and_serves_internal() {
        seed_random(0x5eed_0007);
        let mut driver = driver();
        let eligibility = driver.update(HANDLE, etp_local(), &node(), &[remote(1), remote(2)]);
        assert_eq!(eligibility.external.when_empty, EmptyAction::Drop);
        for port in 0..50 {
            let external = driver.select(HANDLE, &connection(client(1, port), Scope::External));
            assert_eq!(external, Decision::Drop);
            let internal = pick(&mut driver, 1, port, Scope::Internal);
            assert!([1, 2].contains(&internal), "internal picked {internal}");
        }
    }

    #[test]
    fn losing_every_endpoint_turns_forwards_into_rejects() {
        seed_random(0x5eed_0008);
        let mut driver = driver();
        driver.update(HANDLE, service(), &node(), &[remote(1)]);
        assert_eq!(pick(&mut driver, 1, 40_000, Scope::Internal), 1);
        driver.update(HANDLE, service(), &node(), &[not_ready(remote(1))]);
        let decision = driver.select(HANDLE, &connection(client(1, 40_001), Scope::Internal));
        assert_eq!(decision, Decision::Reject);
    }

    #[test]
    fn unknown_or_removed_service_rejects() {
        let mut driver = driver();
        let conn = connection(client(1, 40_000), Scope::Internal);
        assert_eq!(driver.select(HANDLE, &conn), Decision::Reject);
        driver.update(HANDLE, service(), &node(), &[remote(1)]);
        assert_eq!(driver.select(HANDLE, &conn), Decision::Forward(1));
        driver.remove(HANDLE);
        assert_eq!(driver.select(HANDLE, &conn), Decision::Reject);
    }

    // ---- (c) sessionAffinity: ClientIP.

    const CLIENTS: u32 = 30;

    /// Each client's endpoint after one connection at the current clock.
    fn first_picks(driver: &mut Driver<KubeDefault>) -> Vec<EndpointId> {
        (0..CLIENTS)
            .map(|host| pick(driver, host, 10_000, Scope::Internal))
            .collect()
    }

    #[test]
    fn affinity_keeps_a_client_ip_on_its_endpoint_across_connections_and_ports() {
        seed_random(0x5eed_0101);
        let mut now = 1_000 * SECOND;
        set_clock(Some(now));
        let mut driver = driver();
        driver.update(
            HANDLE,
            with_affinity(10),
            &node(),
            &[remote(1), remote(2), remote(3)],
        );
        let sticky = first_picks(&mut driver);
        let distinct: BTreeSet<_> = sticky.iter().collect();
        assert!(distinct.len() > 1, "clients were not spread: {sticky:?}");
        // 100 rounds 9 s apart: 900 s in all, far beyond the 10 s timeout, but each
        // connection comes within the timeout of the previous one and refreshes it.
        for round in 0..100u16 {
            now += 9 * SECOND;
            set_clock(Some(now));
            for host in 0..CLIENTS {
                let port = 20_000 + round * 7 + host as u16;
                let scope = if round % 2 == 0 {
                    Scope::Internal
                } else {
                    Scope::External
                };
                assert_eq!(
                    pick(&mut driver, host, port, scope),
                    sticky[host as usize],
                    "client {host} moved in round {round} (port {port}, {scope:?})"
                );
            }
        }
        set_clock(None);
    }

    #[test]
    fn affinity_expires_after_the_timeout_without_connections() {
        seed_random(0x5eed_0102);
        let start = 1_000 * SECOND;
        set_clock(Some(start));
        let mut driver = driver();
        driver.update(
            HANDLE,
            with_affinity(10),
            &node(),
            &[remote(1), remote(2), remote(3)],
        );
        let sticky = first_picks(&mut driver);
        // Just inside the timeout: everyone stays (and the entries are refreshed).
        let refreshed = start + 10 * SECOND - 1_000_000;
        set_clock(Some(refreshed));
        assert_eq!(first_picks(&mut driver), sticky);
        // More than the timeout after the last connection: picked afresh, so with 30
        // clients over 3 endpoints some land elsewhere (deterministic with this seed).
        set_clock(Some(refreshed + 11 * SECOND));
        let again = first_picks(&mut driver);
        let moved = (0..CLIENTS as usize)
            .filter(|&i| again[i] != sticky[i])
            .count();
        assert!(
            moved >= 1,
            "no client re-picked after the timeout: {again:?}"
        );
        // The new picks are sticky in turn.
        set_clock(Some(refreshed + 15 * SECOND));
        assert_eq!(first_picks(&mut driver), again);
        set_clock(None);
    }

    #[test]
    fn endpoint_leaving_the_eligible_set_forces_a_new_pick() {
        seed_random(0x5eed_0103);
        let mut now = 1_000 * SECOND;
        set_clock(Some(now));
        let mut driver = driver();
        let service = with_affinity(10_800);
        driver.update(
            HANDLE,
            service.clone(),
            &node(),
            &[remote(1), remote(2), remote(3)],
        );
        let sticky = first_picks(&mut driver);
        let gone = sticky[0];
        assert!(
            sticky.iter().any(|&e| e != gone),
            "all clients on {gone}: {sticky:?}"
        );

        // `gone` leaves (its pod became not ready); endpoint 4 appears.
        let remaining: Vec<Endpoint> = [1, 2, 3]
            .into_iter()
            .map(|id| {
                if id == gone {
                    not_ready(remote(id))
                } else {
                    remote(id)
                }
            })
            .chain([remote(4)])
            .collect();
        driver.update(HANDLE, service.clone(), &node(), &remaining);
        now += SECOND;
        set_clock(Some(now));
        let after = first_picks(&mut driver);
        for (host, (&before, &now_on)) in sticky.iter().zip(&after).enumerate() {
            assert_ne!(
                now_on, gone,
                "client {host} still sent to the ineligible {gone}"
            );
            if before != gone {
                assert_eq!(
                    now_on, before,
                    "client {host} moved off an eligible endpoint"
                );
            }
        }

        // The new picks stick, even once `gone` is back.
        driver.update(
            HANDLE,
            service,
            &node(),
            &[remote(1), remote(2), remote(3), remote(4)],
        );
        now += SECOND;
        set_clock(Some(now));
        assert_eq!(first_picks(&mut driver), after);
        set_clock(None);
    }

    #[test]
    fn affinity_survives_an_update_that_keeps_the_endpoint() {
        seed_random(0x5eed_0104);
        let mut now = 1_000 * SECOND;
        set_clock(Some(now));
        let mut driver = driver();
        let service = with_affinity(60);
        driver.update(
            HANDLE,
            service.clone(),
            &node(),
            &[remote(1), remote(2), remote(3)],
        );
        let sticky = first_picks(&mut driver);

        // Same endpoints, listed in another order, plus two new ones.
        let endpoints = [remote(5), remote(3), remote(1), remote(4), remote(2)];
        driver.update(HANDLE, service.clone(), &node(), &endpoints);
        now += 30 * SECOND;
        set_clock(Some(now));
        assert_eq!(first_picks(&mut driver), sticky, "after adding endpoints");

        // A changed Service (new nodePort) with the same endpoints keeps affinity too.
        let changed = Service {
            node_port: 30081,
            ..service
        };
        driver.update(HANDLE, changed, &node(), &endpoints);
        now += 30 * SECOND;
        set_clock(Some(now));
        assert_eq!(first_picks(&mut driver), sticky, "after a Service change");
        set_clock(None);
    }

    #[test]
    fn affinity_never_forwards_outside_the_scopes_eligible_set() {
        seed_random(0x5eed_0105);
        set_clock(Some(1_000 * SECOND));
        let mut driver = driver();
        let service = Service {
            session_affinity_timeout: Some(10_800),
            ..etp_local()
        };
        driver.update(HANDLE, service, &node(), &[local(1), local(2), remote(3)]);
        // Clients whose internal connections stick to the remote endpoint...
        let on_remote: Vec<u32> = (0..CLIENTS)
            .filter(|&host| pick(&mut driver, host, 10_000, Scope::Internal) == 3)
            .collect();
        assert!(
            !on_remote.is_empty(),
            "no client picked the remote endpoint"
        );
        // ...are still sent to a local endpoint when they come in through the nodePort.
        for &host in &on_remote {
            for port in 0..20 {
                let external = pick(&mut driver, host, 11_000 + port, Scope::External);
                assert!(
                    [1, 2].contains(&external),
                    "client {host} sent to {external}"
                );
            }
        }
        set_clock(None);
    }

    // ---- (d) configuration.

    #[test]
    fn configure_accepts_no_configuration() {
        for config in ["", "{}", "  ", " {} \n"] {
            let driver = Driver::<KubeDefault>::configure(config)
                .unwrap_or_else(|e| panic!("configure({config:?}) refused: {e}"));
            assert!(!driver.capabilities().observe_outcomes);
        }
    }

    #[test]
    fn configure_refuses_any_configuration_with_a_message() {
        for config in [r#"{"seed": 1}"#, "sticky: true", "[]", "{ }x", "null"] {
            let error = Driver::<KubeDefault>::configure(config)
                .err()
                .unwrap_or_else(|| panic!("configure({config:?}) was accepted"));
            assert!(
                error.contains("kube-default takes no configuration"),
                "unhelpful message for {config:?}: {error}"
            );
            assert!(
                error.contains(&format!("{config:?}")),
                "message does not quote {config:?}: {error}"
            );
        }
    }

    #[test]
    fn configure_error_quotes_at_most_64_characters() {
        let long = "é".repeat(200);
        let error = Driver::<KubeDefault>::configure(&long)
            .err()
            .expect("a long configuration was accepted");
        assert!(error.contains(&"é".repeat(64)), "{error}");
        assert!(!error.contains(&"é".repeat(65)), "{error}");
    }
}
