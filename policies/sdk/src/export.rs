//! Glue between the generated WIT bindings and a [`Driver`]: used by [`export_policy!`]
//! only. Converts the host's values to the SDK's types and back.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::thread::LocalKey;

use crate::bindings::exports::weir::policy0_2_0::requests as wit_requests;
use crate::bindings::weir::policy0_1_0::types as wit;
use crate::bindings::weir::policy0_2_0::http;
use crate::request::{Request, RequestEvent, RequestOutcome};
use crate::types::{
    Connection, Decision, Eligibility, EmptyAction, Endpoint, EndpointSet, IpFamily, Node, Outcome,
    OutcomeKind, Protocol, Scope, Service,
};
use crate::{Driver, Policy};

type Slot<P> = LocalKey<RefCell<Option<Driver<P>>>>;

const NOT_CONFIGURED: &str = "weir policy called before configure";

/// Runs `f` on the configured driver (the host calls `configure` first; a call before it
/// is a trap).
fn driven<P: Policy, R>(slot: &'static Slot<P>, f: impl FnOnce(&mut Driver<P>) -> R) -> R {
    slot.with(|s| f(s.borrow_mut().as_mut().expect(NOT_CONFIGURED)))
}

pub fn configure<P: Policy>(
    slot: &'static Slot<P>,
    config: &str,
) -> Result<wit::Capabilities, String> {
    let driver = Driver::<P>::configure(config)?;
    let capabilities = driver.capabilities();
    slot.with(|s| *s.borrow_mut() = Some(driver));
    Ok(wit::Capabilities {
        observe_outcomes: capabilities.observe_outcomes,
    })
}

pub fn update<P: Policy>(
    slot: &'static Slot<P>,
    handle: u32,
    info: wit::Service,
    node: wit::Node,
    endpoints: Vec<wit::Endpoint>,
) -> wit::Eligibility {
    let service = service_from(info);
    let node = Node {
        name: node.name,
        labels: node.labels,
    };
    let endpoints: Vec<Endpoint> = endpoints.into_iter().map(endpoint_from).collect();
    let eligibility = driven(slot, |driver| {
        driver.update(handle, service, &node, &endpoints)
    });
    eligibility_to(eligibility)
}

pub fn remove<P: Policy>(slot: &'static Slot<P>, handle: u32) {
    driven(slot, |driver| driver.remove(handle))
}

pub fn select<P: Policy>(
    slot: &'static Slot<P>,
    handle: u32,
    connection: wit::Connection,
) -> wit::Decision {
    let connection = connection_from(connection);
    let decision = driven(slot, |driver| driver.select(handle, &connection));
    decision_to(decision)
}

/// The host's request, read through its getters as the policy asks.
struct HostRequest<'a>(&'a http::Request);

impl Request for HostRequest<'_> {
    fn method(&self) -> String {
        self.0.method()
    }

    fn authority(&self) -> Option<String> {
        self.0.authority()
    }

    fn path(&self) -> String {
        self.0.path()
    }

    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.0.header(name)
    }
}

pub fn select_request<P: Policy>(
    slot: &'static Slot<P>,
    handle: u32,
    connection: wit::Connection,
    request: &http::Request,
) -> wit::Decision {
    let connection = connection_from(connection);
    let decision = driven(slot, |driver| {
        driver.select_request(handle, &connection, &HostRequest(request))
    });
    decision_to(decision)
}

pub fn observe_request<P: Policy>(
    slot: &'static Slot<P>,
    handle: u32,
    outcome: wit_requests::RequestOutcome,
) {
    let outcome = RequestOutcome {
        endpoint: outcome.endpoint,
        event: match outcome.event {
            wit_requests::RequestEvent::Response(status) => RequestEvent::Response(status),
            wit_requests::RequestEvent::ConnectFailed => RequestEvent::ConnectFailed,
            wit_requests::RequestEvent::Failed => RequestEvent::Failed,
            wit_requests::RequestEvent::Finished => RequestEvent::Finished,
        },
        micros: outcome.micros,
    };
    driven(slot, |driver| driver.observe_request(handle, &outcome))
}

fn connection_from(connection: wit::Connection) -> Connection {
    Connection {
        client: socket_from(connection.client),
        destination: socket_from(connection.destination),
        scope: match connection.scope {
            wit::TrafficScope::Internal => Scope::Internal,
            wit::TrafficScope::External => Scope::External,
        },
    }
}

fn decision_to(decision: Decision) -> wit::Decision {
    match decision {
        Decision::Forward(id) => wit::Decision::Forward(id),
        Decision::Reject => wit::Decision::Reject,
        Decision::Drop => wit::Decision::Drop,
    }
}

pub fn observe<P: Policy>(slot: &'static Slot<P>, handle: u32, outcome: wit::Outcome) {
    let outcome = Outcome {
        endpoint: outcome.endpoint,
        kind: match outcome.kind {
            wit::OutcomeKind::Connected => OutcomeKind::Connected,
            wit::OutcomeKind::ConnectFailed => OutcomeKind::ConnectFailed,
            wit::OutcomeKind::Closed => OutcomeKind::Closed,
        },
        micros: outcome.micros,
    };
    driven(slot, |driver| driver.observe(handle, &outcome))
}

fn ip_from(address: wit::IpAddress) -> IpAddr {
    match address {
        wit::IpAddress::Ipv4(bits) => IpAddr::V4(Ipv4Addr::from(bits)),
        wit::IpAddress::Ipv6((high, low)) => {
            IpAddr::V6(Ipv6Addr::from((u128::from(high) << 64) | u128::from(low)))
        }
    }
}

fn socket_from(address: wit::SocketAddress) -> SocketAddr {
    SocketAddr::new(ip_from(address.address), address.port)
}

fn service_from(s: wit::Service) -> Service {
    Service {
        namespace: s.namespace,
        name: s.name,
        port_name: s.port_name,
        protocol: match s.protocol {
            wit::Protocol::Tcp => Protocol::Tcp,
            wit::Protocol::Udp => Protocol::Udp,
            wit::Protocol::Sctp => Protocol::Sctp,
        },
        ip_family: match s.ip_family {
            wit::IpFamily::Ipv4 => IpFamily::V4,
            wit::IpFamily::Ipv6 => IpFamily::V6,
        },
        cluster_ip: ip_from(s.cluster_ip),
        port: s.port,
        node_port: s.node_port,
        external_ips: s.external_ips.into_iter().map(ip_from).collect(),
        load_balancer_ips: s.load_balancer_ips.into_iter().map(ip_from).collect(),
        internal_traffic_local: s.internal_traffic_local,
        external_traffic_local: s.external_traffic_local,
        session_affinity_timeout: s.session_affinity_timeout,
        config: s.config,
    }
}

fn endpoint_from(e: wit::Endpoint) -> Endpoint {
    Endpoint {
        id: e.id,
        address: socket_from(e.address),
        ready: e.ready,
        serving: e.serving,
        terminating: e.terminating,
        node_name: e.node_name,
        zone: e.zone,
        is_local: e.is_local,
        zone_hints: e.zone_hints,
        node_hints: e.node_hints,
    }
}

fn eligibility_to(e: Eligibility) -> wit::Eligibility {
    let set = |s: EndpointSet| wit::EndpointSet {
        endpoints: s.endpoints,
        when_empty: match s.when_empty {
            EmptyAction::Reject => wit::EmptyAction::Reject,
            EmptyAction::Drop => wit::EmptyAction::Drop,
        },
    };
    wit::Eligibility {
        internal: set(e.internal),
        external: set(e.external),
    }
}
