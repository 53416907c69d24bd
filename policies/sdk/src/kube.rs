//! kube-proxy's endpoint rules, reusable by any policy: categorize endpoints by readiness,
//! topology and locality, and turn the result into per-scope eligibility.
//!
//! This mirrors `CategorizeEndpoints` in kube-proxy's `pkg/proxy/topology.go` and the
//! reject/drop rules of its iptables and nftables proxiers.

use crate::types::{Eligibility, EmptyAction, Endpoint, EndpointId, EndpointSet, Node, Service};

/// Which topology filter kube-proxy applies to the Cluster endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyMode {
    /// No filtering: every ready endpoint.
    None,
    /// Only endpoints hinted for this node's zone.
    PreferSameZone,
    /// Only endpoints hinted for this node.
    PreferSameNode,
}

/// The endpoints of one service port sorted into kube-proxy's categories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Categorized {
    /// Endpoints for Cluster traffic policy: ready ones (topology-filtered), or, when no
    /// endpoint is ready, the serving-and-terminating ones. Empty when the service never
    /// uses Cluster policy.
    pub cluster: Vec<EndpointId>,
    /// Endpoints for Local traffic policy: local ready ones, or local serving-and-terminating
    /// ones when none is ready. Topology never applies. Empty when the service never uses
    /// Local policy.
    pub local: Vec<EndpointId>,
    /// The union of `cluster` and `local`: every endpoint this node may send to.
    pub all_reachable: Vec<EndpointId>,
    /// Some endpoint anywhere in the cluster is usable (true even when this node has none).
    pub has_any: bool,
    pub topology: TopologyMode,
}

/// kube-proxy's `CategorizeEndpoints` for one service port on `node`.
pub fn categorize(service: &Service, node: &Node, endpoints: &[Endpoint]) -> Categorized {
    let mut out = Categorized {
        cluster: Vec::new(),
        local: Vec::new(),
        all_reachable: Vec::new(),
        has_any: false,
        topology: TopologyMode::None,
    };
    if endpoints.is_empty() {
        return out;
    }
    let ids = |keep: &dyn Fn(&Endpoint) -> bool| -> Vec<EndpointId> {
        endpoints.iter().filter(|e| keep(e)).map(|e| e.id).collect()
    };

    let zone = node.zone();
    if service.uses_cluster_endpoints() {
        out.topology = topology_mode(endpoints, &node.name, zone);
        out.cluster =
            ids(&|e| e.ready && available_for_topology(e, out.topology, &node.name, zone));
        if out.cluster.is_empty() {
            // No ready endpoint anywhere (topology was already ignored had there been one).
            out.cluster = ids(&|e| e.serving_terminating());
        }
        out.has_any = !out.cluster.is_empty();
    }

    if !service.uses_local_endpoints() {
        out.all_reachable = out.cluster.clone();
        return out;
    }

    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for e in endpoints {
        if e.ready {
            out.has_any = true;
            local_ready |= e.is_local;
        } else if e.serving_terminating() {
            out.has_any = true;
            local_serving_terminating |= e.is_local;
        }
    }
    let local_uses_terminating = !local_ready && local_serving_terminating;
    if local_ready {
        out.local = ids(&|e| e.is_local && e.ready);
    } else if local_serving_terminating {
        out.local = ids(&|e| e.is_local && e.serving_terminating());
    }

    if !service.uses_cluster_endpoints() {
        out.all_reachable = out.local.clone();
    } else if out.topology == TopologyMode::None && !local_uses_terminating {
        // Every ready endpoint is in `cluster`, so it already holds every local one.
        out.all_reachable = out.cluster.clone();
    } else {
        let mut all = out.cluster.clone();
        all.extend(out.local.iter().copied());
        all.sort_unstable();
        all.dedup();
        out.all_reachable = all;
    }
    out
}

/// kube-proxy's `topologyModeFromHints`: only ready endpoints are examined, and a single
/// ready endpoint without hints disables that level.
pub fn topology_mode(endpoints: &[Endpoint], node_name: &str, zone: &str) -> TopologyMode {
    let mut any_ready = false;
    let (mut all_node_hints, mut hinted_for_node) = (true, false);
    let (mut all_zone_hints, mut hinted_for_zone) = (true, false);
    for e in endpoints.iter().filter(|e| e.ready) {
        any_ready = true;
        if e.node_hints.is_empty() {
            all_node_hints = false;
        } else if e.node_hints.iter().any(|h| h == node_name) {
            hinted_for_node = true;
        }
        if e.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if e.zone_hints.iter().any(|h| h == zone) {
            hinted_for_zone = true;
        }
    }
    if !any_ready {
        TopologyMode::None
    } else if all_node_hints && hinted_for_node {
        TopologyMode::PreferSameNode
    } else if all_zone_hints && hinted_for_zone {
        TopologyMode::PreferSameZone
    } else {
        TopologyMode::None
    }
}

fn available_for_topology(e: &Endpoint, mode: TopologyMode, node_name: &str, zone: &str) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => e.node_hints.iter().any(|h| h == node_name),
        TopologyMode::PreferSameZone => e.zone_hints.iter().any(|h| h == zone),
    }
}

/// kube-proxy's traffic handling for categorized endpoints.
///
/// Internal traffic uses the Local set under `internalTrafficPolicy: Local`, else the
/// Cluster set; external traffic uses the Local set under `externalTrafficPolicy: Local`,
/// else the Cluster set. An empty set rejects when the service has no usable endpoint
/// anywhere, and drops when only the Local policy came up empty.
pub fn eligibility(service: &Service, categorized: &Categorized) -> Eligibility {
    let scope = |local_policy: bool| {
        let endpoints = if local_policy {
            categorized.local.clone()
        } else {
            categorized.cluster.clone()
        };
        let when_empty = if categorized.has_any && local_policy {
            EmptyAction::Drop
        } else {
            EmptyAction::Reject
        };
        EndpointSet {
            endpoints,
            when_empty,
        }
    };
    let mut eligibility = Eligibility {
        internal: scope(service.internal_traffic_local),
        external: scope(service.external_traffic_local),
    };
    eligibility.normalize();
    eligibility
}

/// What kube-proxy would program for this service port on `node`.
pub fn kube_proxy_eligibility(
    service: &Service,
    node: &Node,
    endpoints: &[Endpoint],
) -> Eligibility {
    eligibility(service, &categorize(service, node, endpoints))
}

#[cfg(test)]
mod tests;
