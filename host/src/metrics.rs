//! weir's Prometheus metrics: one registry; each subsystem owns its metrics struct.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

pub use crate::policy::metrics::{
    Call, FailureLabels, FallbackLabels, Mode, PolicyLabels, PolicyMetrics, Reason,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `namespace/name:port` (the port's name, or its number when unnamed).
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    /// `ip:port`.
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub service: String,
    pub endpoint: String,
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    client_to_endpoint,
    endpoint_to_client,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub service: String,
    pub action: Action,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Action {
    forward,
    reject,
    drop,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailedLabels {
    pub service: String,
    /// `ip:port` for `endpoint_unreachable`; empty for failures of no one endpoint.
    pub endpoint: String,
    pub reason: ConnectFailure,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ConnectFailure {
    /// One endpoint refused or timed out; another was tried.
    endpoint_unreachable,
    /// Every attempt failed: the client's connection was closed.
    gave_up,
    /// The source is outside the Service's loadBalancerSourceRanges.
    source_range,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    /// `ip:port`, or empty for weir's own answers (503 with nothing eligible).
    pub endpoint: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub service: String,
    pub timeout: Timeout,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Timeout {
    /// No bytes either way for `proxy.idle_timeout` (or `weir.dev/idle-timeout`).
    idle,
    /// Half-closed, and no bytes for `proxy.half_close_timeout`.
    half_close,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The service port whose listener waited.
    pub service: String,
    pub limit: Limit,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Limit {
    /// `proxy.max_connections`.
    node,
    /// `proxy.max_connections_per_service`.
    service,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `objects`, or the policy's name.
    pub what: String,
    pub result: ReloadResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    accepted,
    rejected,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub policy: String,
    /// `RegistryError::reason`: compile, wrong_version, replay...
    pub reason: &'static str,
}

/// A service port whose policy failed its update, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortFailureLabels {
    pub service: String,
    pub policy: String,
    pub reason: Reason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabels {
    pub traffic_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `service` (a service port's address) or `health_check`.
    pub kind: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 ns to ~3 ms: a select costs ~200 ns; the default deadline is 1 ms.
    Histogram::new(exponential_buckets(1e-7, 2.0, 16))
}

fn request_histogram() -> Histogram {
    // 100 µs to ~6.5 s, to the response's head.
    Histogram::new(exponential_buckets(1e-4, 2.0, 17))
}

fn sync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-4, 2.0, 16))
}

/// The proxy's metrics: traffic per service and endpoint, decisions, reloads, and
/// kube-proxy's sync metrics with the `weir_` prefix.
#[derive(Debug)]
pub struct ProxyMetrics {
    pub opened: Family<EndpointLabels, Counter>,
    pub active: Family<EndpointLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub failed: Family<FailedLabels, Counter>,
    pub timed_out: Family<TimeoutLabels, Counter>,
    pub limit_reached: Family<LimitLabels, Counter>,
    pub proxy_protocol_refused: Family<ServiceLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<ServiceLabels, Histogram>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub select_seconds: Family<PolicyLabels, Histogram>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub policy_rejections: Family<RejectionLabels, Counter>,
    pub sync_seconds: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub last_queued: Gauge<f64, AtomicU64>,
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    pub no_local_endpoints: Family<TrafficPolicyLabels, Gauge>,
    /// 1 for each service port on its failure mode because its policy failed its update.
    pub ports_failed: Family<PortFailureLabels, Gauge>,
    pub healthz: Family<CodeLabels, Counter>,
    pub livez: Family<CodeLabels, Counter>,
    pub listeners: Family<ListenerLabels, Gauge>,
    pub listener_errors: Family<ListenerLabels, Counter>,
    pub udp: udp::UdpMetrics,
    /// externalIPs and LoadBalancer IPs kept off the capture interface (loopback,
    /// link-local, multicast, unspecified).
    pub refused_addresses: Gauge,
    /// Series of endpoints and service ports that left, removed once they have lingered.
    departed: Departed,
}

pub use departed::DEFAULT_LINGER;
use departed::{Departed, Departure};

mod departed;
pub mod udp;

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            opened: Family::default(),
            active: Family::default(),
            bytes: Family::default(),
            failed: Family::default(),
            timed_out: Family::default(),
            limit_reached: Family::default(),
            proxy_protocol_refused: Family::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(request_histogram),
            decisions: Family::default(),
            select_seconds: Family::new_with_constructor(latency_histogram),
            reloads: Family::default(),
            policy_rejections: Family::default(),
            sync_seconds: sync_histogram(),
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            ports_failed: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            listeners: Family::default(),
            listener_errors: Family::default(),
            udp: Default::default(),
            refused_addresses: Gauge::default(),
            departed: Default::default(),
        }
    }
}

impl ProxyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "weir_connections_opened",
            "Connections forwarded to an endpoint",
            self.opened.clone(),
        );
        r.register(
            "weir_connections_active",
            "Connections open to an endpoint now",
            self.active.clone(),
        );
        r.register(
            "weir_bytes",
            "Bytes copied, counted when a connection closes",
            self.bytes.clone(),
        );
        r.register(
            "weir_connections_failed",
            "Connect attempts that failed, and connections given up on",
            self.failed.clone(),
        );
        r.register(
            "weir_connections_timed_out",
            "Connections closed by weir for their idle or half-close timeout",
            self.timed_out.clone(),
        );
        r.register(
            "weir_connection_limit_reached",
            "Times a listener stopped accepting because a connection cap was reached",
            self.limit_reached.clone(),
        );
        r.register(
            "weir_proxy_protocol_refused",
            "Connections refused for a missing or malformed PROXY protocol header",
            self.proxy_protocol_refused.clone(),
        );
        r.register(
            "weir_requests",
            "HTTP requests by endpoint and status code (an empty endpoint: weir answered)",
            self.requests.clone(),
        );
        r.register(
            "weir_request_duration_seconds",
            "Time from an HTTP request's arrival to its response's head",
            self.request_seconds.clone(),
        );
        r.register(
            "weir_decisions",
            "New connections by the action decided for them",
            self.decisions.clone(),
        );
        r.register(
            "weir_policy_select_duration_seconds",
            "Time to decide one connection, policy call included",
            self.select_seconds.clone(),
        );
        r.register(
            "weir_reloads",
            "Changes to objects or policy modules, accepted or rejected",
            self.reloads.clone(),
        );
        r.register(
            "weir_policy_rejections",
            "Policy modules refused by the swap, by reason",
            self.policy_rejections.clone(),
        );
        r.register(
            "weir_sync_proxy_rules_duration_seconds",
            "Time to apply a change to the data plane",
            self.sync_seconds.clone(),
        );
        r.register(
            "weir_sync_proxy_rules_last_timestamp_seconds",
            "When changes were last applied (Unix time)",
            self.last_sync.clone(),
        );
        r.register(
            "weir_sync_proxy_rules_last_queued_timestamp_seconds",
            "When a change was last seen (Unix time)",
            self.last_queued.clone(),
        );
        r.register(
            "weir_sync_proxy_rules_service_changes",
            "Service ports added, changed or removed",
            self.service_changes.clone(),
        );
        r.register(
            "weir_sync_proxy_rules_endpoint_changes",
            "Service ports whose endpoints changed",
            self.endpoint_changes.clone(),
        );
        r.register(
            "weir_sync_proxy_rules_no_local_endpoints_total",
            "Service ports with a Local traffic policy and no local endpoints",
            self.no_local_endpoints.clone(),
        );
        r.register(
            "weir_policy_service_failed",
            "Service ports on their failure mode because their policy failed its update (1 each, with the reason)",
            self.ports_failed.clone(),
        );
        r.register(
            "weir_proxy_healthz",
            "/healthz answers by status code",
            self.healthz.clone(),
        );
        r.register(
            "weir_proxy_livez",
            "/livez answers by status code",
            self.livez.clone(),
        );
        r.register(
            "weir_listeners",
            "Sockets listening, by kind",
            self.listeners.clone(),
        );
        r.register(
            "weir_listener_errors",
            "Listeners that could not be opened (retried)",
            self.listener_errors.clone(),
        );
        r.register(
            "weir_refused_addresses",
            "externalIPs and LoadBalancer IPs kept off the capture interface (loopback, link-local, multicast, unspecified)",
            self.refused_addresses.clone(),
        );
        self.udp.register(r);
    }

    pub fn reload(&self, what: &str, result: ReloadResult) {
        self.reloads
            .get_or_create(&ReloadLabels {
                what: what.to_string(),
                result,
            })
            .inc();
    }

    /// How long the series of a departed endpoint or service port stay exported.
    pub fn set_linger(&self, linger: std::time::Duration) {
        self.departed.set_linger(linger);
    }

    /// One endpoint of a service port left: its series leave once they have lingered
    /// (so that a scrape sees their last values), unless it comes back meanwhile.
    /// `codes`: the HTTP status codes it has request series for.
    pub fn forget_endpoint(&self, service: &str, endpoint: &str, codes: Vec<u16>) {
        self.depart(Departure::Endpoint {
            service: service.to_string(),
            endpoint: endpoint.to_string(),
            codes,
        });
    }

    /// A service port is gone: its own series leave once they have lingered.
    pub fn forget_service(&self, service: &str) {
        self.depart(Departure::Service(service.to_string()));
    }

    /// An endpoint has series again: a departure pending for it is called off.
    pub fn arrived_endpoint(&self, service: &str, endpoint: &str) {
        self.departed.arrived_endpoint(service, endpoint);
    }

    /// A service port has series again.
    pub fn arrived_service(&self, service: &str) {
        self.departed.arrived_service(service);
    }

    fn depart(&self, departure: Departure) {
        if let Some(now) = self.departed.push(departure) {
            self.remove(&now);
        }
    }

    /// Removes the series whose linger is over.
    pub fn sweep(&self) {
        while let Some(departure) = self.departed.next_due(std::time::Instant::now()) {
            self.remove(&departure);
        }
    }

    fn remove(&self, departure: &Departure) {
        match departure {
            Departure::Endpoint {
                service,
                endpoint,
                codes,
            } => self.remove_endpoint_series(service, endpoint, codes),
            Departure::Service(service) => self.remove_service_series(service),
        }
    }

    /// Removes every series of one endpoint of a service port. Handles still held (by
    /// connections open to it) keep counting, unexported.
    fn remove_endpoint_series(&self, service: &str, endpoint: &str, codes: &[u16]) {
        for code in codes {
            self.requests.remove(&RequestLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
                code: *code,
            });
        }
        let labels = EndpointLabels {
            service: service.to_string(),
            endpoint: endpoint.to_string(),
        };
        self.opened.remove(&labels);
        self.active.remove(&labels);
        for direction in [Direction::client_to_endpoint, Direction::endpoint_to_client] {
            self.bytes.remove(&BytesLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
                direction,
            });
        }
        self.failed.remove(&FailedLabels {
            service: service.to_string(),
            endpoint: endpoint.to_string(),
            reason: ConnectFailure::endpoint_unreachable,
        });
        self.udp.forget_endpoint(service, endpoint);
    }

    /// Removes the series of a service port itself (not its endpoints').
    fn remove_service_series(&self, service: &str) {
        for action in [Action::forward, Action::reject, Action::drop] {
            self.decisions.remove(&DecisionLabels {
                service: service.to_string(),
                action,
            });
        }
        for reason in [ConnectFailure::gave_up, ConnectFailure::source_range] {
            self.failed.remove(&FailedLabels {
                service: service.to_string(),
                endpoint: String::new(),
                reason,
            });
        }
        for timeout in [Timeout::idle, Timeout::half_close] {
            self.timed_out.remove(&TimeoutLabels {
                service: service.to_string(),
                timeout,
            });
        }
        self.proxy_protocol_refused.remove(&ServiceLabels {
            service: service.to_string(),
        });
        self.request_seconds.remove(&ServiceLabels {
            service: service.to_string(),
        });
        for limit in [Limit::node, Limit::service] {
            self.limit_reached.remove(&LimitLabels {
                service: service.to_string(),
                limit,
            });
        }
        self.udp.forget_service(service);
    }

    pub fn reloads_of(&self, what: &str, result: ReloadResult) -> u64 {
        self.reloads
            .get_or_create(&ReloadLabels {
                what: what.to_string(),
                result,
            })
            .get()
    }
}

/// Every metric weir exports, in one registry.
#[derive(Debug)]
pub struct Metrics {
    pub policy: std::sync::Arc<PolicyMetrics>,
    pub proxy: std::sync::Arc<ProxyMetrics>,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let policy = std::sync::Arc::new(PolicyMetrics::default());
        let proxy = std::sync::Arc::new(ProxyMetrics::default());
        let mut registry = Registry::default();
        policy.register(&mut registry);
        proxy.register(&mut registry);
        Metrics {
            policy,
            proxy,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests;
