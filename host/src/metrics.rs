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
    pub udp: crate::proxy::udp::metrics::UdpMetrics,
    /// externalIPs and LoadBalancer IPs kept off the capture interface (loopback,
    /// link-local, multicast, unspecified).
    pub refused_addresses: Gauge,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            opened: Family::default(),
            active: Family::default(),
            bytes: Family::default(),
            failed: Family::default(),
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
