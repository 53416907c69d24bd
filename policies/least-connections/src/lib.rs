//! `least-connections`: kube-proxy's eligibility, then the eligible endpoint with the
//! fewest active connections placed by this instance, the least recently chosen among
//! equals. Connections count from the moment they are forwarded (so a burst spreads at
//! once) until the host reports them closed or failed.
//!
//! No configuration. Each data-plane worker counts its own connections; with several
//! workers the balance is per worker. Picks are O(log n) (an ordered set per scope).

use std::collections::BTreeSet;

use weir_sdk::connections::ActiveConnections;
use weir_sdk::ids::IdMap;
use weir_sdk::scoped::PerScope;
use weir_sdk::{
    Capabilities, Connection, Decision, Eligibility, Endpoint, EndpointId, Node, Outcome, Policy,
    Service,
};

pub struct LeastConnections;

/// Endpoints ordered by (active connections, last chosen), per scope.
#[derive(Clone, Debug, Default)]
struct Order {
    set: BTreeSet<(u32, u64, EndpointId)>,
    key: IdMap<(u32, u64)>,
}

impl Order {
    /// Stamps `first_stamp..` in id order: fresh and older than anything touched later.
    fn new(ids: &[EndpointId], active: &ActiveConnections, first_stamp: u64) -> Self {
        let mut order = Order::default();
        for (rank, &id) in ids.iter().enumerate() {
            order.insert(id, active.get(id), first_stamp + rank as u64);
        }
        order
    }

    fn insert(&mut self, id: EndpointId, active: u32, stamp: u64) {
        self.set.insert((active, stamp, id));
        self.key.insert(id, (active, stamp));
    }

    /// Moves `id` (if present) to its new count, as the most recently touched.
    fn rekey(&mut self, id: EndpointId, active: u32, stamp: u64) {
        if let Some((old_active, old_stamp)) = self.key.get(&id).copied() {
            self.set.remove(&(old_active, old_stamp, id));
            self.insert(id, active, stamp);
        }
    }

    fn first(&self) -> Option<EndpointId> {
        self.set.first().map(|(_, _, id)| *id)
    }
}

#[derive(Debug, Default)]
pub struct State {
    active: ActiveConnections,
    order: PerScope<Order>,
    stamp: u64,
}

impl State {
    fn touch(&mut self, id: EndpointId) {
        self.stamp += 1;
        let active = self.active.get(id);
        self.order.internal.rekey(id, active, self.stamp);
        self.order.external.rekey(id, active, self.stamp);
    }
}

impl Policy for LeastConnections {
    type State = State;

    fn configure(config: &str) -> Result<Self, String> {
        if weir_sdk::config::object(config)?.is_empty() {
            Ok(LeastConnections)
        } else {
            Err(format!(
                "least-connections takes no configuration, got {config}"
            ))
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            observe_outcomes: true,
        }
    }

    fn update(
        &self,
        state: &mut State,
        service: &Service,
        node: &Node,
        endpoints: &[Endpoint],
    ) -> Eligibility {
        let eligibility = weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints);
        let known = weir_sdk::ids::ById::new(endpoints);
        state.active.retain(|id| known.contains(id));
        let active = &state.active;
        let first_stamp = state.stamp + 1;
        state.order = PerScope::build(&eligibility, |ids| Order::new(ids, active, first_stamp));
        state.stamp += endpoints.len() as u64 + 1;
        eligibility
    }

    fn select(
        &self,
        state: &mut State,
        _: &Service,
        eligible: &[EndpointId],
        connection: &Connection,
    ) -> Decision {
        let endpoint = state
            .order
            .get(connection.scope)
            .first()
            .unwrap_or(eligible[0]);
        state.active.opened(endpoint);
        state.touch(endpoint);
        Decision::Forward(endpoint)
    }

    fn observe(&self, state: &mut State, outcome: &Outcome) {
        if let Some(id) = state.active.observe(outcome) {
            state.touch(id);
        }
    }
}

weir_sdk::export_policy!(LeastConnections);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::{Driver, OutcomeKind, Scope};

    fn driver(n: u32) -> Driver<LeastConnections> {
        let mut driver = Driver::<LeastConnections>::configure("").unwrap();
        let endpoints: Vec<Endpoint> = (1..=n)
            .map(|id| Endpoint::ready(id, format!("198.18.0.{id}:8080").parse().unwrap()))
            .collect();
        let service = Service::cluster_ip("default", "web", "198.19.0.1".parse().unwrap(), 80);
        driver.update(1, service, &Node::default(), &endpoints);
        driver
    }

    fn select(driver: &mut Driver<LeastConnections>) -> EndpointId {
        let connection = Connection {
            client: "198.18.100.1:40000".parse().unwrap(),
            destination: "198.19.0.1:80".parse().unwrap(),
            scope: Scope::Internal,
        };
        match driver.select(1, &connection) {
            Decision::Forward(id) => id,
            other => panic!("{other:?}"),
        }
    }

    fn close(driver: &mut Driver<LeastConnections>, endpoint: EndpointId) {
        driver.observe(
            1,
            &Outcome {
                endpoint,
                kind: OutcomeKind::Closed,
                micros: 0,
            },
        );
    }

    #[test]
    fn a_burst_spreads_over_every_endpoint() {
        let mut d = driver(3);
        let mut got: Vec<EndpointId> = (0..6).map(|_| select(&mut d)).collect();
        got.sort();
        assert_eq!(got, vec![1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn closed_connections_free_their_endpoint() {
        let mut d = driver(3);
        let first: Vec<EndpointId> = (0..3).map(|_| select(&mut d)).collect();
        close(&mut d, first[1]);
        assert_eq!(
            select(&mut d),
            first[1],
            "the only endpoint with a free slot"
        );
    }

    #[test]
    fn long_connections_get_fewer_new_ones() {
        // Endpoint 1 holds its connections; 2 and 3 close theirs at once. Over time 1 keeps
        // its load and the others take the rest, evenly.
        let mut d = driver(3);
        let mut counts = [0u32; 4];
        for _ in 0..300 {
            let id = select(&mut d);
            counts[id as usize] += 1;
            if id != 1 {
                close(&mut d, id);
            }
        }
        assert_eq!(
            counts[1], 1,
            "the endpoint that never frees up got one connection"
        );
        assert!(counts[2].abs_diff(counts[3]) <= 1, "{counts:?}");
    }

    #[test]
    fn failed_connects_count_down_too() {
        let mut d = driver(2);
        let a = select(&mut d);
        d.observe(
            1,
            &Outcome {
                endpoint: a,
                kind: OutcomeKind::ConnectFailed,
                micros: 0,
            },
        );
        let b = select(&mut d);
        assert_ne!(a, b, "least recently chosen among equals");
        assert_eq!(select(&mut d), a);
    }
}
