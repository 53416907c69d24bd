//! Services, EndpointSlices and the Node turned into per-ServicePort snapshots, per IP
//! family, exactly as kube-proxy builds its ServicePort and Endpoints maps
//! (`pkg/proxy/serviceport.go`, `endpointslicecache.go`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use weir_sdk::{Endpoint, IpFamily, Node, Protocol};

use crate::net::{Cidr, parse_ip_sloppy};
use crate::objects::{Diagnostic, Objects, Sourced};
use crate::policy::{DEFAULT_POLICY, FailureMode, ServiceInput};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Selects the policy for a Service (a module name from the policies directory).
pub const POLICY_ANNOTATION: &str = "weir.dev/policy";
/// Per-service configuration handed to the policy.
pub const POLICY_CONFIG_ANNOTATION: &str = "weir.dev/policy-config";
/// `open` or `closed`: what the Service gets when its policy fails.
pub const FAILURE_MODE_ANNOTATION: &str = "weir.dev/failure-mode";
/// Each port's memory budget for its policy, in MiB (within `limits.max_memory_mib`).
pub const MEMORY_ANNOTATION: &str = "weir.dev/policy-memory-mib";
/// `spec.sessionAffinityConfig.clientIP.timeoutSeconds` when unset (the API default).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// The largest timeout the API server accepts.
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;

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

impl ServicePortSnapshot {
    /// What the port's policy is told: the Service, the node, and `endpoints` (this
    /// snapshot's, with the ids the caller assigned).
    pub fn input(&self, node: Arc<Node>, endpoints: Vec<Endpoint>) -> ServiceInput {
        ServiceInput {
            service: self.service.clone(),
            node,
            endpoints,
            failure_mode: self.failure_mode,
            memory_mib: self.memory_mib,
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
    /// Whether `policy` comes from the annotation (otherwise it is the default, which
    /// `policies.default` may change).
    pub policy_annotated: bool,
    /// The `weir.dev/policy-memory-mib` annotation: the port's memory budget.
    pub memory_mib: Option<u32>,
    pub failure_mode: FailureMode,
    /// Whether `failure_mode` comes from the Service's annotation (otherwise it is the
    /// default, which weir.toml may change).
    pub failure_mode_annotated: bool,
    /// The Service's health check server, when kube-proxy would run one for it (type
    /// LoadBalancer with externalTrafficPolicy Local and a healthCheckNodePort).
    pub health_check: Option<HealthCheck>,
    /// `spec.loadBalancerSourceRanges` of this family: when set, only these sources may
    /// reach the port through its LoadBalancer IPs (not its nodePort). Enforced by the
    /// data plane, not by policies.
    pub load_balancer_source_ranges: Vec<Cidr>,
}

/// A Service's healthCheckNodePort and what it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    /// kube-proxy's `LocalReadyEndpoints`: distinct IPs of ready endpoints on this node
    /// over every port of the Service's slices of this family. 0 means the node answers 503.
    pub local_endpoints: usize,
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
    let endpoints = endpoints_map(&slices, node_name);
    let local_ready = local_ready_endpoints(&endpoints);
    let mut ports = BTreeMap::new();
    for service in latest_by_name(&objects.services, "Service", &mut diagnostics) {
        for mut snapshot in service_ports(service, &mut diagnostics) {
            let key = &snapshot.key;
            let endpoints_key = (
                key.namespace.clone(),
                key.name.clone(),
                key.port_name.clone(),
                key.protocol,
                key.family,
            );
            snapshot.endpoints = endpoints.get(&endpoints_key).cloned().unwrap_or_default();
            if let Some(check) = snapshot.health_check.as_mut() {
                check.local_endpoints = local_ready
                    .get(&(key.namespace.clone(), key.name.clone(), key.family))
                    .copied()
                    .unwrap_or(0);
            }
            ports.insert(snapshot.key.clone(), snapshot);
        }
    }
    Model {
        node,
        ports: ports.into_values().collect(),
        diagnostics,
    }
}

/// The last object of each namespace/name, as the API server would hold it after every
/// file was applied in order; an earlier one with the same name gets a warning.
fn latest_by_name<'a, T: HasName>(
    objects: &'a [Sourced<T>],
    kind: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<&'a Sourced<T>> {
    let mut latest: BTreeMap<(String, String), &'a Sourced<T>> = BTreeMap::new();
    for object in objects {
        let key = object.object.namespaced_name();
        if let Some(earlier) = latest.insert(key.clone(), object) {
            diagnostics.push(Diagnostic::warning(
                &earlier.origin,
                Some(format!("{kind} {}/{}", key.0, key.1)),
                format!(
                    "is defined again in {}; the later definition is used, as `kubectl apply` would leave it",
                    object.origin
                ),
            ));
        }
    }
    latest.into_values().collect()
}

trait HasName {
    fn namespaced_name(&self) -> (String, String);
}

impl HasName for Service {
    fn namespaced_name(&self) -> (String, String) {
        namespaced_name(&self.metadata)
    }
}

impl HasName for EndpointSlice {
    fn namespaced_name(&self) -> (String, String) {
        namespaced_name(&self.metadata)
    }
}

/// An object's namespace (`default` when it has none, as kubectl assumes) and name.
pub fn namespaced_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A Service by namespace and name.
pub type ServiceKey = (String, String);

/// The Services whose ports depend on `objects`: each Service, and each EndpointSlice's
/// Service. `None` when a Node is among them: a Node's labels reach every port.
pub fn services_of(objects: &Objects) -> Option<BTreeSet<ServiceKey>> {
    if !objects.nodes.is_empty() {
        return None;
    }
    let mut keys: BTreeSet<ServiceKey> = objects
        .services
        .iter()
        .map(|s| s.object.namespaced_name())
        .collect();
    keys.extend(objects.endpoint_slices.iter().filter_map(slice_service));
    Some(keys)
}

/// The Service an EndpointSlice belongs to, by its `kubernetes.io/service-name` label.
pub fn slice_service(slice: &Sourced<EndpointSlice>) -> Option<ServiceKey> {
    let (namespace, _) = slice.object.namespaced_name();
    let name = slice
        .object
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)?;
    Some((namespace, name.clone()))
}

/// The objects the ports of `services` are built from: those Services, their slices,
/// and every Node.
pub fn objects_for(objects: &Objects, services: &BTreeSet<ServiceKey>) -> Objects {
    Objects {
        services: objects
            .services
            .iter()
            .filter(|s| services.contains(&s.object.namespaced_name()))
            .cloned()
            .collect(),
        endpoint_slices: objects
            .endpoint_slices
            .iter()
            .filter(|s| slice_service(s).is_some_and(|k| services.contains(&k)))
            .cloned()
            .collect(),
        nodes: objects.nodes.clone(),
    }
}

/// kube-proxy's node eligibility for `/healthz`: a Node being deleted, or tainted
/// `ToBeDeletedByClusterAutoscaler`, is not eligible. Eligible while the Node is unknown.
pub fn node_eligible(objects: &Objects, node_name: &str) -> bool {
    let Some(node) = objects
        .nodes
        .iter()
        .rev()
        .find(|n| n.object.metadata.name.as_deref() == Some(node_name))
    else {
        return true;
    };
    let tainted = node
        .object
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"));
    node.object.metadata.deletion_timestamp.is_none() && !tainted
}

fn find_node<'a>(
    objects: &'a Objects,
    node_name: &str,
) -> Option<&'a k8s_openapi::api::core::v1::Node> {
    objects
        .nodes
        .iter()
        .rev()
        .map(|n| &*n.object)
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
}

/// Where NodePorts listen when the config does not say: per address family, the Node's
/// InternalIP addresses, or its ExternalIP addresses when it has no InternalIP of that
/// family (as kube-proxy picks node IPs). An ExternalIP is often NAT'd and not on the
/// node at all.
pub fn node_addresses(objects: &Objects, node_name: &str) -> Vec<IpAddr> {
    let status = find_node(objects, node_name).and_then(|n| n.status.as_ref());
    let listed = status.and_then(|s| s.addresses.as_ref());
    let of_type = |type_: &str| -> Vec<IpAddr> {
        listed
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == type_)
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .collect()
    };
    let (internal, external) = (of_type("InternalIP"), of_type("ExternalIP"));
    let mut addresses = Vec::new();
    for v4 in [true, false] {
        let family = |ips: &Vec<IpAddr>| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(|ip| ip.is_ipv4() == v4)
                .collect()
        };
        let chosen = match family(&internal) {
            ips if ips.is_empty() => family(&external),
            ips => ips,
        };
        for ip in chosen {
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
    }
    addresses
}

/// The Node's pod ranges (`spec.podCIDRs`): traffic from them is this node's pods.
pub fn node_pod_cidrs(objects: &Objects, node_name: &str) -> Vec<Cidr> {
    let spec = find_node(objects, node_name).and_then(|n| n.spec.as_ref());
    let mut cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec.and_then(|s| s.pod_cidr.clone()));
    }
    cidrs.iter().filter_map(|c| Cidr::parse_range(c)).collect()
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

/// Slices by (namespace, Service name), each list in slice-name order.
type SliceMap<'a> = BTreeMap<(String, String), Vec<&'a Sourced<EndpointSlice>>>;

fn group_slices<'a>(objects: &'a Objects, diagnostics: &mut Vec<Diagnostic>) -> SliceMap<'a> {
    let mut slices: SliceMap<'a> = BTreeMap::new();
    for slice in latest_by_name(&objects.endpoint_slices, "EndpointSlice", diagnostics) {
        let (namespace, name) = slice.object.namespaced_name();
        let service = slice
            .object
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|s| !s.is_empty());
        let Some(service) = service else {
            diagnostics.push(Diagnostic::warning(
                &slice.origin,
                Some(format!("EndpointSlice {namespace}/{name}")),
                format!(
                    "has no `{SERVICE_NAME_LABEL}` label, so it belongs to no Service and is ignored (as kube-proxy does); add `metadata.labels.{SERVICE_NAME_LABEL}: <service name>`"
                ),
            ));
            continue;
        };
        slices
            .entry((namespace, service.clone()))
            .or_default()
            .push(slice);
    }
    slices
}

/// kube-proxy's EndpointsMap key: Service, port name, protocol, and IP family.
type EndpointsKey = (String, String, String, ProtocolKey, FamilyKey);

/// kube-proxy's EndpointsMap from the slices: for every slice port (its name, protocol
/// and number), the first address of every endpoint, duplicates collapsed across all the
/// Service's slices (a later non-terminating copy replaces an earlier one), sorted by
/// `ip:port` string. Built from the slices alone, as kube-proxy does, so it also holds
/// ports the Service does not (yet) have.
fn endpoints_map(slices: &SliceMap<'_>, node_name: &str) -> HashMap<EndpointsKey, Vec<Endpoint>> {
    let mut merged: HashMap<EndpointsKey, HashMap<String, Endpoint>> = HashMap::new();
    for ((namespace, service), list) in slices {
        for slice in list {
            let slice = &slice.object;
            let family = match slice.address_type.as_str() {
                "IPv4" => FamilyKey::V4,
                "IPv6" => FamilyKey::V6,
                _ => continue, // FQDN slices are not proxied
            };
            for port in slice.ports.iter().flatten() {
                let Some(number) = port
                    .port
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                else {
                    continue;
                };
                let Some(protocol) = ProtocolKey::parse(port.protocol.as_deref()) else {
                    continue;
                };
                // The API server defaults a missing name to "" (and protocol to TCP), so
                // hand-written files behave as they would once applied.
                let port_name = port.name.clone().unwrap_or_default();
                let key = (
                    namespace.clone(),
                    service.clone(),
                    port_name,
                    protocol,
                    family,
                );
                let endpoints = merged.entry(key).or_default();
                for endpoint in &slice.endpoints {
                    if let Some(candidate) = endpoint_of(endpoint, number, family, node_name) {
                        let text = candidate.address.to_string();
                        if !endpoints.contains_key(&text) || !candidate.terminating {
                            endpoints.insert(text, candidate);
                        }
                    }
                }
            }
        }
    }
    merged
        .into_iter()
        .map(|(key, endpoints)| {
            let mut sorted: Vec<(String, Endpoint)> = endpoints.into_iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            (key, sorted.into_iter().map(|(_, e)| e).collect())
        })
        .collect()
}

/// One slice endpoint as kube-proxy sees it, or `None` when it has no usable first
/// address (none, unparseable, or of the other family: kube-proxy would program a
/// broken rule for those; weir leaves them out).
fn endpoint_of(
    endpoint: &k8s_openapi::api::discovery::v1::Endpoint,
    port: u16,
    family: FamilyKey,
    node_name: &str,
) -> Option<Endpoint> {
    let ip = parse_ip_sloppy(endpoint.addresses.first()?)?;
    if FamilyKey::of(ip) != family {
        return None;
    }
    let conditions = endpoint.conditions.as_ref();
    let hints = endpoint.hints.as_ref();
    Some(Endpoint {
        id: 0,
        address: SocketAddr::new(ip, port),
        ready: conditions.and_then(|c| c.ready).unwrap_or(true),
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        node_name: endpoint.node_name.clone(),
        zone: endpoint.zone.clone(),
        is_local: !node_name.is_empty() && endpoint.node_name.as_deref() == Some(node_name),
        zone_hints: hints
            .and_then(|h| h.for_zones.as_ref())
            .map(|z| z.iter().map(|z| z.name.clone()).collect())
            .unwrap_or_default(),
        node_hints: hints
            .and_then(|h| h.for_nodes.as_ref())
            .map(|n| n.iter().map(|n| n.name.clone()).collect())
            .unwrap_or_default(),
    })
}

/// kube-proxy's `LocalReadyEndpoints`: per Service and family, the number of distinct IPs
/// of ready endpoints on this node, over every port.
fn local_ready_endpoints(
    endpoints: &HashMap<EndpointsKey, Vec<Endpoint>>,
) -> HashMap<(String, String, FamilyKey), usize> {
    let mut ips: HashMap<(String, String, FamilyKey), BTreeSet<IpAddr>> = HashMap::new();
    for ((namespace, service, _, _, family), list) in endpoints {
        let set = ips
            .entry((namespace.clone(), service.clone(), *family))
            .or_default();
        set.extend(
            list.iter()
                .filter(|e| e.ready && e.is_local)
                .map(|e| e.address.ip()),
        );
    }
    ips.into_iter().map(|(key, set)| (key, set.len())).collect()
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
    // kube-proxy's ShouldSkipService looks at the singular field only.
    match spec.cluster_ip.as_deref() {
        Some("None") => return Vec::new(), // headless: DNS only
        None | Some("") => {
            warn(
                diagnostics,
                "has no clusterIP, so kube-proxy treats it as headless and skips it; set spec.clusterIP (a 127.0.0.0/8 address works on a laptop)".into(),
            );
            return Vec::new();
        }
        Some(_) => {}
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
    let failure_mode_annotated = annotations.contains_key(FAILURE_MODE_ANNOTATION);
    let policy_annotated = annotations
        .get(POLICY_ANNOTATION)
        .is_some_and(|p| !p.trim().is_empty());
    let memory_mib = match annotations.get(MEMORY_ANNOTATION).map(|s| s.trim()) {
        None => None,
        Some(text) => match text.parse::<u32>() {
            Ok(mib) if mib > 0 => Some(mib),
            _ => {
                warn(
                    diagnostics,
                    format!(
                        "annotation {MEMORY_ANNOTATION}: `{text}` is not a whole number of MiB above 0; using the policy's budget"
                    ),
                );
                None
            }
        },
    };
    let config = annotations.get(POLICY_CONFIG_ANNOTATION).cloned();

    let externally_accessible_type = service_type == "LoadBalancer"
        || service_type == "NodePort"
        || (service_type == "ClusterIP"
            && !spec.external_ips.as_deref().unwrap_or_default().is_empty());
    let external_traffic_local =
        externally_accessible_type && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_traffic_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let session_affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP"))
        .then(|| {
            let configured = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match configured {
                None => DEFAULT_AFFINITY_TIMEOUT_SECONDS,
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_SECONDS as i32).contains(&t) => t as u32,
                Some(t) => {
                    warn(
                        diagnostics,
                        format!(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside 1..={MAX_AFFINITY_TIMEOUT_SECONDS} (the API server would refuse it); using {DEFAULT_AFFINITY_TIMEOUT_SECONDS}"
                        ),
                    );
                    DEFAULT_AFFINITY_TIMEOUT_SECONDS
                }
            }
        });
    let health_check = if service_type == "LoadBalancer" && external_traffic_local {
        match spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        {
            Some(node_port) => Some(HealthCheck {
                node_port,
                local_endpoints: 0,
            }),
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

    // kube-proxy's GetClusterIPByFamily: `ipFamilies[i]` pairs with `clusterIPs[i]`; a
    // Service without `ipFamilies` (never so once stored by an API server) has only
    // `clusterIP`, in its own family.
    let mut by_family: BTreeMap<FamilyKey, IpAddr> = BTreeMap::new();
    let families = spec.ip_families.clone().unwrap_or_default();
    let cluster_ips = spec.cluster_ips.clone().unwrap_or_default();
    let candidates: Vec<(String, &str)> = if families.is_empty() {
        if cluster_ips.len() > 1 {
            warn(
                diagnostics,
                "lists several spec.clusterIPs but no spec.ipFamilies, so kube-proxy uses spec.clusterIP only; add spec.ipFamilies (e.g. [IPv4, IPv6]) to proxy every family".into(),
            );
        }
        vec![(
            "spec.clusterIP".to_string(),
            spec.cluster_ip.as_deref().unwrap_or(""),
        )]
    } else {
        if cluster_ips.len() < families.len() {
            warn(
                diagnostics,
                format!(
                    "spec.ipFamilies lists {} families but spec.clusterIPs has {} addresses, so kube-proxy proxies only the families with one; set spec.clusterIPs to match",
                    families.len(),
                    cluster_ips.len()
                ),
            );
        }
        families
            .iter()
            .enumerate()
            .filter_map(|(i, _)| {
                cluster_ips
                    .get(i)
                    .map(|ip| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            })
            .collect()
    };
    for (index, (field, text)) in candidates.iter().enumerate() {
        match parse_ip_sloppy(text) {
            Some(ip) => {
                let family = FamilyKey::of(ip);
                let declared = families.get(index).map(String::as_str);
                if declared.is_some_and(|d| d != family.as_str()) {
                    warn(
                        diagnostics,
                        format!(
                            "{field} `{text}` is not of spec.ipFamilies[{index}] `{}`; ignored",
                            declared.unwrap_or("")
                        ),
                    );
                    continue;
                }
                by_family.entry(family).or_insert(ip);
            }
            None => warn(
                diagnostics,
                format!("{field} `{text}` is not an IP address; ignored"),
            ),
        }
    }
    let family_ips =
        |texts: &[String], field: &str, family: FamilyKey, diagnostics: &mut Vec<Diagnostic>| {
            let mut out = Vec::new();
            for text in texts {
                match parse_ip_sloppy(text) {
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

    let source_ranges = spec.load_balancer_source_ranges.clone().unwrap_or_default();

    let mut out = Vec::new();
    for (&family, &cluster_ip) in &by_family {
        let external = family_ips(&external_ips, "spec.externalIPs", family, diagnostics);
        let mut ranges = Vec::new();
        for text in &source_ranges {
            match Cidr::parse_range(text.trim()) {
                Some(range) if FamilyKey::of(range.address) == family => ranges.push(range),
                Some(_) => {}
                None => warn(
                    diagnostics,
                    format!("spec.loadBalancerSourceRanges `{text}` is not a CIDR; ignored"),
                ),
            }
        }
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
                policy_annotated,
                memory_mib,
                failure_mode,
                failure_mode_annotated,
                health_check,
                load_balancer_source_ranges: ranges.clone(),
            });
        }
    }
    out
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
}
