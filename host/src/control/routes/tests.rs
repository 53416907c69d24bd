//! Tests of the routes stage: addresses from a Service port and its policy's answer, and
//! address ownership, without a control plane.

use std::path::Path;

use weir_sdk::{EndpointId, EndpointSet};

use super::*;
use crate::discovery::files::load_str;
use crate::objects::Objects;

const LOAD_BALANCER: &str = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 198.18.0.10
  externalIPs: [198.18.0.20]
  loadBalancerSourceRanges: [198.18.5.0/24]
  ports: [{name: http, port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 198.18.0.30}]}}
";

fn snapshot(yaml: &str) -> ServicePortSnapshot {
    let mut objects = Objects::default();
    let mut diagnostics = Vec::new();
    load_str(Path::new("test.yaml"), yaml, &mut objects, &mut diagnostics);
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    let mut model = crate::model::build(&objects, "node-a");
    assert_eq!(model.ports.len(), 1, "{:?}", model.diagnostics);
    model.ports.remove(0)
}

fn set(endpoints: &[u32], when_empty: EmptyAction) -> EndpointSet {
    EndpointSet {
        endpoints: endpoints.iter().map(|id| *id as EndpointId).collect(),
        when_empty,
    }
}

fn eligibility(internal: EndpointSet, external: EndpointSet) -> Eligibility {
    Eligibility { internal, external }
}

fn serving() -> Eligibility {
    eligibility(
        set(&[1], EmptyAction::Reject),
        set(&[1], EmptyAction::Reject),
    )
}

fn node() -> Vec<IpAddr> {
    vec!["198.18.1.1".parse().unwrap(), "fd00::1".parse().unwrap()]
}

/// The addresses wanted, as `address/TRANSPORT scope [ranges]` lines.
fn lines(wanted: &[Wanted]) -> Vec<String> {
    wanted
        .iter()
        .map(|w| {
            let ranges: Vec<String> = w.source_ranges.iter().map(ToString::to_string).collect();
            format!("{} {:?} {ranges:?}", w.listen, w.scope)
        })
        .collect()
}

#[test]
fn a_load_balancer_port_wants_every_address_kube_proxy_matches() {
    let snapshot = snapshot(LOAD_BALANCER);
    let wanted = wanted(
        &snapshot,
        &serving(),
        Transport::Tcp,
        &node(),
        CaptureRules::ON,
    );
    assert_eq!(
        lines(&wanted),
        [
            "198.18.0.10:80/TCP Internal []",
            // The nodePort on the node's addresses of the Service's family only.
            "198.18.1.1:30080/TCP External []",
            "198.18.0.20:80/TCP External []",
            // Source ranges apply to the LoadBalancer IPs, not to the nodePort.
            "198.18.0.30:80/TCP External [\"198.18.5.0/24\"]",
        ]
    );
}

#[test]
fn a_scope_with_nothing_to_reject_has_no_listener_but_drop_keeps_one() {
    let snapshot = snapshot(LOAD_BALANCER);
    let node = node();
    // Nothing eligible anywhere and reject: no listener, the kernel refuses.
    let none = eligibility(set(&[], EmptyAction::Reject), set(&[], EmptyAction::Reject));
    assert!(wanted(&snapshot, &none, Transport::Tcp, &node, CaptureRules::ON).is_empty());

    // A Local external policy with no endpoint here drops: external addresses stay,
    // the clusterIP goes (internal rejects).
    let drop = eligibility(set(&[], EmptyAction::Reject), set(&[], EmptyAction::Drop));
    let lines = lines(&wanted(
        &snapshot,
        &drop,
        Transport::Tcp,
        &node,
        CaptureRules::ON,
    ));
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines.iter().all(|l| l.contains("External")), "{lines:?}");

    // External rejects but internal serves: the external addresses still listen (the
    // node's own pods are sent to the cluster-wide set), as kube-proxy does.
    let internal_only = eligibility(
        set(&[1], EmptyAction::Reject),
        set(&[], EmptyAction::Reject),
    );
    assert_eq!(
        wanted(
            &snapshot,
            &internal_only,
            Transport::Tcp,
            &node,
            CaptureRules::ON
        )
        .len(),
        4
    );
}

#[test]
fn transports_carry_into_the_listen_keys() {
    let snapshot = snapshot(LOAD_BALANCER);
    let wanted = wanted(
        &snapshot,
        &serving(),
        Transport::Udp,
        &node(),
        CaptureRules::ON,
    );
    assert!(wanted.iter().all(|w| w.listen.transport == Transport::Udp));
    assert_eq!(transport(ProtocolKey::Tcp), Some(Transport::Tcp));
    assert_eq!(transport(ProtocolKey::Udp), Some(Transport::Udp));
    assert_eq!(transport(ProtocolKey::Sctp), None);
}

#[test]
fn service_labels_name_the_port_by_name_or_number() {
    let named = snapshot(LOAD_BALANCER);
    assert_eq!(service_label(&named), "default/web:http");
    let unnamed = snapshot(&LOAD_BALANCER.replace("name: http, ", ""));
    assert_eq!(service_label(&unnamed), "default/web:80");
}

fn key(name: &str) -> ServiceKey {
    ("default".to_string(), name.to_string())
}

fn listen(address: &str) -> Listen {
    Listen::tcp(address.parse().unwrap())
}

#[test]
fn the_first_service_in_name_order_owns_an_address_whatever_order_claims_come_in() {
    let address = listen("198.18.0.20:80");
    let mut addresses = Addresses::default();
    let kind = || ListenerKind::Service;
    assert_eq!(
        addresses.claim(&key("b"), address, kind()),
        Claim::Granted { displaced: None }
    );
    // "a" comes later but before "b" in name order: it takes the address, and "b" is
    // returned to be applied again.
    assert_eq!(
        addresses.claim(&key("a"), address, kind()),
        Claim::Granted {
            displaced: Some(key("b"))
        }
    );
    assert_eq!(addresses.owner(&address), Some(&key("a")));
    // "b", applied again, is refused and waits; so is "c".
    assert_eq!(addresses.claim(&key("b"), address, kind()), Claim::Refused);
    assert_eq!(addresses.claim(&key("c"), address, kind()), Claim::Refused);
    // A Service that does not own it releases nothing.
    assert_eq!(addresses.release(&key("b"), &address), None);
    // When "a" lets go, the waiting Services are returned to be applied again.
    assert_eq!(
        addresses.release(&key("a"), &address),
        Some([key("b"), key("c")].into())
    );
    assert_eq!(addresses.owner(&address), None);
    assert!(addresses.wanted().is_empty());
}

#[test]
fn two_ports_of_one_service_on_one_address_keep_the_first() {
    let address = listen("198.18.0.20:80");
    let mut addresses = Addresses::default();
    let kind = || ListenerKind::Service;
    assert!(matches!(
        addresses.claim(&key("a"), address, kind()),
        Claim::Granted { .. }
    ));
    assert_eq!(addresses.claim(&key("a"), address, kind()), Claim::Refused);
    assert_eq!(addresses.owner(&address), Some(&key("a")));
}

#[test]
fn the_same_address_on_two_transports_is_two_listeners() {
    let tcp = listen("198.18.0.10:53");
    let udp = Listen {
        transport: Transport::Udp,
        ..tcp
    };
    let mut addresses = Addresses::default();
    let health = ListenerKind::HealthCheck {
        namespace: "default".into(),
        name: "dns".into(),
    };
    assert!(matches!(
        addresses.claim(&key("dns"), tcp, ListenerKind::Service),
        Claim::Granted { .. }
    ));
    assert!(matches!(
        addresses.claim(&key("other"), udp, health.clone()),
        Claim::Granted { .. }
    ));
    assert_eq!(addresses.wanted().len(), 2);
    assert_eq!(addresses.wanted()[&udp], health);
    assert_eq!(
        health_check(&node(), 30001),
        [listen("198.18.1.1:30001"), listen("[fd00::1]:30001")]
    );
}

#[test]
fn special_external_addresses_stay_off_the_capture_interface() {
    let yaml = LOAD_BALANCER
        .replace(
            "externalIPs: [198.18.0.20]",
            "externalIPs: [127.0.0.53, 169.254.169.254, 198.18.0.20]",
        )
        .replace(
            "ingress: [{ip: 198.18.0.30}]",
            "ingress: [{ip: 224.0.0.1}, {ip: 198.18.0.30}]",
        );
    let snapshot = snapshot(&yaml);
    let captured = lines(&wanted(
        &snapshot,
        &serving(),
        Transport::Tcp,
        &node(),
        CaptureRules::ON,
    ));
    assert_eq!(captured.len(), 4, "{captured:?}");
    assert!(
        captured
            .iter()
            .all(|l| !l.starts_with("127.") && !l.starts_with("169.254") && !l.starts_with("224.")),
        "{captured:?}"
    );
    // Without a capture interface (file mode on loopback) nothing is left out.
    assert_eq!(
        wanted(
            &snapshot,
            &serving(),
            Transport::Tcp,
            &node(),
            CaptureRules::OFF
        )
        .len(),
        7
    );
    assert_eq!(refused("127.0.0.53".parse().unwrap()), Some("loopback"));
    assert_eq!(
        refused("169.254.169.254".parse().unwrap()),
        Some("link-local")
    );
    assert_eq!(refused("fe80::1".parse().unwrap()), Some("link-local"));
    assert_eq!(
        refused("::ffff:127.0.0.1".parse().unwrap()),
        Some("loopback")
    );
    assert_eq!(refused("ff02::1".parse().unwrap()), Some("multicast"));
    assert_eq!(refused("0.0.0.0".parse().unwrap()), Some("unspecified"));
    assert_eq!(refused("198.18.0.20".parse().unwrap()), None);

    // With an allow-list, addresses outside it are refused too.
    let allowed = vec![Cidr::parse("198.18.0.16/29").unwrap()];
    let rules = CaptureRules {
        enabled: true,
        allowed: Some(&allowed),
    };
    assert_eq!(rules.refused("198.18.0.20".parse().unwrap()), None);
    assert_eq!(
        rules.refused("198.18.0.30".parse().unwrap()).as_deref(),
        Some("outside node.capture_allowed_cidrs")
    );
    let captured = lines(&wanted(
        &snapshot,
        &serving(),
        Transport::Tcp,
        &node(),
        rules,
    ));
    assert!(
        captured.iter().all(|l| !l.starts_with("198.18.0.30")),
        "{captured:?}"
    );
    assert!(
        captured.iter().any(|l| l.starts_with("198.18.0.20")),
        "{captured:?}"
    );
}
