//! The values a policy sees: plain Rust mirrors of the WIT `types` interface.

use std::net::{IpAddr, SocketAddr};

/// Names one service port in one IP family; chosen by the host, stable across updates.
pub type ServiceHandle = u32;

/// Names one endpoint of a service port; chosen by the host, stable while the endpoint stays.
pub type EndpointId = u32;

/// The label kube-proxy reads a node's zone from.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

/// Where a connection arrived: the clusterIP (`Internal`), or a nodePort, externalIP or
/// LoadBalancer ingress IP (`External`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Internal,
    External,
}

/// One Service port as kube-proxy sees it, in one IP family.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// The ServicePort's `name` ("" for a single unnamed port).
    pub port_name: String,
    pub protocol: Protocol,
    pub ip_family: IpFamily,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// 0 when the port has no nodePort.
    pub node_port: u16,
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs of this family with `ipMode: VIP`.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `internalTrafficPolicy: Local`.
    pub internal_traffic_local: bool,
    /// `externalTrafficPolicy: Local` on a Service externally accessible by its type.
    pub external_traffic_local: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None` without affinity.
    pub session_affinity_timeout: Option<u32>,
    /// The `weir.dev/policy-config` annotation.
    pub config: Option<String>,
}

impl Service {
    /// A TCP ClusterIP service port named "http" with no traffic policies, affinity or
    /// config: a starting point for tests.
    pub fn cluster_ip(namespace: &str, name: &str, cluster_ip: IpAddr, port: u16) -> Self {
        Service {
            namespace: namespace.to_string(),
            name: name.to_string(),
            port_name: "http".to_string(),
            protocol: Protocol::Tcp,
            ip_family: IpFamily::of(cluster_ip),
            cluster_ip,
            port,
            node_port: 0,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            internal_traffic_local: false,
            external_traffic_local: false,
            session_affinity_timeout: None,
            config: None,
        }
    }

    /// kube-proxy's `ServicePort.ExternallyAccessible`: the port can be reached from outside
    /// the cluster network (nodePort, LoadBalancer VIPs or externalIPs).
    pub fn externally_accessible(&self) -> bool {
        self.node_port != 0 || !self.load_balancer_ips.is_empty() || !self.external_ips.is_empty()
    }

    /// kube-proxy's `UsesClusterEndpoints`: some traffic to this port uses the Cluster
    /// policy (eTP=Local also needs it, for traffic from the node itself).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_traffic_local || self.externally_accessible()
    }

    /// kube-proxy's `UsesLocalEndpoints`: some traffic to this port uses the Local policy.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_traffic_local || (self.external_traffic_local && self.externally_accessible())
    }

    /// `namespace/name:port-name`, for log lines.
    pub fn display_name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

/// The node the host runs on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl Node {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The `topology.kubernetes.io/zone` label, or "" as kube-proxy reads a missing one.
    pub fn zone(&self) -> &str {
        self.label(ZONE_LABEL).unwrap_or("")
    }
}

/// One endpoint of a service port after kube-proxy's EndpointSlice merge.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub id: EndpointId,
    pub address: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `node_name` is this node.
    pub is_local: bool,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

impl Endpoint {
    /// A ready endpoint on no particular node, for tests and examples.
    pub fn ready(id: EndpointId, address: SocketAddr) -> Self {
        Endpoint {
            id,
            address,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone: None,
            is_local: false,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }

    pub fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// What happens to traffic for a scope whose eligible set is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EmptyAction {
    /// Refuse at once ("connection refused"): no usable endpoints anywhere.
    Reject,
    /// Answer nothing: a Local policy has no endpoint on this node.
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSet {
    pub endpoints: Vec<EndpointId>,
    pub when_empty: EmptyAction,
}

impl EndpointSet {
    pub fn empty(when_empty: EmptyAction) -> Self {
        EndpointSet {
            endpoints: Vec::new(),
            when_empty,
        }
    }

    /// The decision for traffic when this set is empty.
    pub fn empty_decision(&self) -> Decision {
        match self.when_empty {
            EmptyAction::Reject => Decision::Reject,
            EmptyAction::Drop => Decision::Drop,
        }
    }
}

/// The endpoints that may serve each traffic scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eligibility {
    pub internal: EndpointSet,
    pub external: EndpointSet,
}

impl Eligibility {
    /// Nothing eligible: every connection is rejected.
    pub fn reject_all() -> Self {
        Eligibility {
            internal: EndpointSet::empty(EmptyAction::Reject),
            external: EndpointSet::empty(EmptyAction::Reject),
        }
    }

    pub fn for_scope(&self, scope: Scope) -> &EndpointSet {
        match scope {
            Scope::Internal => &self.internal,
            Scope::External => &self.external,
        }
    }

    /// Sorts and de-duplicates both sets, so they can be compared and searched.
    pub fn normalize(&mut self) {
        for set in [&mut self.internal, &mut self.external] {
            set.endpoints.sort_unstable();
            set.endpoints.dedup();
        }
    }
}

/// One new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    pub client: SocketAddr,
    pub destination: SocketAddr,
    pub scope: Scope,
}

/// The answer for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    Forward(EndpointId),
    Reject,
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    Connected,
    ConnectFailed,
    Closed,
}

/// What happened to a connection the policy forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub endpoint: EndpointId,
    pub kind: OutcomeKind,
    /// Connect time for `Connected`/`ConnectFailed`, lifetime for `Closed`.
    pub micros: u64,
}

/// What a policy asks of the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Have the host call `observe` for every forwarded connection.
    pub observe_outcomes: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}
