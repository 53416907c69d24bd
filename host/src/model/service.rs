//! One Service into kube-proxy's ServicePorts: per port and IP family, with its
//! addresses, traffic policies, affinity, health check and weir's annotations.

use super::*;

/// kube-proxy's ServicePorts for one Service: one per port per IP family with a clusterIP.
pub(super) fn service_ports(
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
    let mut timeout = |annotation: &str, instead: &str| match annotations
        .get(annotation)
        .map(|s| s.trim())
    {
        None => None,
        Some(text) => match crate::units::parse_duration(text) {
            Some(timeout) if !timeout.is_zero() && timeout <= crate::units::MAX_DURATION => {
                Some(timeout)
            }
            _ => {
                warn(
                    diagnostics,
                    format!(
                        "annotation {annotation}: `{text}` is not a duration above 0 and within a year, such as `10s` or `2m`; using {instead}"
                    ),
                );
                None
            }
        },
    };
    let udp_timeout = timeout(UDP_TIMEOUT_ANNOTATION, "proxy.udp_timeout");
    let idle_timeout = timeout(IDLE_TIMEOUT_ANNOTATION, "proxy.idle_timeout");
    let config = annotations.get(POLICY_CONFIG_ANNOTATION).cloned();
    let proxy_protocol = match annotations.get(PROXY_PROTOCOL_ANNOTATION) {
        None => None,
        Some(text) => {
            let version = crate::proxy::proxy_protocol::Version::parse(text);
            if version.is_none() {
                warn(
                    diagnostics,
                    format!(
                        "annotation {PROXY_PROTOCOL_ANNOTATION}: `{text}` is not `v1` or `v2`; endpoints get no PROXY protocol header"
                    ),
                );
            }
            version
        }
    };
    let http_annotated = match annotations.get(PROTOCOL_ANNOTATION).map(|s| s.trim()) {
        None => false,
        Some("http") => true,
        Some(text) => {
            warn(
                diagnostics,
                format!(
                    "annotation {PROTOCOL_ANNOTATION}: `{text}` is not `http`; its ports stay L4"
                ),
            );
            false
        }
    };
    // A `"true"`/`"false"` annotation; anything else is warned about and means false.
    let flag =
        |diagnostics: &mut Vec<Diagnostic>, annotation: &str, otherwise: &str| match annotations
            .get(annotation)
            .map(|s| s.trim())
        {
            None | Some("false") => false,
            Some("true") => true,
            Some(text) => {
                warn(
                    diagnostics,
                    format!(
                        "annotation {annotation}: `{text}` is not `true` or `false`; {otherwise}"
                    ),
                );
                false
            }
        };
    let forwarded_for = flag(
        diagnostics,
        FORWARDED_FOR_ANNOTATION,
        "no X-Forwarded-For is added",
    );
    let ingress_proxy_mode = (service.status.as_ref())
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .is_some_and(|ingress| {
            ingress
                .iter()
                .any(|i| i.ip_mode.as_deref() == Some("Proxy"))
        });
    let accept_proxy_protocol = ingress_proxy_mode
        || flag(
            diagnostics,
            ACCEPT_PROXY_PROTOCOL_ANNOTATION,
            "no header is expected",
        );

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
            let http = match (protocol, port.app_protocol.as_deref()) {
                (ProtocolKey::Tcp, Some("http")) => Some(HttpKind::Http1),
                (ProtocolKey::Tcp, Some("kubernetes.io/h2c" | "grpc")) => Some(HttpKind::H2c),
                (ProtocolKey::Tcp, None) if http_annotated => Some(HttpKind::Http1),
                _ => None,
            };
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
                udp_timeout,
                idle_timeout,
                proxy_protocol,
                accept_proxy_protocol,
                http,
                forwarded_for,
            });
        }
    }
    out
}
