//! A test script: the object changes (`scale`, `drain`, `zone`...) applied between runs,
//! read from YAML.

use super::*;

pub(super) fn read_script(path: &Path) -> Result<Vec<Change>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    // Through JSON values: YAML parsers want `!remove` tags for enums, people write maps.
    let script: Result<Script, String> = crate::yaml::document(&text)
        .map_err(|e| e.to_string())
        .and_then(|value| serde_json::from_value(value).map_err(|e| e.to_string()));
    let script = script.map_err(|e| {
        format!(
            "{}: not a script ({e}); expected `steps:` with items like `- remove: {{service: default/web, address: 198.18.0.5}}`, `- zone: zone-b` or `- wait: 30s`",
            path.display()
        )
    })?;
    Ok(script.steps)
}

/// Applies one script change to the objects; returns its description.
pub(super) fn apply_change(
    objects: &mut Objects,
    change: &Change,
    node: &str,
    engine: &PolicyEngine,
) -> Result<String, String> {
    match change {
        Change::Wait(text) => {
            let duration = parse_duration(text)?;
            engine.advance_clock(duration);
            Ok(format!("wait {text}"))
        }
        Change::Zone(zone) => {
            set_node_zone(objects, node, zone);
            Ok(format!("node {node} moves to zone {zone}"))
        }
        Change::Add(e) => {
            let (slice, ip) = slice_for(objects, e, true)?;
            slice
                .endpoints
                .push(k8s_openapi::api::discovery::v1::Endpoint {
                    addresses: vec![ip.to_string()],
                    node_name: e.node.clone(),
                    zone: e.zone.clone(),
                    ..Default::default()
                });
            Ok(format!("add {} to {}", e.address, e.service))
        }
        Change::Remove(e) => {
            let (slice, ip) = slice_for(objects, e, false)?;
            slice.endpoints.retain(|ep| {
                ep.addresses
                    .first()
                    .and_then(|a| crate::net::parse_ip_sloppy(a))
                    != Some(ip)
            });
            Ok(format!("remove {} from {}", e.address, e.service))
        }
        Change::Terminating(e) => {
            let (slice, ip) = slice_for(objects, e, false)?;
            for endpoint in &mut slice.endpoints {
                if endpoint
                    .addresses
                    .first()
                    .and_then(|a| crate::net::parse_ip_sloppy(a))
                    == Some(ip)
                {
                    endpoint.conditions =
                        Some(k8s_openapi::api::discovery::v1::EndpointConditions {
                            ready: Some(false),
                            serving: Some(true),
                            terminating: Some(true),
                        });
                }
            }
            Ok(format!("{} of {} starts terminating", e.address, e.service))
        }
    }
}

/// The slice of `change.service` that holds (or, to add, should hold) the address.
pub(super) fn slice_for<'a>(
    objects: &'a mut Objects,
    change: &EndpointChange,
    adding: bool,
) -> Result<
    (
        &'a mut k8s_openapi::api::discovery::v1::EndpointSlice,
        IpAddr,
    ),
    String,
> {
    let ip = crate::net::parse_ip_sloppy(&change.address)
        .ok_or_else(|| format!("script: `{}` is not an IP address", change.address))?;
    let (namespace, name) = change.service.split_once('/').ok_or_else(|| {
        format!(
            "script: service `{}` must be namespace/name",
            change.service
        )
    })?;
    let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let found = objects
        .endpoint_slices
        .iter_mut()
        .map(|s| std::sync::Arc::make_mut(&mut s.object))
        .find(|slice| {
            slice.metadata.namespace.as_deref() == Some(namespace)
                && slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(model::SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    == Some(name)
                && slice.address_type == family
                && (adding
                    || slice.endpoints.iter().any(|e| {
                        e.addresses
                            .first()
                            .and_then(|a| crate::net::parse_ip_sloppy(a))
                            == Some(ip)
                    }))
        });
    found.map(|slice| (slice, ip)).ok_or_else(|| {
        if adding {
            format!(
                "script: {} has no {family} EndpointSlice to add {} to",
                change.service, change.address
            )
        } else {
            format!(
                "script: {} has no endpoint {}",
                change.service, change.address
            )
        }
    })
}

pub(super) fn set_node_zone(objects: &mut Objects, node: &str, zone: &str) {
    let existing = objects
        .nodes
        .iter_mut()
        .find(|n| n.object.metadata.name.as_deref() == Some(node));
    let target = match existing {
        Some(n) => std::sync::Arc::make_mut(&mut n.object),
        None => {
            let mut object = k8s_openapi::api::core::v1::Node::default();
            object.metadata.name = Some(node.to_string());
            objects.nodes.push(crate::objects::Sourced {
                origin: crate::objects::Origin {
                    file: PathBuf::from("<script>"),
                    document: None,
                    item: None,
                },
                object: object.into(),
            });
            std::sync::Arc::make_mut(&mut objects.nodes.last_mut().expect("just pushed").object)
        }
    };
    target
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(weir_sdk::ZONE_LABEL.to_string(), zone.to_string());
}

pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::units::parse_duration(text).ok_or_else(|| {
        format!("script: `wait: {}` is not a duration: write a number and a unit (ms, s, m, h), e.g. 30s", text.trim())
    })
}

/// Clients that moved between two runs, per port and scope (ports matched by key).
pub(super) fn moves(
    step: usize,
    change: String,
    before_keys: &[ServicePortKey],
    before: &[Runs],
    ports: &[Port],
    after: &[Runs],
) -> StepReport {
    let mut report = StepReport {
        step,
        change,
        moved: 0,
        clients: 0,
        ports: Vec::new(),
    };
    for (port, now) in ports.iter().zip(after) {
        let Some(index) = before_keys.iter().position(|key| key == &port.key) else {
            continue;
        };
        let then = &before[index];
        let mut compare = |scope: &'static str,
                           a: &[Result<SocketAddr, HostDecision>],
                           b: &[Result<SocketAddr, HostDecision>]| {
            let moved = a.iter().zip(b).filter(|(x, y)| x != y).count();
            report.moved += moved;
            report.clients += a.len();
            report.ports.push(PortMoves {
                service: format!("{}/{}", port.key.namespace, port.key.name),
                port: port.key.port_name.clone(),
                scope,
                moved,
                clients: a.len(),
            });
        };
        compare("internal", &then.internal, &now.internal);
        if let (Some(a), Some(b)) = (&then.external, &now.external) {
            compare("external", a, b);
        }
    }
    report
}
