//! Tests of `kube.rs`.

//! A table of `CategorizeEndpoints` and reject/drop cases, written from kube-proxy's
//! `pkg/proxy/topology.go` and its proxiers' traffic handling. Unless a case says
//! otherwise, this node is `node-a` in `zone-a`, "remote" endpoints live on `node-b`,
//! and hints are given for both levels as the EndpointSlice controller would.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::*;
use crate::types::{IpFamily, Protocol, ZONE_LABEL};
use EmptyAction::{Drop, Reject};
use TopologyMode::{PreferSameNode, PreferSameZone};

const NODE: &str = "node-a";
const ZONE: &str = "zone-a";
/// `TopologyMode::None`, named so it cannot be confused with `Option::None`.
const NO_TOPOLOGY: TopologyMode = TopologyMode::None;

/// The service flags a case varies; everything else is a plain ClusterIP port.
#[derive(Clone, Copy, Debug, Default)]
struct Svc {
    itp_local: bool,
    etp_local: bool,
    node_port: bool,
    external_ip: bool,
    lb_ip: bool,
}

/// A ClusterIP-only service with both traffic policies Cluster.
fn svc() -> Svc {
    Svc::default()
}

impl Svc {
    fn itp_local(self) -> Self {
        Svc {
            itp_local: true,
            ..self
        }
    }
    fn etp_local(self) -> Self {
        Svc {
            etp_local: true,
            ..self
        }
    }
    fn node_port(self) -> Self {
        Svc {
            node_port: true,
            ..self
        }
    }
    fn external_ip(self) -> Self {
        Svc {
            external_ip: true,
            ..self
        }
    }
    fn lb_ip(self) -> Self {
        Svc {
            lb_ip: true,
            ..self
        }
    }

    fn build(self) -> Service {
        Service {
            namespace: "default".into(),
            name: "web".into(),
            port_name: String::new(),
            protocol: Protocol::Tcp,
            ip_family: IpFamily::V4,
            cluster_ip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            port: 80,
            node_port: if self.node_port { 30080 } else { 0 },
            external_ips: if self.external_ip {
                vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))]
            } else {
                Vec::new()
            },
            load_balancer_ips: if self.lb_ip {
                vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10))]
            } else {
                Vec::new()
            },
            internal_traffic_local: self.itp_local,
            external_traffic_local: self.etp_local,
            session_affinity_timeout: None,
            config: None,
        }
    }
}

fn node(zone: Option<&str>) -> Node {
    Node {
        name: NODE.into(),
        labels: zone
            .map(|z| vec![(ZONE_LABEL.to_string(), z.to_string())])
            .unwrap_or_default(),
    }
}

/// An endpoint on `node-b` with the given conditions and no hints.
fn endpoint(id: EndpointId, ready: bool, serving: bool, terminating: bool) -> Endpoint {
    let address = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 244, 0, id as u8)), 8080);
    Endpoint {
        ready,
        serving,
        terminating,
        node_name: Some("node-b".into()),
        ..Endpoint::ready(id, address)
    }
}

/// Ready (hence serving), not terminating.
fn ready(id: EndpointId) -> Endpoint {
    endpoint(id, true, true, false)
}

/// Failing its readiness probe: neither ready nor serving.
fn not_ready(id: EndpointId) -> Endpoint {
    endpoint(id, false, false, false)
}

/// Terminating but still passing its readiness probe.
fn serving_terminating(id: EndpointId) -> Endpoint {
    endpoint(id, false, true, true)
}

/// Terminating and no longer passing its readiness probe.
fn terminating_not_serving(id: EndpointId) -> Endpoint {
    endpoint(id, false, false, true)
}

/// Serving but neither ready nor terminating (not something the EndpointSlice
/// controller writes, but the conditions are independent fields).
fn serving_not_ready(id: EndpointId) -> Endpoint {
    endpoint(id, false, true, false)
}

trait EndpointExt {
    /// On this node.
    fn local(self) -> Endpoint;
    /// Terminating, keeping `ready` (a `publishNotReadyAddresses` service).
    fn terminating(self) -> Endpoint;
    fn zones(self, zones: &[&str]) -> Endpoint;
    fn nodes(self, nodes: &[&str]) -> Endpoint;
}

impl EndpointExt for Endpoint {
    fn local(self) -> Endpoint {
        Endpoint {
            node_name: Some(NODE.into()),
            is_local: true,
            ..self
        }
    }
    fn terminating(self) -> Endpoint {
        Endpoint {
            terminating: true,
            ..self
        }
    }
    fn zones(self, zones: &[&str]) -> Endpoint {
        Endpoint {
            zone_hints: zones.iter().map(|z| z.to_string()).collect(),
            ..self
        }
    }
    fn nodes(self, nodes: &[&str]) -> Endpoint {
        Endpoint {
            node_hints: nodes.iter().map(|n| n.to_string()).collect(),
            ..self
        }
    }
}

type Ids = &'static [EndpointId];

struct Case {
    /// The rule the case checks.
    name: &'static str,
    service: Svc,
    /// This node's `topology.kubernetes.io/zone` label (`None`: no label).
    zone: Option<&'static str>,
    endpoints: Vec<Endpoint>,
    topology: TopologyMode,
    cluster: Ids,
    local: Ids,
    all_reachable: Ids,
    has_any: bool,
    internal: (Ids, EmptyAction),
    external: (Ids, EmptyAction),
}

/// Everything a case asserts, sorted, so a failure shows the whole picture.
#[derive(Debug, PartialEq)]
struct Observed {
    topology: TopologyMode,
    cluster: Vec<EndpointId>,
    local: Vec<EndpointId>,
    all_reachable: Vec<EndpointId>,
    has_any: bool,
    internal: (Vec<EndpointId>, EmptyAction),
    external: (Vec<EndpointId>, EmptyAction),
}

fn sorted(ids: &[EndpointId]) -> Vec<EndpointId> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids
}

fn cases() -> Vec<Case> {
    vec![
        // ---- Step 1: no endpoints at all.
        Case {
            name: "no_endpoints_means_nothing",
            service: svc().node_port(),
            zone: Some(ZONE),
            endpoints: vec![],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[],
            all_reachable: &[],
            has_any: false,
            internal: (&[], Reject),
            external: (&[], Reject),
        },
        Case {
            name: "no_endpoints_rejects_even_under_both_local_policies",
            service: svc().itp_local().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[],
            all_reachable: &[],
            has_any: false,
            internal: (&[], Reject),
            external: (&[], Reject),
        },
        Case {
            name: "itp_local_with_no_endpoints_rejects",
            service: svc().itp_local(),
            zone: Some(ZONE),
            endpoints: vec![],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[],
            all_reachable: &[],
            has_any: false,
            internal: (&[], Reject),
            external: (&[], Reject),
        },
        // ---- Step 2: Cluster endpoints are the ready ones, else serving-terminating.
        Case {
            name: "cluster_policy_uses_every_ready_endpoint_local_or_remote",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![ready(1), ready(2).local(), ready(3)],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2, 3],
            local: &[],
            all_reachable: &[1, 2, 3],
            has_any: true,
            internal: (&[1, 2, 3], Reject),
            external: (&[1, 2, 3], Reject),
        },
        Case {
            name: "not_ready_not_serving_never_used",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![ready(1), not_ready(2), not_ready(3).local()],
            topology: NO_TOPOLOGY,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[1], Reject),
        },
        Case {
            name: "ready_endpoints_preferred_over_serving_terminating",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                serving_terminating(1),
                ready(2),
                serving_terminating(3).local(),
            ],
            topology: NO_TOPOLOGY,
            cluster: &[2],
            local: &[],
            all_reachable: &[2],
            has_any: true,
            internal: (&[2], Reject),
            external: (&[2], Reject),
        },
        Case {
            name: "cluster_terminating_fallback_when_nothing_is_ready_local_or_remote",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                serving_terminating(1),
                serving_terminating(2).local(),
                not_ready(3),
            ],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[1, 2], Reject),
        },
        Case {
            name: "terminating_but_not_serving_is_never_a_fallback",
            service: svc().node_port(),
            zone: Some(ZONE),
            endpoints: vec![terminating_not_serving(1), not_ready(2)],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[],
            all_reachable: &[],
            has_any: false,
            internal: (&[], Reject),
            external: (&[], Reject),
        },
        Case {
            name: "serving_but_not_terminating_is_not_a_fallback",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![serving_not_ready(1)],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[],
            all_reachable: &[],
            has_any: false,
            internal: (&[], Reject),
            external: (&[], Reject),
        },
        Case {
            name: "only_not_ready_endpoints_local_or_remote_rejects",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![not_ready(1), not_ready(2).local()],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[],
            all_reachable: &[],
            has_any: false,
            internal: (&[], Reject),
            external: (&[], Reject),
        },
        Case {
            name: "ready_and_terminating_counts_as_ready",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).terminating(), serving_terminating(2)],
            topology: NO_TOPOLOGY,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[1], Reject),
        },
        Case {
            name: "terminating_fallback_ignores_topology",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                serving_terminating(1).zones(&["zone-b"]),
                serving_terminating(2).zones(&["zone-a"]),
                not_ready(3).zones(&["zone-a"]),
            ],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[1, 2], Reject),
        },
        // ---- Step 3: topologyModeFromHints.
        Case {
            name: "zone_hints_keep_only_endpoints_for_this_zone",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).zones(&["zone-a"]),
                ready(2).zones(&["zone-b"]),
                ready(3).local().zones(&["zone-a"]),
            ],
            topology: PreferSameZone,
            cluster: &[1, 3],
            local: &[],
            all_reachable: &[1, 3],
            has_any: true,
            internal: (&[1, 3], Reject),
            external: (&[1, 3], Reject),
        },
        Case {
            name: "endpoint_hinted_for_several_zones_matches_any_of_them",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).zones(&["zone-b", "zone-a"]),
                ready(2).zones(&["zone-b"]),
            ],
            topology: PreferSameZone,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[1], Reject),
        },
        Case {
            name: "one_unhinted_ready_endpoint_disables_zone_hints",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).zones(&["zone-a"]),
                ready(2).zones(&["zone-b"]),
                ready(3),
            ],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2, 3],
            local: &[],
            all_reachable: &[1, 2, 3],
            has_any: true,
            internal: (&[1, 2, 3], Reject),
            external: (&[1, 2, 3], Reject),
        },
        Case {
            name: "unhinted_endpoints_that_are_not_ready_do_not_disable_zone_hints",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).zones(&["zone-a"]),
                ready(2).zones(&["zone-b"]),
                not_ready(3),
                serving_terminating(4),
            ],
            topology: PreferSameZone,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[1], Reject),
        },
        Case {
            name: "hint_for_this_zone_on_an_unready_endpoint_is_ignored",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).zones(&["zone-b"]),
                serving_terminating(2).zones(&["zone-a"]),
            ],
            topology: NO_TOPOLOGY,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[1], Reject),
        },
        Case {
            name: "not_ready_endpoint_hinted_for_this_zone_is_left_out_of_the_zone_set",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).zones(&["zone-a"]),
                ready(2).zones(&["zone-b"]),
                ready(3).zones(&["zone-c"]),
                not_ready(4).zones(&["zone-a"]),
            ],
            topology: PreferSameZone,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[1], Reject),
        },
        Case {
            name: "only_not_ready_endpoints_hinted_for_this_zone_means_no_filtering",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                not_ready(1).zones(&["zone-a"]),
                ready(2).zones(&["zone-b"]),
                ready(3).zones(&["zone-c"]),
                not_ready(4).zones(&["zone-a"]),
            ],
            topology: NO_TOPOLOGY,
            cluster: &[2, 3],
            local: &[],
            all_reachable: &[2, 3],
            has_any: true,
            internal: (&[2, 3], Reject),
            external: (&[2, 3], Reject),
        },
        Case {
            name: "zone_hints_only_for_other_zones_means_no_filtering",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).zones(&["zone-b"]), ready(2).zones(&["zone-c"])],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[1, 2], Reject),
        },
        Case {
            name: "missing_zone_label_never_matches_zone_hints",
            service: svc(),
            zone: None,
            endpoints: vec![ready(1).zones(&["zone-a"]), ready(2).zones(&["zone-b"])],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[1, 2], Reject),
        },
        Case {
            name: "empty_zone_label_never_matches_zone_hints",
            service: svc(),
            zone: Some(""),
            endpoints: vec![ready(1).zones(&["zone-a"]), ready(2).zones(&["zone-b"])],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[1, 2], Reject),
        },
        Case {
            name: "prefer_same_node_when_every_ready_endpoint_has_node_hints",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).local().nodes(&["node-a"]).zones(&["zone-a"]),
                ready(2).nodes(&["node-b"]).zones(&["zone-a"]),
                ready(3).nodes(&["node-c"]).zones(&["zone-b"]),
            ],
            topology: PreferSameNode,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[1], Reject),
        },
        Case {
            name: "node_hints_preferred_over_zone_hints",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).nodes(&["node-b"]).zones(&["zone-a"]),
                ready(2).nodes(&["node-a"]).zones(&["zone-b"]),
            ],
            topology: PreferSameNode,
            cluster: &[2],
            local: &[],
            all_reachable: &[2],
            has_any: true,
            internal: (&[2], Reject),
            external: (&[2], Reject),
        },
        Case {
            name: "same_node_filter_follows_hints_not_endpoint_placement",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).nodes(&["node-a"]),
                ready(2).local().nodes(&["node-b"]),
            ],
            topology: PreferSameNode,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[1], Reject),
        },
        Case {
            name: "node_hints_only_for_other_nodes_fall_back_to_zone_hints",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).nodes(&["node-b"]).zones(&["zone-a"]),
                ready(2).nodes(&["node-c"]).zones(&["zone-b"]),
            ],
            topology: PreferSameZone,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[1], Reject),
        },
        Case {
            name: "one_unhinted_ready_endpoint_disables_node_hints_but_not_zone_hints",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).nodes(&["node-a"]).zones(&["zone-a"]),
                ready(2).zones(&["zone-a"]),
                ready(3).nodes(&["node-c"]).zones(&["zone-b"]),
            ],
            topology: PreferSameZone,
            cluster: &[1, 2],
            local: &[],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[1, 2], Reject),
        },
        Case {
            name: "node_hints_only_for_other_nodes_and_no_zone_hints_means_no_filtering",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).nodes(&["node-b"]), ready(2).nodes(&["node-c"])],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[1, 2], Reject),
        },
        Case {
            name: "hint_for_this_node_on_an_unready_endpoint_is_ignored",
            service: svc(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).nodes(&["node-b"]).zones(&["zone-a"]),
                serving_terminating(2)
                    .local()
                    .nodes(&["node-a"])
                    .zones(&["zone-a"]),
            ],
            topology: PreferSameZone,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[1], Reject),
        },
        // ---- Step 4 and externally-accessible: when Local endpoints are computed.
        Case {
            // externalTrafficPolicy: Local on a port with no nodePort, LB VIP or
            // externalIP: no Local set. No external destination exists, so the empty
            // external set (kube-proxy's hasExternalEndpoints=false) is never applied.
            name: "etp_local_only_when_externally_accessible",
            service: svc().etp_local(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).local(), ready(2)],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[], Drop),
        },
        Case {
            name: "etp_local_with_node_port_sends_external_traffic_to_local_endpoints",
            service: svc().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).local(), ready(2), ready(3).local()],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2, 3],
            local: &[1, 3],
            all_reachable: &[1, 2, 3],
            has_any: true,
            internal: (&[1, 2, 3], Reject),
            external: (&[1, 3], Drop),
        },
        Case {
            name: "external_ip_alone_makes_etp_local_apply",
            service: svc().etp_local().external_ip(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).local(), ready(2)],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[1],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[1], Drop),
        },
        Case {
            name: "load_balancer_ip_alone_makes_etp_local_apply",
            service: svc().etp_local().lb_ip(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).local(), ready(2)],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[1],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[1], Drop),
        },
        // ---- Section 4: eTP=Local reject vs drop.
        Case {
            name: "etp_local_without_local_endpoints_drops_external_but_serves_internal",
            service: svc().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![ready(1), ready(2)],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[], Drop),
        },
        Case {
            name: "etp_local_with_only_remote_serving_terminating_drops_external",
            service: svc().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![serving_terminating(1)],
            topology: NO_TOPOLOGY,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[], Drop),
        },
        Case {
            name: "etp_local_with_no_usable_endpoint_anywhere_rejects",
            service: svc().etp_local().lb_ip(),
            zone: Some(ZONE),
            endpoints: vec![not_ready(1).local(), terminating_not_serving(2)],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[],
            all_reachable: &[],
            has_any: false,
            internal: (&[], Reject),
            external: (&[], Reject),
        },
        // ---- Step 5: Local endpoints and the hasAny pre-scan; iTP=Local.
        Case {
            // Not externally accessible: no Cluster set; the (empty) external set is
            // never applied.
            name: "itp_local_uses_only_local_ready_endpoints",
            service: svc().itp_local(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).local(),
                ready(2),
                ready(3).local(),
                not_ready(4).local(),
            ],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[1, 3],
            all_reachable: &[1, 3],
            has_any: true,
            internal: (&[1, 3], Drop),
            external: (&[], Reject),
        },
        Case {
            name: "itp_local_without_local_endpoints_has_any_but_empty_local",
            service: svc().itp_local(),
            zone: Some(ZONE),
            endpoints: vec![ready(1), ready(2)],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[],
            all_reachable: &[],
            has_any: true,
            internal: (&[], Drop),
            external: (&[], Reject),
        },
        Case {
            name: "local_ready_endpoints_preferred_over_local_serving_terminating",
            service: svc().itp_local(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).local(), serving_terminating(2).local(), ready(3)],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[1],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Drop),
            external: (&[], Reject),
        },
        Case {
            name: "local_terminating_fallback_when_no_local_endpoint_is_ready",
            service: svc().itp_local(),
            zone: Some(ZONE),
            endpoints: vec![
                serving_terminating(1).local(),
                ready(2),
                not_ready(3).local(),
            ],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[1],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Drop),
            external: (&[], Reject),
        },
        Case {
            name: "local_terminating_not_serving_is_not_a_fallback",
            service: svc().itp_local(),
            zone: Some(ZONE),
            endpoints: vec![terminating_not_serving(1).local(), ready(2)],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[],
            all_reachable: &[],
            has_any: true,
            internal: (&[], Drop),
            external: (&[], Reject),
        },
        Case {
            name: "has_any_counts_remote_serving_terminating_endpoints",
            service: svc().itp_local(),
            zone: Some(ZONE),
            endpoints: vec![serving_terminating(1), not_ready(2).local()],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[],
            all_reachable: &[],
            has_any: true,
            internal: (&[], Drop),
            external: (&[], Reject),
        },
        Case {
            name: "itp_local_with_no_usable_endpoint_anywhere_rejects",
            service: svc().itp_local(),
            zone: Some(ZONE),
            endpoints: vec![not_ready(1).local(), terminating_not_serving(2)],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[],
            all_reachable: &[],
            has_any: false,
            internal: (&[], Reject),
            external: (&[], Reject),
        },
        Case {
            name: "itp_local_with_every_endpoint_local_uses_them_all",
            service: svc().itp_local(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).local(), ready(2).local()],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[1, 2],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Drop),
            external: (&[], Reject),
        },
        Case {
            name: "local_set_ignores_topology_hints",
            service: svc().itp_local(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).local().zones(&["zone-b"]),
                ready(2).zones(&["zone-a"]),
            ],
            topology: NO_TOPOLOGY,
            cluster: &[],
            local: &[1],
            all_reachable: &[1],
            has_any: true,
            internal: (&[1], Drop),
            external: (&[], Reject),
        },
        Case {
            name: "itp_local_on_externally_accessible_port_uses_both_sets",
            service: svc().itp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).local(), ready(2)],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[1],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1], Drop),
            external: (&[1, 2], Reject),
        },
        Case {
            name: "itp_local_without_local_endpoints_drops_internal_but_serves_external",
            service: svc().itp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![ready(1)],
            topology: NO_TOPOLOGY,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[], Drop),
            external: (&[1], Reject),
        },
        // ---- Step 6: all reachable = cluster, or the union with local.
        Case {
            name: "serving_terminating_local_fallback_merges_into_all_reachable",
            service: svc().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![serving_terminating(1).local(), ready(2)],
            topology: NO_TOPOLOGY,
            cluster: &[2],
            local: &[1],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[2], Reject),
            external: (&[1], Drop),
        },
        Case {
            name: "ready_local_without_topology_all_reachable_is_cluster",
            service: svc().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).local(), ready(2), serving_terminating(3).local()],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[1],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[1], Drop),
        },
        Case {
            name: "local_endpoint_outside_this_zone_merges_into_all_reachable",
            service: svc().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).local().zones(&["zone-b"]),
                ready(2).zones(&["zone-a"]),
            ],
            topology: PreferSameZone,
            cluster: &[2],
            local: &[1],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[2], Reject),
            external: (&[1], Drop),
        },
        Case {
            name: "local_endpoint_hinted_for_another_node_merges_into_all_reachable",
            service: svc().itp_local().lb_ip(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).local().nodes(&["node-b"]).zones(&["zone-a"]),
                ready(2).nodes(&["node-a"]).zones(&["zone-a"]),
            ],
            topology: PreferSameNode,
            cluster: &[2],
            local: &[1],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1], Drop),
            external: (&[2], Reject),
        },
        Case {
            name: "terminating_fallbacks_of_both_sets_merge_into_all_reachable",
            service: svc().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![serving_terminating(1), serving_terminating(2).local()],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[2],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1, 2], Reject),
            external: (&[2], Drop),
        },
        Case {
            name: "itp_and_etp_local_both_use_the_local_set",
            service: svc().itp_local().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![ready(1).local(), ready(2)],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[1],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[1], Drop),
            external: (&[1], Drop),
        },
        Case {
            name: "itp_and_etp_local_without_local_endpoints_drop_both",
            service: svc().itp_local().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![ready(1)],
            topology: NO_TOPOLOGY,
            cluster: &[1],
            local: &[],
            all_reachable: &[1],
            has_any: true,
            internal: (&[], Drop),
            external: (&[], Drop),
        },
        Case {
            name: "itp_and_etp_local_with_only_remote_serving_terminating_drop_both",
            service: svc().itp_local().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![serving_terminating(1), serving_terminating(2)],
            topology: NO_TOPOLOGY,
            cluster: &[1, 2],
            local: &[],
            all_reachable: &[1, 2],
            has_any: true,
            internal: (&[], Drop),
            external: (&[], Drop),
        },
        Case {
            // Endpoint 1 is local and hinted for this zone, so it is in both sets; the
            // union holds it once.
            name: "etp_local_set_ignores_zone_hints_and_the_union_holds_shared_endpoints_once",
            service: svc().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).local().zones(&["zone-a"]),
                ready(2).local().zones(&["zone-b"]),
                ready(3).zones(&["zone-c"]),
                ready(4).zones(&["zone-a"]),
            ],
            topology: PreferSameZone,
            cluster: &[1, 4],
            local: &[1, 2],
            all_reachable: &[1, 2, 4],
            has_any: true,
            internal: (&[1, 4], Reject),
            external: (&[1, 2], Drop),
        },
        Case {
            name: "itp_local_set_ignores_zone_hints_while_external_traffic_uses_the_zone_set",
            service: svc().itp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1).local().zones(&["zone-a"]),
                ready(2).local().zones(&["zone-b"]),
                ready(3).zones(&["zone-c"]),
                ready(4).zones(&["zone-a"]),
            ],
            topology: PreferSameZone,
            cluster: &[1, 4],
            local: &[1, 2],
            all_reachable: &[1, 2, 4],
            has_any: true,
            internal: (&[1, 2], Drop),
            external: (&[1, 4], Reject),
        },
        Case {
            // Cluster has a ready (remote) endpoint; the local set falls back on its own to
            // the local serving-terminating endpoint, skipping the local not-serving one and
            // the remote serving-terminating one.
            name: "etp_local_terminating_fallback_is_per_policy_and_local_only",
            service: svc().etp_local().node_port(),
            zone: Some(ZONE),
            endpoints: vec![
                ready(1),
                not_ready(2).local(),
                serving_terminating(3).local(),
                serving_terminating(4),
            ],
            topology: NO_TOPOLOGY,
            cluster: &[1],
            local: &[3],
            all_reachable: &[1, 3],
            has_any: true,
            internal: (&[1], Reject),
            external: (&[3], Drop),
        },
    ]
}

#[test]
fn categorize_table() {
    let cases = cases();
    assert!(cases.len() >= 30, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let service = case.service.build();
        let node = node(case.zone);
        let categorized = categorize(&service, &node, &case.endpoints);
        let eligibility = kube_proxy_eligibility(&service, &node, &case.endpoints);
        let observed = Observed {
            topology: categorized.topology,
            cluster: sorted(&categorized.cluster),
            local: sorted(&categorized.local),
            all_reachable: sorted(&categorized.all_reachable),
            has_any: categorized.has_any,
            internal: (
                eligibility.internal.endpoints.clone(),
                eligibility.internal.when_empty,
            ),
            external: (
                eligibility.external.endpoints.clone(),
                eligibility.external.when_empty,
            ),
        };
        let expected = Observed {
            topology: case.topology,
            cluster: case.cluster.to_vec(),
            local: case.local.to_vec(),
            all_reachable: case.all_reachable.to_vec(),
            has_any: case.has_any,
            internal: (case.internal.0.to_vec(), case.internal.1),
            external: (case.external.0.to_vec(), case.external.1),
        };
        if observed != expected {
            failures.push(format!(
                "case {}:\n  expected {expected:?}\n  observed {observed:?}",
                case.name
            ));
        }
        // all_reachable is exactly the union of the two sets, whichever way it was built.
        let union: BTreeSet<_> = categorized
            .cluster
            .iter()
            .chain(&categorized.local)
            .copied()
            .collect();
        if union.into_iter().collect::<Vec<_>>() != observed.all_reachable {
            failures.push(format!(
                "case {}: all_reachable {:?} is not cluster ∪ local",
                case.name, observed.all_reachable
            ));
        }
        // eligibility() of the categorization is what kube_proxy_eligibility answers.
        if eligibility != super::eligibility(&service, &categorized) {
            failures.push(format!(
                "case {}: kube_proxy_eligibility differs from eligibility(categorize)",
                case.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn case_names_are_unique() {
    let cases = cases();
    let names: BTreeSet<_> = cases.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), cases.len(), "duplicate case names");
}

#[test]
fn every_case_matches_kube_proxy_whatever_the_endpoint_order() {
    // kube-proxy sorts endpoints by address; categorization must not depend on order.
    for case in cases() {
        let service = case.service.build();
        let node = node(case.zone);
        let forward = categorize(&service, &node, &case.endpoints);
        let mut reversed_endpoints = case.endpoints.clone();
        reversed_endpoints.reverse();
        let reversed = categorize(&service, &node, &reversed_endpoints);
        assert_eq!(
            (
                sorted(&forward.cluster),
                sorted(&forward.local),
                sorted(&forward.all_reachable),
                forward.has_any,
                forward.topology,
            ),
            (
                sorted(&reversed.cluster),
                sorted(&reversed.local),
                sorted(&reversed.all_reachable),
                reversed.has_any,
                reversed.topology,
            ),
            "case {}",
            case.name
        );
        assert_eq!(
            kube_proxy_eligibility(&service, &node, &case.endpoints),
            kube_proxy_eligibility(&service, &node, &reversed_endpoints),
            "case {}",
            case.name
        );
    }
}
