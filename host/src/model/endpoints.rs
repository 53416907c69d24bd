//! EndpointSlices merged into each service port's endpoints, as kube-proxy's
//! endpointslicecache does: grouping, dedup, conditions, locality and hints.

use super::*;

/// Slices by (namespace, Service name), each list in slice-name order.
pub(super) type SliceMap<'a> = BTreeMap<(String, String), Vec<&'a Sourced<EndpointSlice>>>;

pub(super) fn group_slices<'a>(
    objects: &'a Objects,
    diagnostics: &mut Vec<Diagnostic>,
) -> SliceMap<'a> {
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
pub(super) type EndpointsKey = (String, String, String, ProtocolKey, FamilyKey);

/// kube-proxy's EndpointsMap from the slices: for every slice port (its name, protocol
/// and number), the first address of every endpoint, duplicates collapsed across all the
/// Service's slices (a later non-terminating copy replaces an earlier one), sorted by
/// `ip:port` string. Built from the slices alone, as kube-proxy does, so it also holds
/// ports the Service does not (yet) have.
pub(super) fn endpoints_map(
    slices: &SliceMap<'_>,
    node_name: &str,
) -> HashMap<EndpointsKey, Vec<Endpoint>> {
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
pub(super) fn endpoint_of(
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
pub(super) fn local_ready_endpoints(
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
