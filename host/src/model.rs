//! Services, EndpointSlices and the Node turned into per-ServicePort snapshots, per IP
//! family, exactly as kube-proxy builds its ServicePort and Endpoints maps
//! (`pkg/proxy/serviceport.go`, `endpointslicecache.go`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use weir_sdk::{Endpoint, IpFamily, Node, Protocol};

use crate::discovery::files::{Diagnostic, Objects, Sourced};
use crate::policy::{DEFAULT_POLICY, FailureMode};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Selects the policy for a Service (a module name from the policies directory).
pub const POLICY_ANNOTATION: &str = "weir.dev/policy";
/// Per-service configuration handed to the policy.
pub const POLICY_CONFIG_ANNOTATION: &str = "weir.dev/policy-config";
/// `open` or `closed`: what the Service gets when its policy fails.
pub const FAILURE_MODE_ANNOTATION: &str = "weir.dev/failure-mode";
/// `spec.sessionAffinityConfig.clientIP.timeoutSeconds` when unset (the API default).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

/// Identifies a service port: kube-proxy's `ServicePortName` plus the IP family.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortKey {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: ProtocolKey,
    pub family: FamilyKey,
}

/// `Protocol` with an order, for map keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolKey {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FamilyKey {
    V4,
    V6,
}

impl ProtocolKey {
    pub fn protocol(self) -> Protocol {
        match self {
            ProtocolKey::Tcp => Protocol::Tcp,
            ProtocolKey::Udp => Protocol::Udp,
            ProtocolKey::Sctp => Protocol::Sctp,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolKey::Tcp => "TCP",
            ProtocolKey::Udp => "UDP",
            ProtocolKey::Sctp => "SCTP",
        }
    }

    fn parse(text: Option<&str>) -> Option<Self> {
        match text.unwrap_or("TCP") {
            "TCP" => Some(ProtocolKey::Tcp),
            "UDP" => Some(ProtocolKey::Udp),
            "SCTP" => Some(ProtocolKey::Sctp),
            _ => None,
        }
    }
}

impl FamilyKey {
    pub fn family(self) -> IpFamily {
        match self {
            FamilyKey::V4 => IpFamily::V4,
            FamilyKey::V6 => IpFamily::V6,
        }
    }

    pub fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => FamilyKey::V4,
            IpAddr::V6(_) => FamilyKey::V6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FamilyKey::V4 => "IPv4",
            FamilyKey::V6 => "IPv6",
        }
    }
}

/// One service port in one family, with its endpoints merged from every slice.
#[derive(Clone, Debug)]
pub struct ServicePortSnapshot {
    pub key: ServicePortKey,
    /// What the policy is told about the port.
    pub service: weir_sdk::Service,
    /// Merged, de-duplicated, sorted by `ip:port` string. Ids are 0 until the state layer
    /// assigns stable ones.
    pub endpoints: Vec<Endpoint>,
    /// The policy bound by the `weir.dev/policy` annotation, or kube-default.
    pub policy: String,
    pub failure_mode: FailureMode,
    /// The Service's healthCheckNodePort, when kube-proxy would serve one for it
    /// (type LoadBalancer with externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
}

/// The proxy's view of the cluster from one node.
#[derive(Clone, Debug)]
pub struct Model {
    pub node: Arc<Node>,
    /// Sorted by key.
    pub ports: Vec<ServicePortSnapshot>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Builds the model for `node_name` from `objects`.
pub fn build(objects: &Objects, node_name: &str) -> Model {
    let mut diagnostics = Vec::new();
    let node = Arc::new(node_of(objects, node_name));
    let slices = group_slices(objects, &mut diagnostics);
    let mut ports = BTreeMap::new();
    for service in &objects.services {
        for snapshot in service_ports(service, &mut diagnostics) {
            ports.insert(snapshot.key.clone(), snapshot);
        }
    }
    for snapshot in ports.values_mut() {
        let service_slices = slices
            .get(&(snapshot.key.namespace.clone(), snapshot.key.name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        snapshot.endpoints = merge_endpoints(&snapshot.key, service_slices, node_name);
    }
    Model {
        node,
        ports: ports.into_values().collect(),
        diagnostics,
    }
}

fn node_of(objects: &Objects, node_name: &str) -> Node {
    let labels = objects
        .nodes
        .iter()
        .find(|n| n.object.metadata.name.as_deref() == Some(node_name))
        .and_then(|n| n.object.metadata.labels.clone())
        .unwrap_or_default();
    Node {
        name: node_name.to_string(),
        labels: labels.into_iter().collect(),
    }
}

type SliceMap<'a> = HashMap<(String, String), Vec<&'a Sourced<EndpointSlice>>>;

fn group_slices<'a>(objects: &'a Objects, diagnostics: &mut Vec<Diagnostic>) -> SliceMap<'a> {
    let mut slices: SliceMap<'a> = HashMap::new();
    for slice in &objects.endpoint_slices {
        let meta = &slice.object.metadata;
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let name = meta.name.clone().unwrap_or_default();
        let Some(service) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            diagnostics.push(Diagnostic::warning(
                &slice.origin,
                Some(format!("EndpointSlice {namespace}/{name}")),
                format!(
                    "has no `{SERVICE_NAME_LABEL}` label, so it belongs to no Service and is ignored (as kube-proxy does); add `metadata.labels.{SERVICE_NAME_LABEL}: <service name>`"
                ),
            ));
            continue;
        };
        for port in slice.object.ports.iter().flatten() {
            if port.name.is_none() {
                diagnostics.push(Diagnostic::warning(
                    &slice.origin,
                    Some(format!("EndpointSlice {namespace}/{name}")),
                    format!(
                        "port {} has no `name`, so kube-proxy ignores it; set `name: \"\"` to match an unnamed Service port, or the Service port's name",
                        port.port.map_or("<none>".to_string(), |p| p.to_string())
                    ),
                ));
            }
        }
        slices
            .entry((namespace, service.clone()))
            .or_default()
            .push(slice);
    }
    for list in slices.values_mut() {
        list.sort_by(|a, b| a.object.metadata.name.cmp(&b.object.metadata.name));
    }
    slices
}

/// kube-proxy's ServicePorts for one Service: one per port per IP family with a clusterIP.
fn service_ports(
    sourced: &Sourced<Service>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<ServicePortSnapshot> {
    let service = &sourced.object;
    let meta = &service.metadata;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let name = meta.name.clone().unwrap_or_default();
    let object = Some(format!("Service {namespace}/{name}"));
    let warn = |diagnostics: &mut Vec<Diagnostic>, message: String| {
        diagnostics.push(Diagnostic::warning(
            &sourced.origin,
            object.clone(),
            message,
        ));
    };
    let Some(spec) = &service.spec else {
        warn(diagnostics, "has no spec; nothing to proxy".into());
        return Vec::new();
    };
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return Vec::new();
    }
    let cluster_ips: Vec<String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => spec.cluster_ip.iter().cloned().collect(),
    };
    if cluster_ips.first().is_some_and(|ip| ip == "None") {
        return Vec::new(); // headless: DNS only
    }
    if cluster_ips.iter().all(|ip| ip.is_empty()) {
        warn(
            diagnostics,
            "has no clusterIP, so kube-proxy treats it as headless and skips it; set spec.clusterIP (a 127.0.0.0/8 address works on a laptop)".into(),
        );
        return Vec::new();
    }
    let ports = spec.ports.clone().unwrap_or_default();
    if ports.is_empty() {
        warn(
            diagnostics,
            "has no ports, so there is nothing to proxy; add spec.ports".into(),
        );
        return Vec::new();
    }

    let annotations = meta.annotations.clone().unwrap_or_default();
    let policy = annotations
        .get(POLICY_ANNOTATION)
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_POLICY.to_string());
    let failure_mode = match annotations.get(FAILURE_MODE_ANNOTATION).map(|s| s.trim()) {
        None | Some("open") => FailureMode::Open,
        Some("closed") => FailureMode::Closed,
        Some(other) => {
            warn(
                diagnostics,
                format!(
                    "annotation {FAILURE_MODE_ANNOTATION}: `{other}` is not `open` or `closed`; using `open`"
                ),
            );
            FailureMode::Open
        }
    };
    let config = annotations.get(POLICY_CONFIG_ANNOTATION).cloned();

    let externally_accessible_type = service_type == "LoadBalancer"
        || service_type == "NodePort"
        || (service_type == "ClusterIP"
            && !spec.external_ips.as_deref().unwrap_or_default().is_empty());
    let external_traffic_local =
        externally_accessible_type && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_traffic_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let session_affinity_timeout =
        (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
        });
    let health_check_node_port = if service_type == "LoadBalancer" && external_traffic_local {
        match spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        {
            Some(port) => Some(port),
            None => {
                warn(
                    diagnostics,
                    "is a LoadBalancer with externalTrafficPolicy Local but has no healthCheckNodePort, so no health check server is started (kube-proxy logs the same); set spec.healthCheckNodePort".into(),
                );
                None
            }
        }
    } else {
        None
    };

    let mut by_family: BTreeMap<FamilyKey, IpAddr> = BTreeMap::new();
    for (index, text) in cluster_ips.iter().enumerate() {
        match parse_ip_sloppy(text) {
            Some(ip) => {
                by_family.entry(FamilyKey::of(ip)).or_insert(ip);
            }
            None => warn(
                diagnostics,
                format!("spec.clusterIPs[{index}] `{text}` is not an IP address; ignored"),
            ),
        }
    }
    let family_ips =
        |texts: &[String], field: &str, family: FamilyKey, diagnostics: &mut Vec<Diagnostic>| {
            let mut out = Vec::new();
            for text in texts {
                match parse_ip_sloppy(text.trim()) {
                    Some(ip) if FamilyKey::of(ip) == family => out.push(ip),
                    Some(_) => {}
                    None => warn(
                        diagnostics,
                        format!("{field} `{text}` is not an IP address; ignored"),
                    ),
                }
            }
            out
        };
    let external_ips = spec.external_ips.clone().unwrap_or_default();
    let ingress_vips: Vec<String> = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ingress| {
            ingress
                .iter()
                .filter(|i| i.ip_mode.as_deref().is_none_or(|m| m == "VIP"))
                .filter_map(|i| i.ip.clone())
                .filter(|ip| !ip.is_empty())
                .collect()
        })
        .unwrap_or_default();

    let mut out = Vec::new();
    for (&family, &cluster_ip) in &by_family {
        let external = family_ips(&external_ips, "spec.externalIPs", family, diagnostics);
        let vips = family_ips(
            &ingress_vips,
            "status.loadBalancer.ingress[].ip",
            family,
            diagnostics,
        );
        for (index, port) in ports.iter().enumerate() {
            let Some(protocol) = ProtocolKey::parse(port.protocol.as_deref()) else {
                warn(
                    diagnostics,
                    format!(
                        "spec.ports[{index}].protocol `{}` is not TCP, UDP or SCTP; port ignored",
                        port.protocol.as_deref().unwrap_or("")
                    ),
                );
                continue;
            };
            let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
                warn(
                    diagnostics,
                    format!(
                        "spec.ports[{index}].port {} is not a port number; port ignored",
                        port.port
                    ),
                );
                continue;
            };
            let port_name = port.name.clone().unwrap_or_default();
            let key = ServicePortKey {
                namespace: namespace.clone(),
                name: name.clone(),
                port_name: port_name.clone(),
                protocol,
                family,
            };
            out.push(ServicePortSnapshot {
                key,
                service: weir_sdk::Service {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    port_name,
                    protocol: protocol.protocol(),
                    ip_family: family.family(),
                    cluster_ip,
                    port: number,
                    node_port: port
                        .node_port
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or(0),
                    external_ips: external.clone(),
                    load_balancer_ips: vips.clone(),
                    internal_traffic_local,
                    external_traffic_local,
                    session_affinity_timeout,
                    config: config.clone(),
                },
                endpoints: Vec::new(),
                policy: policy.clone(),
                failure_mode,
                health_check_node_port,
            });
        }
    }
    out
}

/// kube-proxy's endpoints for one service port: every slice of the service with the port's
/// address family, the slice port with the same name and protocol, the first address of
/// each endpoint, duplicates collapsed (a later non-terminating duplicate replaces an
/// earlier one), sorted by `ip:port` string.
fn merge_endpoints(
    key: &ServicePortKey,
    slices: &[&Sourced<EndpointSlice>],
    node_name: &str,
) -> Vec<Endpoint> {
    let address_type = key.family.as_str();
    let mut merged: HashMap<String, Endpoint> = HashMap::new();
    for slice in slices {
        let slice = &slice.object;
        if slice.address_type != address_type {
            continue;
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref() == Some(key.port_name.as_str())
                && ProtocolKey::parse(p.protocol.as_deref()) == Some(key.protocol)
        }) else {
            continue;
        };
        let Some(port_number) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let Some(first) = endpoint.addresses.first() else {
                continue;
            };
            let Some(ip) = parse_ip_sloppy(first) else {
                continue;
            };
            if FamilyKey::of(ip) != key.family {
                continue;
            }
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let hints = endpoint.hints.as_ref();
            let zone_hints = hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default();
            let node_hints = hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default();
            let address = SocketAddr::new(ip, port_number);
            let candidate = Endpoint {
                id: 0,
                address,
                ready,
                serving,
                terminating,
                node_name: endpoint.node_name.clone(),
                zone: endpoint.zone.clone(),
                is_local: !node_name.is_empty() && endpoint.node_name.as_deref() == Some(node_name),
                zone_hints,
                node_hints,
            };
            let text = address.to_string();
            if !merged.contains_key(&text) || !terminating {
                merged.insert(text, candidate);
            }
        }
    }
    let mut endpoints: Vec<(String, Endpoint)> = merged.into_iter().collect();
    endpoints.sort_by(|a, b| a.0.cmp(&b.0));
    endpoints.into_iter().map(|(_, e)| e).collect()
}

/// Go's `netutils.ParseIPSloppy(...)` followed by `String()`: IPv4 octets may carry
/// leading zeros (read as decimal), and IPv4-mapped IPv6 addresses are IPv4.
pub fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    let ip = match text.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => {
            let parts: Vec<&str> = text.split('.').collect();
            if parts.len() != 4 {
                return None;
            }
            let mut octets = [0u8; 4];
            for (octet, part) in octets.iter_mut().zip(&parts) {
                if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                *octet = part.parse().ok()?;
            }
            IpAddr::V4(Ipv4Addr::from(octets))
        }
    };
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    })
}

#[cfg(test)]
mod tests {
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
        let terminating =
            "[{addresses: [198.18.0.1], conditions: {ready: false, terminating: true}}]";
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
    fn duplicate_endpoint_keeps_the_first_when_both_are_running() {
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
            "clusterIP: 127.0.0.10, clusterIPs: [127.0.0.10, \"fd00::10\"],",
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

    #[test]
    fn sloppy_parse_accepts_leading_zeros_and_unmaps_ipv4() {
        assert_eq!(
            parse_ip_sloppy("198.018.000.005"),
            Some("198.18.0.5".parse().unwrap())
        );
        assert_eq!(
            parse_ip_sloppy("::ffff:198.18.0.5"),
            Some("198.18.0.5".parse().unwrap())
        );
        assert_eq!(
            parse_ip_sloppy("2001:db8::1"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(parse_ip_sloppy("198.18.0"), None);
        assert_eq!(parse_ip_sloppy("web"), None);
    }
}
