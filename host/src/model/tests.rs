//! Tests of `model.rs`: kube-proxy's model from YAML objects.

use super::*;
use crate::discovery::files::load_str;
use std::path::Path;

fn model(yaml: &str, node: &str) -> Model {
    let mut objects = Objects::default();
    let mut diagnostics = Vec::new();
    load_str(Path::new("test.yaml"), yaml, &mut objects, &mut diagnostics);
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    build(&objects, node)
}

fn warnings(model: &Model) -> String {
    model
        .diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn cluster_ips_without_ip_families_use_cluster_ip_only_like_kube_proxy() {
    let service = SERVICE.replace(
        "clusterIP: 127.0.0.10,",
        "clusterIP: 127.0.0.10, clusterIPs: [127.0.0.10, \"fd00::10\"],",
    );
    let m = model(&service, "n");
    assert_eq!(m.ports.len(), 1);
    assert_eq!(m.ports[0].key.family, FamilyKey::V4);
    assert!(
        warnings(&m).contains("add spec.ipFamilies"),
        "{}",
        warnings(&m)
    );
}

#[test]
fn ip_families_without_cluster_ips_are_reported() {
    let service = SERVICE.replace(
        "clusterIP: 127.0.0.10,",
        "clusterIP: 127.0.0.10, ipFamilies: [IPv4],",
    );
    let m = model(&service, "n");
    assert!(m.ports.is_empty());
    assert!(
        warnings(&m).contains("spec.clusterIPs has 0 addresses"),
        "{}",
        warnings(&m)
    );
}

#[test]
fn ipv6_single_stack_service_uses_its_own_family() {
    let service = SERVICE.replace(
        "clusterIP: 127.0.0.10,",
        "clusterIP: \"fd00::10\", clusterIPs: [\"fd00::10\"], ipFamilies: [IPv6],",
    );
    let yaml = format!(
        "{service}{}",
        slice("a", "IPv6", "[{addresses: [\"fd00::1\"]}]")
    );
    let m = model(&yaml, "n");
    assert_eq!(m.ports.len(), 1);
    assert_eq!(m.ports[0].key.family, FamilyKey::V6);
    assert_eq!(
        m.ports[0].endpoints[0].address.to_string(),
        "[fd00::1]:8080"
    );
}

#[test]
fn slice_port_without_a_name_matches_the_unnamed_service_port() {
    let service = SERVICE.replace("ports: [{name: http, port: 80}]", "ports: [{port: 80}]");
    let yaml = format!(
        "{service}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: a, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [198.18.0.1]}}]\n"
    );
    let m = model(&yaml, "n");
    assert_eq!(m.ports[0].endpoints.len(), 1);
}

#[test]
fn slice_port_without_a_number_gives_no_endpoints() {
    let yaml = format!(
        "{SERVICE}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: a, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http}}]\nendpoints: [{{addresses: [198.18.0.1]}}]\n"
    );
    assert!(model(&yaml, "n").ports[0].endpoints.is_empty());
}

#[test]
fn same_port_name_with_different_numbers_in_two_slices_keeps_both() {
    let second =
        slice("b", "IPv4", "[{addresses: [198.18.0.1]}]").replace("port: 8080", "port: 8081");
    let yaml = format!(
        "{SERVICE}{}{second}",
        slice("a", "IPv4", "[{addresses: [198.18.0.1]}]")
    );
    let got: Vec<String> = addresses(&model(&yaml, "n"))
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(got, vec!["198.18.0.1:8080", "198.18.0.1:8081"]);
}

#[test]
fn a_slice_defined_twice_is_replaced_not_merged() {
    let mut objects = Objects::default();
    let mut diagnostics = Vec::new();
    let first = format!(
        "{SERVICE}{}",
        slice("a", "IPv4", "[{addresses: [198.18.0.1]}]")
    );
    load_str(
        Path::new("one.yaml"),
        &first,
        &mut objects,
        &mut diagnostics,
    );
    load_str(
        Path::new("two.yaml"),
        &slice("a", "IPv4", "[{addresses: [198.18.0.2]}]"),
        &mut objects,
        &mut diagnostics,
    );
    let m = build(&objects, "n");
    assert_eq!(addresses(&m), vec![("198.18.0.2:8080".to_string(), false)]);
    assert!(warnings(&m).contains("one.yaml"), "{}", warnings(&m));
    assert!(
        warnings(&m).contains("is defined again in two.yaml"),
        "{}",
        warnings(&m)
    );
}

#[test]
fn a_service_defined_twice_keeps_only_the_later_ports() {
    let later = SERVICE.replace(
        "ports: [{name: http, port: 80}]",
        "ports: [{name: admin, port: 81}]",
    );
    let m = model(&format!("{SERVICE}---\n{later}"), "n");
    let names: Vec<&str> = m.ports.iter().map(|p| p.key.port_name.as_str()).collect();
    assert_eq!(names, vec!["admin"]);
}

#[test]
fn health_check_counts_local_ready_ips_over_every_slice_port() {
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: LoadBalancer, allocateLoadBalancerNodePorts: false, externalTrafficPolicy: Local, healthCheckNodePort: 32000, clusterIP: 127.0.0.10, ports: [{name: http, port: 80}]}\n";
    let eps = "[{addresses: [198.18.0.1], nodeName: node-a}, {addresses: [198.18.0.2], nodeName: node-a, conditions: {ready: false}}, {addresses: [198.18.0.3], nodeName: node-b}]";
    let metrics_port = slice("b", "IPv4", "[{addresses: [198.18.0.4], nodeName: node-a}]")
        .replace("name: http", "name: metrics");
    let yaml = format!("{service}{}{metrics_port}", slice("a", "IPv4", eps));
    let m = model(&yaml, "node-a");
    // No nodePort and no ingress IP: the port is not reachable from outside, yet
    // kube-proxy still counts the node's ready endpoints, of every slice port.
    assert!(!m.ports[0].service.externally_accessible());
    assert_eq!(
        m.ports[0].health_check,
        Some(HealthCheck {
            node_port: 32000,
            local_endpoints: 2
        })
    );
}

#[test]
fn affinity_timeout_outside_the_api_range_falls_back_with_a_warning() {
    let svc = SERVICE.replace(
        "spec: {",
        "spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ",
    );
    let m = model(&svc, "n");
    assert_eq!(m.ports[0].service.session_affinity_timeout, Some(10_800));
    assert!(
        warnings(&m).contains("timeoutSeconds 0"),
        "{}",
        warnings(&m)
    );
}

#[test]
fn load_balancer_source_ranges_are_kept_per_family() {
    let svc = SERVICE.replace(
        "spec: {",
        "spec: {loadBalancerSourceRanges: [\" 198.18.4.0/24\", \"fd00::/64\"], ",
    );
    let m = model(&svc, "n");
    assert_eq!(
        m.ports[0].load_balancer_source_ranges,
        vec![Cidr::parse("198.18.4.0/24").unwrap()]
    );
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 127.0.0.10, ports: [{name: http, port: 80}]}\n";

fn slice(name: &str, address_type: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: web}}}}\naddressType: {address_type}\nports: [{{name: http, port: 8080}}]\nendpoints: {endpoints}\n"
    )
}

fn addresses(model: &Model) -> Vec<(String, bool)> {
    model.ports[0]
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.terminating))
        .collect()
}

#[test]
fn duplicate_endpoint_prefers_the_non_terminating_copy_in_either_slice_order() {
    let terminating = "[{addresses: [198.18.0.1], conditions: {ready: false, terminating: true}}]";
    let running = "[{addresses: [198.18.0.1]}]";
    for (first, second) in [(terminating, running), (running, terminating)] {
        let yaml = format!(
            "{SERVICE}{}{}",
            slice("a", "IPv4", first),
            slice("b", "IPv4", second)
        );
        let m = model(&yaml, "node-a");
        assert_eq!(addresses(&m), vec![("198.18.0.1:8080".to_string(), false)]);
    }
}

#[test]
fn duplicate_endpoint_later_running_copy_wins() {
    let a = "[{addresses: [198.18.0.1], nodeName: node-a}]";
    let b = "[{addresses: [198.18.0.1], nodeName: node-b}]";
    let m = model(
        &format!(
            "{SERVICE}{}{}",
            slice("a", "IPv4", a),
            slice("b", "IPv4", b)
        ),
        "node-a",
    );
    assert_eq!(m.ports[0].endpoints.len(), 1);
    // kube-proxy replaces on any later non-terminating copy: the last one wins.
    assert_eq!(m.ports[0].endpoints[0].node_name.as_deref(), Some("node-b"));
}

#[test]
fn only_the_first_address_of_an_endpoint_is_used() {
    let eps = "[{addresses: [198.18.0.1, 198.18.0.2]}]";
    let m = model(&format!("{SERVICE}{}", slice("a", "IPv4", eps)), "node-a");
    assert_eq!(addresses(&m), vec![("198.18.0.1:8080".to_string(), false)]);
}

#[test]
fn endpoints_are_sorted_as_strings_like_kube_proxy() {
    let eps = "[{addresses: [198.18.0.9]}, {addresses: [198.18.0.10]}]";
    let m = model(&format!("{SERVICE}{}", slice("a", "IPv4", eps)), "node-a");
    let got: Vec<String> = addresses(&m).into_iter().map(|(a, _)| a).collect();
    assert_eq!(got, vec!["198.18.0.10:8080", "198.18.0.9:8080"]);
}

#[test]
fn fqdn_slices_and_wrong_family_addresses_are_ignored() {
    let yaml = format!(
        "{SERVICE}{}{}",
        slice("a", "FQDN", "[{addresses: [web.example]}]"),
        slice(
            "b",
            "IPv4",
            "[{addresses: [\"fd00::1\"]}, {addresses: [\"::ffff:198.18.0.3\"]}]"
        ),
    );
    let m = model(&yaml, "node-a");
    assert_eq!(addresses(&m), vec![("198.18.0.3:8080".to_string(), false)]);
}

#[test]
fn dual_stack_service_gets_a_port_per_family() {
    let service = SERVICE.replace(
        "clusterIP: 127.0.0.10,",
        "clusterIP: 127.0.0.10, clusterIPs: [127.0.0.10, \"fd00::10\"], ipFamilies: [IPv4, IPv6],",
    );
    let yaml = format!(
        "{service}{}{}",
        slice("a", "IPv4", "[{addresses: [198.18.0.1]}]"),
        slice("b", "IPv6", "[{addresses: [\"fd00::1\"]}]"),
    );
    let m = model(&yaml, "node-a");
    assert_eq!(m.ports.len(), 2);
    assert_eq!(m.ports[0].key.family, FamilyKey::V4);
    assert_eq!(
        m.ports[0].endpoints[0].address.to_string(),
        "198.18.0.1:8080"
    );
    assert_eq!(m.ports[1].key.family, FamilyKey::V6);
    assert_eq!(m.ports[1].service.cluster_ip.to_string(), "fd00::10");
    assert_eq!(
        m.ports[1].endpoints[0].address.to_string(),
        "[fd00::1]:8080"
    );
}

#[test]
fn locality_compares_node_name_with_this_node() {
    let eps = "[{addresses: [198.18.0.1], nodeName: node-a}, {addresses: [198.18.0.2], nodeName: node-b}, {addresses: [198.18.0.3]}]";
    let m = model(&format!("{SERVICE}{}", slice("a", "IPv4", eps)), "node-a");
    let local: Vec<bool> = m.ports[0].endpoints.iter().map(|e| e.is_local).collect();
    assert_eq!(local, vec![true, false, false]);
}

#[test]
fn external_traffic_policy_local_needs_an_externally_accessible_type() {
    let cluster = SERVICE.replace("spec: {", "spec: {externalTrafficPolicy: Local, ");
    assert!(!model(&cluster, "n").ports[0].service.external_traffic_local);
    let node_port = SERVICE.replace(
        "spec: {",
        "spec: {type: NodePort, externalTrafficPolicy: Local, ",
    );
    assert!(
        model(&node_port, "n").ports[0]
            .service
            .external_traffic_local
    );
    let external_ips = SERVICE.replace(
        "spec: {",
        "spec: {externalIPs: [198.18.9.9], externalTrafficPolicy: Local, ",
    );
    let m = model(&external_ips, "n");
    assert!(m.ports[0].service.external_traffic_local);
    assert!(m.ports[0].service.externally_accessible());
}

#[test]
fn session_affinity_defaults_to_three_hours() {
    let svc = SERVICE.replace("spec: {", "spec: {sessionAffinity: ClientIP, ");
    assert_eq!(
        model(&svc, "n").ports[0].service.session_affinity_timeout,
        Some(10_800)
    );
    let svc = SERVICE.replace("spec: {", "spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}, ");
    assert_eq!(
        model(&svc, "n").ports[0].service.session_affinity_timeout,
        Some(30)
    );
}

#[test]
fn headless_and_external_name_services_are_skipped() {
    let headless = SERVICE.replace("clusterIP: 127.0.0.10", "clusterIP: None");
    assert!(model(&headless, "n").ports.is_empty());
    let external = SERVICE.replace(
        "spec: {",
        "spec: {type: ExternalName, externalName: example.com, ",
    );
    assert!(model(&external, "n").ports.is_empty());
}
