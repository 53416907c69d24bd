//! The Node weir runs on, as kube-proxy reads it: eligibility for `/healthz`, its
//! addresses, its pod ranges, its name and labels for policies.

use super::*;

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

pub(super) fn find_node<'a>(
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

pub(super) fn node_of(objects: &Objects, node_name: &str) -> Node {
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
