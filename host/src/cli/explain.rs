//! `weir explain`: what every service port would do on a node, from objects and policies,
//! without opening a socket. The JSON shape is a stable interface for scripts.

use std::fmt::Write as _;
use std::net::IpAddr;

use serde::Serialize;
use weir_sdk::{Eligibility, EmptyAction, EndpointSet, ServiceHandle};

use crate::model::{Model, ServicePortSnapshot};
use crate::policy::{Binding, FailureMode, Registry, ServiceInput};

#[derive(Debug, Serialize, PartialEq)]
pub struct Report {
    pub node: String,
    pub services: Vec<ServiceReport>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReport {
    /// `namespace/name`.
    pub service: String,
    /// The ServicePort's name ("" when unnamed).
    pub port: String,
    pub protocol: &'static str,
    /// `http` or `h2c` for an HTTP port, whose every request is decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<&'static str>,
    pub policy: String,
    pub internal: ScopeReport,
    /// `None` unless the port is reachable from outside (nodePort, externalIPs, LB IPs).
    pub external: Option<ScopeReport>,
    pub health_check_node_port: Option<HealthCheckReport>,
    pub ip_family: &'static str,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: IpAddr,
    pub port_number: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    /// Sources allowed to reach the port through its LoadBalancer IPs (empty: all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<String>,
    /// Why the policy's own answer is not in use, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_failure: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ScopeReport {
    /// `forward`, `reject` or `drop`.
    pub action: &'static str,
    /// Sorted `ip:port` strings (IPv6 in brackets).
    pub endpoints: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckReport {
    pub port: u16,
    /// 200 when the node has a ready endpoint of the Service, else 503.
    pub status: u16,
    pub local_endpoints: usize,
}

/// One service port's answer.
pub struct PortDecision<'a> {
    pub snapshot: &'a ServicePortSnapshot,
    pub input: ServiceInput,
    pub eligibility: Eligibility,
    pub failure: Option<String>,
}

/// Asks each port's policy for its eligibility (ids assigned in endpoint order).
pub fn decide<'a>(model: &'a Model, registry: &Registry) -> Vec<PortDecision<'a>> {
    let mut decisions = Vec::with_capacity(model.ports.len());
    for (index, snapshot) in model.ports.iter().enumerate() {
        let handle = index as ServiceHandle + 1;
        let mut endpoints = snapshot.endpoints.clone();
        for (id, endpoint) in endpoints.iter_mut().enumerate() {
            endpoint.id = id as u32 + 1;
        }
        let input = snapshot.input(model.node.clone(), endpoints);
        let (eligibility, failure) = match registry.resolve(&snapshot.policy) {
            Binding::Policy(runtime) => {
                let answer = runtime.update(handle, input.clone());
                let failure = answer.failure.map(|e| {
                    format!(
                        "policy `{}` failed ({e}); failure mode {} applies",
                        snapshot.policy,
                        snapshot.failure_mode.as_str()
                    )
                });
                (answer.eligibility, failure)
            }
            Binding::Missing(reason) => {
                // As the runtime's failure mode does: the built-in kube-default's answer,
                // whatever module may have replaced kube-default in the registry.
                let eligibility = match snapshot.failure_mode {
                    FailureMode::Open => weir_sdk::kube::kube_proxy_eligibility(
                        &input.service,
                        &input.node,
                        &input.endpoints,
                    ),
                    FailureMode::Closed => Eligibility::reject_all(),
                };
                let failure = format!(
                    "{reason}; failure mode {} applies",
                    snapshot.failure_mode.as_str()
                );
                (eligibility, Some(failure))
            }
        };
        decisions.push(PortDecision {
            snapshot,
            input,
            eligibility,
            failure,
        });
    }
    decisions
}

/// The explain report for `model`.
pub fn report(model: &Model, registry: &Registry) -> Report {
    let decisions = decide(model, registry);
    let services = decisions
        .iter()
        .map(|d| {
            let s = &d.snapshot.service;
            let key = &d.snapshot.key;
            let health_check_node_port = d.snapshot.health_check.map(|check| HealthCheckReport {
                port: check.node_port,
                status: if check.local_endpoints > 0 { 200 } else { 503 },
                local_endpoints: check.local_endpoints,
            });
            ServiceReport {
                service: format!("{}/{}", key.namespace, key.name),
                port: key.port_name.clone(),
                protocol: key.protocol.as_str(),
                http: d.snapshot.http.map(|kind| match kind {
                    crate::model::HttpKind::Http1 => "http",
                    crate::model::HttpKind::H2c => "h2c",
                }),
                policy: d.snapshot.policy.clone(),
                internal: scope_report(&d.eligibility.internal, &d.input),
                external: s
                    .externally_accessible()
                    .then(|| scope_report(&d.eligibility.external, &d.input)),
                health_check_node_port,
                ip_family: key.family.as_str(),
                cluster_ip: s.cluster_ip,
                port_number: s.port,
                node_port: (s.node_port != 0).then_some(s.node_port),
                load_balancer_source_ranges: d
                    .snapshot
                    .load_balancer_source_ranges
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                policy_failure: d.failure.clone(),
            }
        })
        .collect();
    Report {
        node: model.node.name.clone(),
        services,
    }
}

fn scope_report(set: &EndpointSet, input: &ServiceInput) -> ScopeReport {
    ScopeReport {
        action: action(set),
        endpoints: input.addresses(set),
    }
}

/// `forward` when something is eligible, else what an empty set does: `reject` or `drop`.
pub fn action(set: &EndpointSet) -> &'static str {
    if !set.endpoints.is_empty() {
        "forward"
    } else {
        match set.when_empty {
            EmptyAction::Reject => "reject",
            EmptyAction::Drop => "drop",
        }
    }
}

/// The report as a table for people: one row per service port.
pub fn table(report: &Report) -> String {
    let header = [
        "SERVICE",
        "PORT",
        "PROTO",
        "FAMILY",
        "POLICY",
        "INTERNAL",
        "EXTERNAL",
        "HEALTHCHECK",
    ];
    let mut rows: Vec<[String; 8]> = vec![header.map(String::from)];
    for s in &report.services {
        let scope = |r: &ScopeReport| match r.action {
            "forward" => format!("forward {}", r.endpoints.join(",")),
            other => other.to_string(),
        };
        let port = if s.port.is_empty() {
            s.port_number.to_string()
        } else {
            format!("{}({})", s.port, s.port_number)
        };
        let mut policy = s.policy.clone();
        if s.policy_failure.is_some() {
            policy.push_str(" (failed)");
        }
        rows.push([
            s.service.clone(),
            port,
            match s.http {
                Some(http) => format!("{}/{http}", s.protocol),
                None => s.protocol.to_string(),
            },
            s.ip_family.to_string(),
            policy,
            scope(&s.internal),
            s.external.as_ref().map_or("-".to_string(), scope),
            s.health_check_node_port
                .as_ref()
                .map_or("-".to_string(), |h| {
                    format!("{} {} ({} local)", h.port, h.status, h.local_endpoints)
                }),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = format!("node: {}\n", report.node);
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for s in &report.services {
        if let Some(failure) = &s.policy_failure {
            let _ = writeln!(out, "note: {} {}: {failure}", s.service, s.port);
        }
    }
    out
}
