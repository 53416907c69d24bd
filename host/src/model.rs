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
/// How long a UDP flow of the Service's ports may be idle before it ends (a duration
/// such as `10s`); `proxy.udp_timeout` otherwise.
pub const UDP_TIMEOUT_ANNOTATION: &str = "weir.dev/udp-timeout";
/// How long a TCP connection of the Service may be idle (a duration such as `15m`);
/// `proxy.idle_timeout` otherwise.
pub const IDLE_TIMEOUT_ANNOTATION: &str = "weir.dev/idle-timeout";
/// `v1` or `v2`: connections to the Service's endpoints begin with a PROXY protocol
/// header carrying the client's address and port.
pub const PROXY_PROTOCOL_ANNOTATION: &str = "weir.dev/proxy-protocol";
/// `"true"`: the load balancer in front sends a PROXY protocol header on each connection
/// to the Service's nodePort and LoadBalancer IPs (also implied by an ingress with
/// `ipMode: Proxy`); weir reads it and takes its client as the connection's.
pub const ACCEPT_PROXY_PROTOCOL_ANNOTATION: &str = "weir.dev/accept-proxy-protocol";
/// `http`: the Service's TCP ports without an `appProtocol` are HTTP (each request is
/// decided on its own).
pub const PROTOCOL_ANNOTATION: &str = "weir.dev/protocol";
/// `"true"`: HTTP requests to the Service's endpoints carry the client's address in
/// `X-Forwarded-For` (appended to what the client sent).
pub const FORWARDED_FOR_ANNOTATION: &str = "weir.dev/x-forwarded-for";

pub use crate::proxy::http::HttpKind;
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
    /// The `weir.dev/udp-timeout` annotation: how long a UDP flow may be idle.
    pub udp_timeout: Option<std::time::Duration>,
    /// The `weir.dev/idle-timeout` annotation: how long a TCP connection may be idle.
    pub idle_timeout: Option<std::time::Duration>,
    /// `weir.dev/proxy-protocol`: the header written towards its endpoints.
    pub proxy_protocol: Option<crate::proxy::proxy_protocol::Version>,
    /// Whether connections to its nodePort and LoadBalancer IPs begin with a PROXY
    /// protocol header from the load balancer in front.
    pub accept_proxy_protocol: bool,
    /// An HTTP port (its `appProtocol`, or `weir.dev/protocol`): weir terminates HTTP and
    /// decides each request. None: L4.
    pub http: Option<HttpKind>,
    /// `weir.dev/x-forwarded-for`: requests to endpoints carry the client's address.
    pub forwarded_for: bool,
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

mod endpoints;
mod node;
mod service;

use endpoints::{endpoints_map, group_slices, local_ready_endpoints};
use node::node_of;
pub use node::{node_addresses, node_eligible, node_pod_cidrs};
use service::service_ports;

#[cfg(test)]
mod tests;
