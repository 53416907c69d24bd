//! The SDK's plain Rust values to and from the WIT values the host passes to guests.

use std::net::{IpAddr, SocketAddr};

use weir_sdk::{
    Connection, Eligibility, EmptyAction, Endpoint, EndpointSet, IpFamily, Node, Outcome,
    OutcomeKind, Protocol, RequestEvent, RequestOutcome, Scope, Service,
};

use super::bindings::exports::weir::policy0_2_0::requests;
use super::bindings::types as wit;

pub fn ip(address: IpAddr) -> wit::IpAddress {
    match address {
        IpAddr::V4(v4) => wit::IpAddress::Ipv4(u32::from(v4)),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            wit::IpAddress::Ipv6(((bits >> 64) as u64, bits as u64))
        }
    }
}

pub fn socket(address: SocketAddr) -> wit::SocketAddress {
    wit::SocketAddress {
        address: ip(address.ip()),
        port: address.port(),
    }
}

pub fn service(s: &Service) -> wit::Service {
    wit::Service {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        port_name: s.port_name.clone(),
        protocol: match s.protocol {
            Protocol::Tcp => wit::Protocol::Tcp,
            Protocol::Udp => wit::Protocol::Udp,
            Protocol::Sctp => wit::Protocol::Sctp,
        },
        ip_family: match s.ip_family {
            IpFamily::V4 => wit::IpFamily::Ipv4,
            IpFamily::V6 => wit::IpFamily::Ipv6,
        },
        cluster_ip: ip(s.cluster_ip),
        port: s.port,
        node_port: s.node_port,
        external_ips: s.external_ips.iter().copied().map(ip).collect(),
        load_balancer_ips: s.load_balancer_ips.iter().copied().map(ip).collect(),
        internal_traffic_local: s.internal_traffic_local,
        external_traffic_local: s.external_traffic_local,
        session_affinity_timeout: s.session_affinity_timeout,
        config: s.config.clone(),
    }
}

pub fn node(n: &Node) -> wit::Node {
    wit::Node {
        name: n.name.clone(),
        labels: n.labels.clone(),
    }
}

pub fn endpoint(e: &Endpoint) -> wit::Endpoint {
    wit::Endpoint {
        id: e.id,
        address: socket(e.address),
        ready: e.ready,
        serving: e.serving,
        terminating: e.terminating,
        node_name: e.node_name.clone(),
        zone: e.zone.clone(),
        is_local: e.is_local,
        zone_hints: e.zone_hints.clone(),
        node_hints: e.node_hints.clone(),
    }
}

pub fn connection(c: &Connection) -> wit::Connection {
    wit::Connection {
        client: socket(c.client),
        destination: socket(c.destination),
        scope: match c.scope {
            Scope::Internal => wit::TrafficScope::Internal,
            Scope::External => wit::TrafficScope::External,
        },
    }
}

pub fn outcome(o: &Outcome) -> wit::Outcome {
    wit::Outcome {
        endpoint: o.endpoint,
        kind: match o.kind {
            OutcomeKind::Connected => wit::OutcomeKind::Connected,
            OutcomeKind::ConnectFailed => wit::OutcomeKind::ConnectFailed,
            OutcomeKind::Closed => wit::OutcomeKind::Closed,
        },
        micros: o.micros,
    }
}

pub fn request_outcome(o: &RequestOutcome) -> requests::RequestOutcome {
    requests::RequestOutcome {
        endpoint: o.endpoint,
        event: match o.event {
            RequestEvent::Response(status) => requests::RequestEvent::Response(status),
            RequestEvent::ConnectFailed => requests::RequestEvent::ConnectFailed,
            RequestEvent::Failed => requests::RequestEvent::Failed,
            RequestEvent::Finished => requests::RequestEvent::Finished,
        },
        micros: o.micros,
    }
}

pub fn eligibility(e: wit::Eligibility) -> Eligibility {
    let set = |s: wit::EndpointSet| EndpointSet {
        endpoints: s.endpoints,
        when_empty: match s.when_empty {
            wit::EmptyAction::Reject => EmptyAction::Reject,
            wit::EmptyAction::Drop => EmptyAction::Drop,
        },
    };
    Eligibility {
        internal: set(e.internal),
        external: set(e.external),
    }
}
