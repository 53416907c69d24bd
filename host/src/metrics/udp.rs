//! UDP's series: datagrams per direction, flows opened, active and ended per endpoint,
//! and datagrams dropped before reaching one. Bytes go to `weir_bytes`, as TCP's.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A UDP flow's endpoint, as `weir_connections_*` label theirs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    /// `namespace/name:port`.
    pub service: String,
    /// `ip:port`.
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    client_to_endpoint,
    endpoint_to_client,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatagramLabels {
    pub service: String,
    pub endpoint: String,
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Ended {
    /// Idle for its timeout.
    idle,
    /// Its endpoint stopped being eligible: the client's next datagram opens a new flow.
    endpoint_gone,
    /// Its endpoint answered ICMP port unreachable: the next datagram opens a new flow.
    endpoint_refused,
    /// The flow cap was reached, and this was the oldest flow that never became a stream
    /// (the kernel's conntrack drops such entries early when its table is full).
    evicted,
    /// Its listener closed (the Service went, or weir is stopping).
    closed,
}

impl Ended {
    const ALL: [Ended; 5] = [
        Ended::idle,
        Ended::endpoint_gone,
        Ended::endpoint_refused,
        Ended::evicted,
        Ended::closed,
    ];

    fn index(&self) -> usize {
        Ended::ALL.iter().position(|e| e == self).expect("listed")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndedLabels {
    pub service: String,
    pub endpoint: String,
    pub reason: Ended,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Dropped {
    /// The node's flow cap (`proxy.max_udp_flows`), with no flow to evict.
    node_flow_cap,
    /// The Service port's flow cap (`proxy.max_udp_flows_per_service`).
    service_flow_cap,
    /// Outside the LoadBalancer's source ranges.
    source_range,
    /// The policy (or its failure mode) rejected or dropped the flow.
    refused,
    /// No socket could be opened towards the endpoint (out of file descriptors...).
    socket_error,
    /// The socket's send buffer was full.
    send_failed,
    /// The listener had no route (its address was just given up).
    no_route,
}

impl Dropped {
    const ALL: [Dropped; 7] = [
        Dropped::node_flow_cap,
        Dropped::service_flow_cap,
        Dropped::source_range,
        Dropped::refused,
        Dropped::socket_error,
        Dropped::send_failed,
        Dropped::no_route,
    ];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabels {
    pub service: String,
    pub reason: Dropped,
}

#[derive(Debug, Default)]
pub struct UdpMetrics {
    pub datagrams: Family<DatagramLabels, Counter>,
    pub opened: Family<FlowLabels, Counter>,
    pub active: Family<FlowLabels, Gauge>,
    pub ended: Family<EndedLabels, Counter>,
    pub dropped: Family<DroppedLabels, Counter>,
}

impl UdpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weir_udp_datagrams",
            "UDP datagrams forwarded, per endpoint and direction",
            self.datagrams.clone(),
        );
        registry.register(
            "weir_udp_flows_opened",
            "UDP flows opened to an endpoint",
            self.opened.clone(),
        );
        registry.register(
            "weir_udp_flows_active",
            "UDP flows open to an endpoint now",
            self.active.clone(),
        );
        registry.register(
            "weir_udp_flows_ended",
            "UDP flows ended, by reason",
            self.ended.clone(),
        );
        registry.register(
            "weir_udp_dropped",
            "UDP datagrams dropped before reaching an endpoint, by reason",
            self.dropped.clone(),
        );
    }

    /// Removes one endpoint's series (see `ProxyMetrics::forget_endpoint`).
    pub fn forget_endpoint(&self, service: &str, endpoint: &str) {
        let flow = FlowLabels {
            service: service.to_string(),
            endpoint: endpoint.to_string(),
        };
        self.opened.remove(&flow);
        self.active.remove(&flow);
        for direction in [Direction::client_to_endpoint, Direction::endpoint_to_client] {
            self.datagrams.remove(&DatagramLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
                direction,
            });
        }
        for reason in Ended::ALL {
            self.ended.remove(&EndedLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
                reason,
            });
        }
    }

    /// Removes a service port's own series.
    pub fn forget_service(&self, service: &str) {
        for reason in Dropped::ALL {
            self.dropped.remove(&DroppedLabels {
                service: service.to_string(),
                reason,
            });
        }
    }

    pub fn drop(&self, service: &str, reason: Dropped) {
        self.dropped
            .get_or_create(&DroppedLabels {
                service: service.to_string(),
                reason,
            })
            .inc();
    }
}

/// One endpoint's UDP handles, resolved once per route and endpoint.
pub struct EndpointUdp {
    pub opened: Counter,
    pub active: Gauge,
    pub to_endpoint: Counter,
    pub to_client: Counter,
    ended: [Counter; 5],
}

impl EndpointUdp {
    pub fn new(udp: &UdpMetrics, service: &str, endpoint: &str) -> Self {
        let labels = FlowLabels {
            service: service.to_string(),
            endpoint: endpoint.to_string(),
        };
        let datagrams = |direction| {
            udp.datagrams
                .get_or_create(&DatagramLabels {
                    service: service.to_string(),
                    endpoint: endpoint.to_string(),
                    direction,
                })
                .clone()
        };
        EndpointUdp {
            opened: udp.opened.get_or_create(&labels).clone(),
            active: udp.active.get_or_create(&labels).clone(),
            to_endpoint: datagrams(Direction::client_to_endpoint),
            to_client: datagrams(Direction::endpoint_to_client),
            // Made now, not when a flow ends: a flow that ends after its endpoint left
            // (and its series were removed) must not bring them back.
            ended: Ended::ALL.map(|reason| {
                udp.ended
                    .get_or_create(&EndedLabels {
                        service: service.to_string(),
                        endpoint: endpoint.to_string(),
                        reason,
                    })
                    .clone()
            }),
        }
    }

    pub fn ended(&self, reason: Ended) {
        self.ended[reason.index()].inc();
    }
}
