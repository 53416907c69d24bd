//! Each Service's part of what is published: its ports bound to their policies, the
//! routes and addresses that follow from the policies' answers (`routes.rs`), and its
//! health-check counts; applied, and withdrawn at its next change.

use std::time::Duration;

use super::bindings::{Binding, Bindings, Context};
use super::routes::{self, Addresses, CaptureRules, Claim};
use super::*;

/// What one Service puts into the data plane, kept to take it out at its next change.
#[derive(Default)]
pub(super) struct Contribution {
    /// Its proxied ports and their handles.
    pub(super) ports: Vec<(ServicePortKey, ServiceHandle)>,
    /// The listening addresses it owns (service and health check).
    pub(super) addresses: Vec<Listen>,
    /// Its addresses: ClusterIPs, externalIPs, LoadBalancer IPs.
    pub(super) service_ips: BTreeSet<IpAddr>,
    /// Its ports with a Local traffic policy and no local endpoints: internal, external.
    pub(super) no_local: [i64; 2],
    pub(super) metrics: HashMap<(String, String), Arc<RouteMetrics>>,
    /// Its externalIPs and LoadBalancer IPs refused for the capture interface.
    pub(super) refused: i64,
}

/// What the Services put into the data plane: each one's part, and the whole that is
/// published from them.
#[derive(Default)]
pub(super) struct Published {
    /// Each Service's part, to take out at its next change.
    pub(super) services: HashMap<ServiceKey, Contribution>,
    pub(super) routes: RouteMap,
    /// Who owns each listening address, and who waits for one.
    pub(super) addresses: Addresses,
    pub(super) health_counts: HashMap<ServiceKey, usize>,
    pub(super) no_local: [i64; 2],
    /// Every address of the Services proxied (ClusterIPs, externalIPs, LB IPs), with the
    /// number of Services that have it: what the capture interface holds, listened on or
    /// not (a Service with no endpoints has no listener, and its address must still be
    /// local, so that connections are refused rather than routed off the node).
    pub(super) service_ips: HashMap<IpAddr, usize>,
    /// Stable handles and endpoint ids of the service ports.
    identities: Identities,
    /// Routes of addresses that went away, until their ports leave their policies.
    retired_routes: HashMap<Listen, (Instant, Arc<Route>)>,
    /// Services to apply again: an address they wanted was freed, or taken over.
    pub(super) reapply: BTreeSet<ServiceKey>,
}

impl Published {
    /// Rebuilds the part of every Service that `changed` touches from `model`: all of
    /// them are withdrawn before any is applied, so an address one gives up is free for
    /// another.
    pub(super) fn rebuild(
        &mut self,
        bindings: &mut Bindings,
        cx: &mut Context,
        changed: &Changed,
        model: Model,
        node_addresses: &[IpAddr],
        capture: CaptureRules,
    ) {
        let mut by_service: BTreeMap<ServiceKey, Vec<ServicePortSnapshot>> = BTreeMap::new();
        for port in model.ports {
            let key = (port.key.namespace.clone(), port.key.name.clone());
            by_service.entry(key).or_default().push(port);
        }
        let affected: BTreeSet<ServiceKey> = match changed {
            Changed::Nothing => BTreeSet::new(),
            Changed::Services(keys) => keys.clone(),
            Changed::Everything => (self.services.keys().chain(by_service.keys()))
                .cloned()
                .collect(),
        };
        let mut withdrawn = Vec::with_capacity(affected.len());
        for key in affected {
            let ports = by_service.remove(&key).unwrap_or_default();
            let metrics = self.withdraw(bindings, cx.metrics, &key, &ports);
            withdrawn.push((key, ports, metrics));
        }
        for (key, ports, metrics) in withdrawn {
            let unused = if ports.is_empty() {
                metrics
            } else {
                self.apply(
                    bindings,
                    cx,
                    &key,
                    &ports,
                    &model.node,
                    node_addresses,
                    capture,
                    metrics,
                )
            };
            // Series of service ports that are gone leave /metrics with them; a port
            // that only changed policy keeps its series under the new handles.
            let kept = self.services.get(&key).map(|c| &c.metrics);
            for ((service, _), metrics) in unused {
                if !kept.is_some_and(|kept| kept.keys().any(|(s, _)| *s == service)) {
                    metrics.forget();
                }
            }
        }
    }

    /// Keeps the routes of addresses that just went away, for the connections their
    /// listeners accepted before closing, as long as their policies keep the ports.
    pub(super) fn retire_routes(
        &mut self,
        previous: &Routes,
        retire_after: Duration,
        shared: &Shared,
    ) {
        let now = Instant::now();
        let due = now + retire_after;
        for (address, route) in &previous.by_listen {
            if !self.routes.contains_key(address) {
                self.retired_routes.insert(*address, (due, route.clone()));
            }
        }
        let routes = &self.routes;
        self.retired_routes
            .retain(|address, (due, _)| now < *due && !routes.contains_key(address));
        shared.retired.store(Arc::new(
            self.retired_routes
                .iter()
                .map(|(address, (_, route))| (*address, route.clone()))
                .collect(),
        ));
    }

    /// Takes a Service's part out of the routes, listeners and health checks, and forgets
    /// its ports that are not among `ports` (its ports from now on). Returns its metric
    /// handles, to reuse.
    fn withdraw(
        &mut self,
        bindings: &mut Bindings,
        metrics: &Metrics,
        key: &ServiceKey,
        ports: &[ServicePortSnapshot],
    ) -> HashMap<(String, String), Arc<RouteMetrics>> {
        let Some(old) = self.services.remove(key) else {
            return HashMap::new();
        };
        for address in &old.addresses {
            if let Some(waiting) = self.addresses.release(key, address) {
                self.routes.remove(address);
                self.reapply.extend(waiting);
            }
        }
        self.health_counts.remove(key);
        for ip in &old.service_ips {
            if let Some(count) = self.service_ips.get_mut(ip) {
                *count -= 1;
                if *count == 0 {
                    self.service_ips.remove(ip);
                }
            }
        }
        self.no_local[0] -= old.no_local[0];
        self.no_local[1] -= old.no_local[1];
        let kept: HashSet<&ServicePortKey> = ports
            .iter()
            .filter(|p| routes::transport(p.key.protocol).is_some())
            .map(|p| &p.key)
            .collect();
        for (port, handle) in old.ports {
            if !kept.contains(&port) {
                self.identities.forget(&port);
                bindings.forget(handle, metrics);
            }
        }
        old.metrics
    }

    /// Puts a Service's ports into the routes, listeners and health checks, telling their
    /// policies what changed. Returns the metric handles it did not reuse.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        bindings: &mut Bindings,
        cx: &mut Context,
        key: &ServiceKey,
        ports: &[ServicePortSnapshot],
        node: &Arc<weir_sdk::Node>,
        node_addresses: &[IpAddr],
        capture: CaptureRules,
        mut reusable: HashMap<(String, String), Arc<RouteMetrics>>,
    ) -> HashMap<(String, String), Arc<RouteMetrics>> {
        let mut contribution = Contribution::default();
        // Ready endpoint IPs per family, for the healthCheckNodePort.
        let mut ready_ips: BTreeMap<FamilyKey, BTreeSet<IpAddr>> = BTreeMap::new();
        let mut health_port = None;
        for snapshot in ports {
            health_port = health_port.or(snapshot.health_check.map(|c| c.node_port));
            let service = &snapshot.service;
            contribution.service_ips.insert(service.cluster_ip);
            for ip in service
                .external_ips
                .iter()
                .chain(&service.load_balancer_ips)
            {
                match capture.refused(*ip) {
                    None => {
                        contribution.service_ips.insert(*ip);
                    }
                    Some(kind) => {
                        let message = format!(
                            "{}: {ip} is {kind}: not put on the capture interface nor served (it would become the node's own for every port); use a routable address",
                            service.display_name()
                        );
                        contribution.refused += 1;
                        refuse_address(cx, key, message);
                    }
                }
            }
            let Some(transport) = routes::transport(snapshot.key.protocol) else {
                let message = format!(
                    "{}: {} is not proxied (weir proxies TCP and UDP)",
                    snapshot.service.display_name(),
                    snapshot.key.protocol.as_str()
                );
                if cx.warnings.once(message.clone(), Some(key)) {
                    tracing::warn!("{message}");
                }
                // Not proxied, but its Service's health check counts it, as kube-proxy's.
                ready_ips.entry(snapshot.key.family).or_default().extend(
                    snapshot
                        .endpoints
                        .iter()
                        .filter(|e| e.ready && e.is_local)
                        .map(|e| e.address.ip()),
                );
                continue;
            };
            let (handle, endpoints) = self.identities.assign(snapshot);
            contribution.ports.push((snapshot.key.clone(), handle));
            let input = snapshot.input(node.clone(), endpoints);
            let has_any = input.endpoints.iter().any(|e| e.ready || e.serving);
            let Binding {
                runtime,
                label: policy_label,
                eligibility,
            } = bindings.bind(cx, handle, snapshot, input);
            if has_any
                && service.internal_traffic_local
                && eligibility.internal.endpoints.is_empty()
            {
                contribution.no_local[0] += 1;
            }
            if has_any
                && service.external_traffic_local
                && eligibility.external.endpoints.is_empty()
            {
                contribution.no_local[1] += 1;
            }
            // kube-proxy counts this node's ready endpoints; weir counts the ready
            // endpoints the policy lets serve external traffic (the same, for kube-default).
            let external = &eligibility.external.endpoints;
            ready_ips.entry(snapshot.key.family).or_default().extend(
                (bindings.get(&handle).expect("bound above").input)
                    .endpoints
                    .iter()
                    .filter(|e| e.ready && external.binary_search(&e.id).is_ok())
                    .map(|e| e.address.ip()),
            );

            let metrics_key = (routes::service_label(snapshot), policy_label);
            let metrics = reusable
                .remove(&metrics_key)
                .or_else(|| contribution.metrics.get(&metrics_key).cloned())
                .unwrap_or_else(|| {
                    Arc::new(RouteMetrics::new(
                        &cx.metrics.proxy,
                        &metrics_key.0,
                        &metrics_key.1,
                    ))
                });
            contribution.metrics.insert(metrics_key, metrics.clone());
            // Endpoints that left take their series with them.
            let present: HashSet<std::net::SocketAddr> =
                snapshot.endpoints.iter().map(|e| e.address).collect();
            metrics.retain_endpoints(|address| present.contains(&address));

            let wanted = routes::wanted(snapshot, &eligibility, transport, node_addresses, capture);
            // Only routes that externalTrafficPolicy Local keeps here may use it.
            let local_endpoints: Arc<HashSet<std::net::SocketAddr>> =
                Arc::new(if service.external_traffic_local {
                    (snapshot.endpoints.iter())
                        .filter(|e| e.is_local)
                        .map(|e| e.address)
                        .collect()
                } else {
                    HashSet::new()
                });
            for routes::Wanted {
                listen,
                scope,
                source_ranges,
                from_load_balancer,
            } in wanted
            {
                if !self.claim(key, listen, ListenerKind::Service, &mut contribution) {
                    let message = format!(
                        "{listen} is claimed by more than one Service port; {} does not get it",
                        service.display_name()
                    );
                    if cx.warnings.once(message.clone(), Some(key)) {
                        tracing::warn!("{message}");
                    }
                    continue;
                }
                self.routes.insert(
                    listen,
                    Arc::new(Route {
                        handle,
                        policy: runtime.clone(),
                        scope,
                        local_sources_use_cluster: service.external_traffic_local,
                        source_ranges,
                        udp_timeout: snapshot.udp_timeout,
                        idle_timeout: snapshot.idle_timeout,
                        proxy_protocol: snapshot.proxy_protocol,
                        accept_proxy_protocol: snapshot.accept_proxy_protocol && from_load_balancer,
                        // External traffic only: the clients of internal traffic are pods,
                        // and a pod on the same bridge as the endpoint would get the
                        // endpoint's replies directly, around weir (unless br_netfilter
                        // sends bridged packets through the node's firewall).
                        transparent: scope == weir_sdk::Scope::External
                            && service.external_traffic_local,
                        local_endpoints: local_endpoints.clone(),
                        http: snapshot.http,
                        forwarded_for: snapshot.forwarded_for,
                        metrics: metrics.clone(),
                    }),
                );
            }
        }
        self.no_local[0] += contribution.no_local[0];
        self.no_local[1] += contribution.no_local[1];
        for ip in &contribution.service_ips {
            *self.service_ips.entry(*ip).or_default() += 1;
        }
        if let Some(port) = health_port {
            // One server per Service, counting one family (IPv4 when it has it), as
            // kube-proxy's single health check server does.
            let count = ready_ips.values().next().map_or(0, BTreeSet::len);
            self.health_counts.insert(key.clone(), count);
            for address in routes::health_check(node_addresses, port) {
                let kind = ListenerKind::HealthCheck {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                };
                if !self.claim(key, address, kind, &mut contribution) {
                    let message = format!(
                        "healthCheckNodePort {address} of {}/{} is taken by another Service",
                        key.0, key.1
                    );
                    if cx.warnings.once(message.clone(), Some(key)) {
                        tracing::warn!("{message}");
                    }
                }
            }
        }
        self.services.insert(key.clone(), contribution);
        reusable
    }

    /// Takes a listening address for a Service (see [`routes::Addresses::claim`]); a
    /// Service it displaces is applied again.
    fn claim(
        &mut self,
        key: &ServiceKey,
        address: Listen,
        kind: ListenerKind,
        contribution: &mut Contribution,
    ) -> bool {
        match self.addresses.claim(key, address, kind) {
            Claim::Refused => false,
            Claim::Granted { displaced } => {
                self.reapply.extend(displaced);
                contribution.addresses.push(address);
                true
            }
        }
    }
}

/// A Service's externalIP or LoadBalancer IP refused: said once while it lasts, with a
/// Warning Event on the Service (Kubernetes mode); `weir_refused_addresses` counts them.
fn refuse_address(cx: &mut Context, key: &ServiceKey, message: String) {
    if cx.warnings.once(message.clone(), Some(key)) {
        tracing::warn!("{message}");
        if let Some(kube) = cx.kube {
            kube.announce(Announcement {
                subject: kube.service_subject(key),
                warning: true,
                reason: "AddressRefused",
                action: "Capture",
                note: message,
            });
        }
    }
}
