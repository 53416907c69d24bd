//! A route's metric handles: resolved once per service port and policy, and once per
//! endpoint on its first connection, rather than per connection; and forgotten, series
//! and all, when what they count leaves.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use super::udp;
use crate::locks::{read, write};
use crate::metrics::{
    Action, BytesLabels, ConnectFailure, DecisionLabels, Direction, EndpointLabels, FailedLabels,
    Limit, LimitLabels, PolicyLabels, ProxyMetrics, RequestLabels, ServiceLabels, Timeout,
    TimeoutLabels,
};

/// A route's metric handles, resolved once per service port and policy (and once per
/// endpoint, on its first connection) rather than per connection.
pub struct RouteMetrics {
    service: String,
    family: Arc<ProxyMetrics>,
    /// Looked up per HTTP request (by address, hashed fast: the endpoints come from the
    /// API server, not from clients).
    endpoints:
        std::sync::RwLock<HashMap<SocketAddr, Arc<EndpointMetrics>, foldhash::fast::RandomState>>,
    pub forward: Counter,
    pub reject: Counter,
    pub drop: Counter,
    pub select: Histogram,
    pub gave_up: Counter,
    pub source_range: Counter,
    pub idle_timeout: Counter,
    pub half_close_timeout: Counter,
    pub node_limit: Counter,
    pub service_limit: Counter,
    /// Connections refused for a missing or malformed PROXY protocol header.
    pub proxy_protocol_refused: Counter,
    /// HTTP requests' time to their response's head.
    pub request_seconds: Histogram,
    /// UDP flows open now on this service port, against `proxy.max_udp_flows_per_service`.
    pub udp_flows: std::sync::atomic::AtomicUsize,
    /// TCP connections open now on this service port, against
    /// `proxy.max_connections_per_service`, and the wake-up of listeners waiting for one
    /// to close.
    pub tcp_connections: std::sync::atomic::AtomicUsize,
    pub tcp_room: tokio::sync::Notify,
}

impl RouteMetrics {
    pub fn new(metrics: &Arc<ProxyMetrics>, service: &str, policy: &str) -> Self {
        metrics.arrived_service(service);
        let decision = |action| {
            metrics
                .decisions
                .get_or_create(&DecisionLabels {
                    service: service.to_string(),
                    action,
                })
                .clone()
        };
        let failed = |reason| {
            metrics
                .failed
                .get_or_create(&FailedLabels {
                    service: service.to_string(),
                    endpoint: String::new(),
                    reason,
                })
                .clone()
        };
        let timed_out = |timeout| {
            metrics
                .timed_out
                .get_or_create(&TimeoutLabels {
                    service: service.to_string(),
                    timeout,
                })
                .clone()
        };
        let limit = |limit| {
            metrics
                .limit_reached
                .get_or_create(&LimitLabels {
                    service: service.to_string(),
                    limit,
                })
                .clone()
        };
        RouteMetrics {
            service: service.to_string(),
            family: metrics.clone(),
            endpoints: Default::default(),
            idle_timeout: timed_out(Timeout::idle),
            half_close_timeout: timed_out(Timeout::half_close),
            node_limit: limit(Limit::node),
            request_seconds: metrics
                .request_seconds
                .get_or_create(&ServiceLabels {
                    service: service.to_string(),
                })
                .clone(),
            proxy_protocol_refused: metrics
                .proxy_protocol_refused
                .get_or_create(&ServiceLabels {
                    service: service.to_string(),
                })
                .clone(),
            service_limit: limit(Limit::service),
            tcp_connections: Default::default(),
            tcp_room: Default::default(),
            forward: decision(Action::forward),
            reject: decision(Action::reject),
            drop: decision(Action::drop),
            select: metrics
                .select_seconds
                .get_or_create(&PolicyLabels {
                    policy: policy.to_string(),
                })
                .clone(),
            gave_up: failed(ConnectFailure::gave_up),
            source_range: failed(ConnectFailure::source_range),
            udp_flows: Default::default(),
        }
    }

    /// Every proxy series, for those made on demand.
    pub fn family(&self) -> &Arc<ProxyMetrics> {
        &self.family
    }

    /// The service port's label, `namespace/name:port`.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The counters of one endpoint of this route's service.
    pub fn endpoint(&self, address: SocketAddr) -> Arc<EndpointMetrics> {
        if let Some(found) = read(&self.endpoints).get(&address) {
            return found.clone();
        }
        let created = Arc::new(self.create_endpoint(address));
        write(&self.endpoints)
            .entry(address)
            .or_insert(created)
            .clone()
    }

    /// One HTTP request answered by `endpoint` (None: by weir) with `code`, its response's
    /// head after `took`.
    pub fn request(&self, endpoint: Option<SocketAddr>, code: u16, took: std::time::Duration) {
        match endpoint {
            // Counted under the read lock, without taking the endpoint's handle out of it
            // (two atomic operations per request fewer); made on its first request.
            Some(endpoint) => {
                let counted = (read(&self.endpoints).get(&endpoint))
                    .map(|metrics| metrics.request(code))
                    .is_some();
                if !counted {
                    self.endpoint(endpoint).request(code);
                }
            }
            None => {
                self.family
                    .requests
                    .get_or_create(&RequestLabels {
                        service: self.service.clone(),
                        endpoint: String::new(),
                        code,
                    })
                    .inc();
            }
        }
        self.request_seconds.observe(took.as_secs_f64());
    }

    /// Forgets the endpoints that `keep` does not keep, series and all: they left the
    /// service port.
    pub fn retain_endpoints(&self, keep: impl Fn(SocketAddr) -> bool) {
        let mut endpoints = write(&self.endpoints);
        endpoints.retain(|address, metrics| {
            let kept = keep(*address);
            if !kept {
                let codes = read(&metrics.requests)
                    .iter()
                    .map(|(code, _)| *code)
                    .collect();
                self.family
                    .forget_endpoint(&self.service, &address.to_string(), codes);
            }
            kept
        });
    }

    /// Forgets the service port's series and its endpoints': it is gone.
    pub fn forget(&self) {
        self.retain_endpoints(|_| false);
        self.family.forget_service(&self.service);
    }

    fn create_endpoint(&self, endpoint: SocketAddr) -> EndpointMetrics {
        let endpoint = endpoint.to_string();
        self.family.arrived_endpoint(&self.service, &endpoint);
        let labels = EndpointLabels {
            service: self.service.clone(),
            endpoint: endpoint.clone(),
        };
        let bytes = |direction| {
            self.family
                .bytes
                .get_or_create(&BytesLabels {
                    service: self.service.clone(),
                    endpoint: endpoint.clone(),
                    direction,
                })
                .clone()
        };
        EndpointMetrics {
            unreachable: self
                .family
                .failed
                .get_or_create(&FailedLabels {
                    service: self.service.clone(),
                    endpoint: endpoint.clone(),
                    reason: ConnectFailure::endpoint_unreachable,
                })
                .clone(),
            opened: self.family.opened.get_or_create(&labels).clone(),
            active: self.family.active.get_or_create(&labels).clone(),
            to_endpoint: bytes(Direction::client_to_endpoint),
            to_client: bytes(Direction::endpoint_to_client),
            udp: std::sync::OnceLock::new(),
            requests: Default::default(),
            service: self.service.clone(),
            address: endpoint,
            family: self.family.clone(),
        }
    }
}

pub struct EndpointMetrics {
    /// Connect attempts to it that failed (and were tried elsewhere).
    pub unreachable: Counter,
    pub opened: Counter,
    pub active: Gauge,
    pub to_endpoint: Counter,
    pub to_client: Counter,
    /// Its UDP series, made on its first flow.
    udp: std::sync::OnceLock<udp::EndpointUdp>,
    /// Its HTTP requests by status code, made on each code's first request (an endpoint
    /// answers with a few codes: a list is searched faster than a map is hashed).
    requests: std::sync::RwLock<Vec<(u16, Counter)>>,
    service: String,
    address: String,
    family: Arc<ProxyMetrics>,
}

impl EndpointMetrics {
    pub fn udp(&self) -> &udp::EndpointUdp {
        self.udp
            .get_or_init(|| udp::EndpointUdp::new(&self.family.udp, &self.service, &self.address))
    }

    /// Counts one HTTP request it answered with `code`.
    pub fn request(&self, code: u16) {
        if let Some((_, counter)) = read(&self.requests).iter().find(|(c, _)| *c == code) {
            counter.inc();
            return;
        }
        let mut requests = write(&self.requests);
        if let Some((_, counter)) = requests.iter().find(|(c, _)| *c == code) {
            counter.inc();
            return;
        }
        let counter = self
            .family
            .requests
            .get_or_create(&RequestLabels {
                service: self.service.clone(),
                endpoint: self.address.clone(),
                code,
            })
            .clone();
        counter.inc();
        requests.push((code, counter));
    }
}
