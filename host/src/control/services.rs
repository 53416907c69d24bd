//! Each Service's part of what is published: its ports bound to their policies, the
//! routes and addresses that follow from the policies' answers (`routes.rs`), and its
//! health-check counts; applied, and withdrawn at its next change.

use super::routes::{self, Claim};
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
}

impl ControlPlane {
    /// Keeps the routes of addresses that just went away, for the connections their
    /// listeners accepted before closing, as long as their policies keep the ports.
    pub(super) fn retire_routes(&mut self, previous: &Routes) {
        let now = Instant::now();
        let due = now + retire_after(&self.config);
        for (address, route) in &previous.by_listen {
            if !self.routes.contains_key(address) {
                self.retired_routes.insert(*address, (due, route.clone()));
            }
        }
        let routes = &self.routes;
        self.retired_routes
            .retain(|address, (due, _)| now < *due && !routes.contains_key(address));
        self.shared.retired.store(Arc::new(
            self.retired_routes
                .iter()
                .map(|(address, (_, route))| (*address, route.clone()))
                .collect(),
        ));
    }

    /// Takes a Service's part out of the routes, listeners and health checks, and forgets
    /// its ports that are not among `ports` (its ports from now on). Returns its metric
    /// handles, to reuse.
    pub(super) fn withdraw(
        &mut self,
        key: &ServiceKey,
        ports: &[ServicePortSnapshot],
    ) -> HashMap<(String, String), Arc<RouteMetrics>> {
        let Some(old) = self.services.remove(key) else {
            return HashMap::new();
        };
        for address in &old.addresses {
            if let Some(waiting) = self.addresses.release(key, address) {
                self.routes.remove(address);
                if !waiting.is_empty() {
                    self.pending.merge(Changed::Services(waiting));
                }
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
                self.forget(handle);
            }
        }
        old.metrics
    }

    /// Puts a Service's ports into the routes, listeners and health checks, telling their
    /// policies what changed.
    pub(super) fn apply(
        &mut self,
        key: &ServiceKey,
        ports: &[ServicePortSnapshot],
        node: &Arc<weir_sdk::Node>,
        mut reusable: HashMap<(String, String), Arc<RouteMetrics>>,
    ) -> Contribution {
        let mut contribution = Contribution::default();
        // Ready endpoint IPs per family, for the healthCheckNodePort.
        let mut ready_ips: BTreeMap<FamilyKey, BTreeSet<IpAddr>> = BTreeMap::new();
        let mut health_port = None;
        for snapshot in ports {
            health_port = health_port.or(snapshot.health_check.map(|c| c.node_port));
            let service = &snapshot.service;
            contribution.service_ips.insert(service.cluster_ip);
            contribution.service_ips.extend(
                service
                    .external_ips
                    .iter()
                    .chain(&service.load_balancer_ips),
            );
            let Some(transport) = routes::transport(snapshot.key.protocol) else {
                let message = format!(
                    "{}: {} is not proxied (weir proxies TCP; UDP comes later)",
                    snapshot.service.display_name(),
                    snapshot.key.protocol.as_str()
                );
                if self.warnings.once(message.clone(), Some(key)) {
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
            let (runtime, policy_label) = self.resolve(snapshot);
            let eligibility = self.push(handle, snapshot, runtime.clone(), input);
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
                self.bound[&handle]
                    .input
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
                        &self.metrics.proxy,
                        &metrics_key.0,
                        &metrics_key.1,
                    ))
                });
            contribution.metrics.insert(metrics_key, metrics.clone());

            let wanted = routes::wanted(snapshot, &eligibility, transport, &self.node_addresses);
            for routes::Wanted {
                listen,
                scope,
                source_ranges,
            } in wanted
            {
                if !self.claim(key, listen, ListenerKind::Service, &mut contribution) {
                    let message = format!(
                        "{listen} is claimed by more than one Service port; {} does not get it",
                        service.display_name()
                    );
                    if self.warnings.once(message.clone(), Some(key)) {
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
            for address in routes::health_check(&self.node_addresses, port) {
                let kind = ListenerKind::HealthCheck {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                };
                if !self.claim(key, address, kind, &mut contribution) {
                    let message = format!(
                        "healthCheckNodePort {address} of {}/{} is taken by another Service",
                        key.0, key.1
                    );
                    if self.warnings.once(message.clone(), Some(key)) {
                        tracing::warn!("{message}");
                    }
                }
            }
        }
        contribution
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
                if let Some(owner) = displaced {
                    self.pending.merge(Changed::Services([owner].into()));
                }
                contribution.addresses.push(address);
                true
            }
        }
    }
}
