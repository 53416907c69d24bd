//! `least-connections`: kube-proxy's eligibility, then the eligible endpoint with the
//! fewest active connections placed by this instance; among equals, the one whose count
//! changed longest ago (order starts over, by id, at each update). Connections count from
//! the moment they are forwarded (so a burst spreads at once) until the host reports them
//! closed or failed.
//!
//! No configuration. The host gives each Service port one instance, which every
//! data-plane worker asks, so the counts are the port's whole. Picks are O(log k) for k
//! distinct counts: endpoints
//! sit in buckets by active count, each bucket a list in the order described above.

use std::collections::BTreeMap;

use weir_sdk::connections::ActiveConnections;
use weir_sdk::ids::IdMap;
use weir_sdk::scoped::PerScope;
use weir_sdk::{
    Capabilities, Connection, Decision, Eligibility, Endpoint, EndpointId, LogLevel, Node, Outcome,
    Policy, Service,
};

pub struct LeastConnections;

const NIL: u32 = u32::MAX;

/// One scope's endpoints in buckets by active connections (only non-empty buckets are
/// kept, so a count in the millions costs nothing); within a bucket, a doubly linked list
/// by slot index.
#[derive(Clone, Debug, Default)]
struct Buckets {
    slot: IdMap<u32>,
    ids: Vec<EndpointId>,
    count: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    /// Count -> (head, tail).
    lists: BTreeMap<u32, (u32, u32)>,
}

impl Buckets {
    fn new(ids: &[EndpointId], active: &ActiveConnections) -> Self {
        let mut buckets = Buckets::default();
        for &id in ids {
            let slot = buckets.ids.len() as u32;
            buckets.slot.insert(id, slot);
            buckets.ids.push(id);
            buckets.count.push(active.get(id));
            buckets.prev.push(NIL);
            buckets.next.push(NIL);
            buckets.push_back(slot);
        }
        buckets
    }

    fn push_back(&mut self, slot: u32) {
        let count = self.count[slot as usize];
        self.next[slot as usize] = NIL;
        match self.lists.get_mut(&count) {
            None => {
                self.prev[slot as usize] = NIL;
                self.lists.insert(count, (slot, slot));
            }
            Some((_, tail)) => {
                self.prev[slot as usize] = *tail;
                self.next[*tail as usize] = slot;
                *tail = slot;
            }
        }
    }

    fn unlink(&mut self, slot: u32) {
        let count = self.count[slot as usize];
        let (prev, next) = (self.prev[slot as usize], self.next[slot as usize]);
        if prev != NIL {
            self.next[prev as usize] = next;
        }
        if next != NIL {
            self.prev[next as usize] = prev;
        }
        match (prev, next) {
            (NIL, NIL) => {
                self.lists.remove(&count);
            }
            _ => {
                let list = self.lists.get_mut(&count).expect("slot's bucket exists");
                if prev == NIL {
                    list.0 = next;
                }
                if next == NIL {
                    list.1 = prev;
                }
            }
        }
    }

    /// Moves `id` (if present) to `count`, at the back of its new bucket.
    fn set(&mut self, id: EndpointId, count: u32) {
        if let Some(&slot) = self.slot.get(&id) {
            self.unlink(slot);
            self.count[slot as usize] = count;
            self.push_back(slot);
        }
    }

    fn first(&self) -> Option<EndpointId> {
        self.lists
            .first_key_value()
            .map(|(_, (head, _))| self.ids[*head as usize])
    }
}

#[derive(Debug, Default)]
pub struct State {
    active: ActiveConnections,
    buckets: PerScope<Buckets>,
}

impl State {
    fn touch(&mut self, id: EndpointId) {
        let count = self.active.get(id);
        for buckets in self.buckets.each_mut() {
            buckets.set(id, count);
        }
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
        if service
            .config
            .as_deref()
            .is_some_and(|c| !c.trim().is_empty() && c.trim() != "{}")
        {
            weir_sdk::log(
                LogLevel::Warn,
                &format!(
                    "weir.dev/policy-config of {}: least-connections takes no settings; ignored",
                    service.display_name()
                ),
            );
        }
        let known = weir_sdk::ids::ById::new(endpoints);
        state.active.retain(|id| known.contains(id));
        let active = &state.active;
        state.buckets = PerScope::build(&eligibility, |ids| Buckets::new(ids, active));
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
            .buckets
            .get(connection.scope)
            .first()
            .unwrap_or(eligible[0]);
        self.forwarded(state, endpoint);
        Decision::Forward(endpoint)
    }

    fn forwarded(&self, state: &mut State, endpoint: EndpointId) {
        state.active.opened(endpoint);
        state.touch(endpoint);
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
        let mut d = driver(3);
        let picks: Vec<EndpointId> = (0..3).map(|_| select(&mut d)).collect();
        assert_eq!(picks, vec![1, 2, 3]);
        // Endpoint 2's connection failed: it is the only one back at zero.
        d.observe(
            1,
            &Outcome {
                endpoint: 2,
                kind: OutcomeKind::ConnectFailed,
                micros: 0,
            },
        );
        assert_eq!(select(&mut d), 2);
    }

    #[test]
    fn counts_in_the_millions_cost_nothing() {
        let mut d = driver(2);
        for _ in 0..100_000 {
            select(&mut d);
        }
        let one = select(&mut d);
        assert!(one == 1 || one == 2);
    }
}
