//! Routes, pure: which listening addresses a Service port wants for the endpoints its
//! policy lets serve, and who owns an address when two Services want it. No I/O and no
//! policy calls: `services.rs` feeds these with the policies' answers and publishes the
//! result.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use weir_sdk::{Eligibility, EmptyAction, Scope};

use crate::model::{ProtocolKey, ServiceKey, ServicePortSnapshot};
use crate::net::Cidr;
use crate::proxy::{Listen, ListenerKind, Transport};

/// Whether a scope needs its listeners: something to forward to, or connections to drop.
/// With nothing eligible and `reject`, no listener is better: the kernel refuses the
/// connection, as kube-proxy's REJECT rule does.
pub(super) fn serves(eligibility: &Eligibility, scope: Scope) -> bool {
    let set = eligibility.for_scope(scope);
    !set.endpoints.is_empty() || set.when_empty == EmptyAction::Drop
}

/// The transport that serves a Service port's protocol, if weir serves it.
pub(super) fn transport(protocol: ProtocolKey) -> Option<Transport> {
    match protocol {
        ProtocolKey::Tcp => Some(Transport::Tcp),
        ProtocolKey::Udp => Some(Transport::Udp),
        ProtocolKey::Sctp => None,
    }
}

/// What may go onto the capture interface: nothing is refused without one (file mode on
/// loopback); with one, the kinds [`refused`] names, and, when `allowed` is set, every
/// address outside it (`node.capture_allowed_cidrs`).
#[derive(Clone, Copy, Debug)]
pub(super) struct CaptureRules<'a> {
    pub(super) enabled: bool,
    pub(super) allowed: Option<&'a [Cidr]>,
}

impl CaptureRules<'_> {
    #[cfg(test)]
    pub(super) const OFF: CaptureRules<'static> = CaptureRules {
        enabled: false,
        allowed: None,
    };
    #[cfg(test)]
    pub(super) const ON: CaptureRules<'static> = CaptureRules {
        enabled: true,
        allowed: None,
    };

    /// Why `ip` may not go onto the capture interface, as the end of "{ip} is ...".
    pub(super) fn refused(&self, ip: IpAddr) -> Option<String> {
        if !self.enabled {
            return None;
        }
        if let Some(kind) = refused(ip) {
            return Some(format!("a {kind} address"));
        }
        match self.allowed {
            Some(allowed) if !allowed.iter().any(|cidr| cidr.contains(ip)) => {
                Some("outside node.capture_allowed_cidrs".to_string())
            }
            _ => None,
        }
    }
}

/// Why an externalIP or LoadBalancer IP is not taken onto the capture interface: an
/// address of that kind would become local to the node for every port (loopback hijacks
/// the node's own services, link-local its metadata server).
pub(super) fn refused(ip: IpAddr) -> Option<&'static str> {
    let ip = crate::net::canonical(ip);
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if link_local {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

/// One address a Service port wants to listen on, and how traffic there is scoped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Wanted {
    pub(super) listen: Listen,
    pub(super) scope: Scope,
    /// Only these sources may use it (LoadBalancer IPs with `loadBalancerSourceRanges`).
    pub(super) source_ranges: Vec<Cidr>,
    /// Whether a load balancer in front reaches it: a nodePort or a LoadBalancer IP.
    pub(super) from_load_balancer: bool,
}

/// The addresses a Service port listens on, as kube-proxy's rules would match them: its
/// clusterIP for internal traffic while that scope serves; its nodePort on the node's
/// addresses of its family, externalIPs and LoadBalancer IPs for external traffic while
/// either scope serves (kube-proxy sends external traffic from a node's own pods to the
/// cluster-wide set).
/// ExternalIPs and LoadBalancer IPs that `capture` refuses are left out.
pub(super) fn wanted(
    snapshot: &ServicePortSnapshot,
    eligibility: &Eligibility,
    transport: Transport,
    node_addresses: &[IpAddr],
    capture: CaptureRules,
) -> Vec<Wanted> {
    let service = &snapshot.service;
    let at = |ip: IpAddr, port: u16, scope: Scope, source_ranges: Vec<Cidr>| Wanted {
        listen: Listen {
            address: SocketAddr::new(ip, port),
            transport,
        },
        scope,
        source_ranges,
        from_load_balancer: false,
    };
    let from_load_balancer = |wanted: Wanted| Wanted {
        from_load_balancer: true,
        ..wanted
    };
    let mut wanted = Vec::new();
    if serves(eligibility, Scope::Internal) {
        wanted.push(at(
            service.cluster_ip,
            service.port,
            Scope::Internal,
            Vec::new(),
        ));
    }
    if !(serves(eligibility, Scope::External) || serves(eligibility, Scope::Internal)) {
        return wanted;
    }
    if service.node_port != 0 {
        for address in node_addresses {
            if address.is_ipv4() == service.cluster_ip.is_ipv4() {
                wanted.push(from_load_balancer(at(
                    *address,
                    service.node_port,
                    Scope::External,
                    Vec::new(),
                )));
            }
        }
    }
    let usable = |ip: &&IpAddr| capture.refused(**ip).is_none();
    for ip in service.external_ips.iter().filter(usable) {
        wanted.push(at(*ip, service.port, Scope::External, Vec::new()));
    }
    for ip in service.load_balancer_ips.iter().filter(usable) {
        let ranges = snapshot.load_balancer_source_ranges.clone();
        wanted.push(from_load_balancer(at(
            *ip,
            service.port,
            Scope::External,
            ranges,
        )));
    }
    wanted
}

/// A Service's healthCheckNodePort listeners: one per node address.
pub(super) fn health_check(node_addresses: &[IpAddr], port: u16) -> Vec<Listen> {
    (node_addresses.iter())
        .map(|address| Listen::tcp(SocketAddr::new(*address, port)))
        .collect()
}

/// `namespace/name:port`, the port by name when it has one: the metrics label.
pub(super) fn service_label(snapshot: &ServicePortSnapshot) -> String {
    let key = &snapshot.key;
    if key.port_name.is_empty() {
        format!("{}/{}:{}", key.namespace, key.name, snapshot.service.port)
    } else {
        format!("{}/{}:{}", key.namespace, key.name, key.port_name)
    }
}

/// Who owns each listening address and what listener it is, and who waits for one.
/// The outcome does not depend on the order changes come in: it is what a fresh start
/// decides, Services in name order, first come first served.
#[derive(Default)]
pub(super) struct Addresses {
    owners: HashMap<Listen, ServiceKey>,
    wanted: BTreeMap<Listen, ListenerKind>,
    /// Services that wanted an address another Service has: to apply again when freed.
    waiting: HashMap<Listen, BTreeSet<ServiceKey>>,
}

/// The answer to a claim.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// The address is the claimant's. A later Service that had it is returned: it must
    /// be applied again to find it lost.
    Granted { displaced: Option<ServiceKey> },
    /// An earlier Service has it; the claimant waits for it.
    Refused,
}

impl Addresses {
    /// Every address owned, with its listener kind: what the listeners serve.
    pub(super) fn wanted(&self) -> &BTreeMap<Listen, ListenerKind> {
        &self.wanted
    }

    #[cfg(test)]
    pub(super) fn owner(&self, address: &Listen) -> Option<&ServiceKey> {
        self.owners.get(address)
    }

    /// Takes `address` for `key`, unless a Service before it in name order (or another
    /// of its own ports) has it.
    pub(super) fn claim(&mut self, key: &ServiceKey, address: Listen, kind: ListenerKind) -> Claim {
        let mut displaced = None;
        match self.owners.get(&address) {
            Some(owner) if key < owner => {
                let owner = owner.clone();
                self.waiting
                    .entry(address)
                    .or_default()
                    .insert(owner.clone());
                displaced = Some(owner);
            }
            Some(_) => {
                self.waiting.entry(address).or_default().insert(key.clone());
                return Claim::Refused;
            }
            None => {}
        }
        self.owners.insert(address, key.clone());
        self.wanted.insert(address, kind);
        Claim::Granted { displaced }
    }

    /// Gives up `address` if `key` owns it. Returns `None` if it did not; otherwise the
    /// Services waiting for it, to apply again.
    pub(super) fn release(
        &mut self,
        key: &ServiceKey,
        address: &Listen,
    ) -> Option<BTreeSet<ServiceKey>> {
        if self.owners.get(address) != Some(key) {
            return None;
        }
        self.owners.remove(address);
        self.wanted.remove(address);
        let mut waiting = self.waiting.remove(address).unwrap_or_default();
        waiting.remove(key);
        Some(waiting)
    }
}

#[cfg(test)]
mod tests;
