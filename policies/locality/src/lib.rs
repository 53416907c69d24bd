//! `locality`: kube-proxy's eligibility, then the closest eligible endpoints: those on this
//! node, else those in this node's zone, else any, spilling outwards when the closer set
//! is too small a share of the eligible endpoints or too busy. Random within the set used.
//!
//! Configuration (`weir.dev/policy-config`, JSON; every key optional):
//! - `min_fraction`: a closer set is used only when it holds at least this fraction of
//!   the scope's eligible endpoints (default 0: any non-empty set).
//! - `max_connections_per_endpoint`: a closer set is skipped while its endpoints hold, on
//!   average, at least this many active connections from this instance (default 0: off).
//!
//! Zones come from the node's `topology.kubernetes.io/zone` label and each endpoint's
//! `zone`. Unlike topology hints, this needs no EndpointSlice controller support.

use serde::Deserialize;
use weir_sdk::config::Layered;
use weir_sdk::connections::ActiveConnections;
use weir_sdk::ids::IdMap;
use weir_sdk::scoped::PerScope;
use weir_sdk::{
    Capabilities, Connection, Decision, Eligibility, Endpoint, EndpointId, Node, Outcome, Policy,
    Service,
};

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub min_fraction: f64,
    pub max_connections_per_endpoint: u32,
}

pub struct Locality {
    settings: Layered<Settings>,
}

/// Node, zone, everything.
const TIERS: usize = 3;

/// One scope's sets, closest first, and the active connections each holds.
#[derive(Clone, Debug, Default)]
struct Tiers {
    sets: [Vec<EndpointId>; TIERS],
    /// Which sets an endpoint is in (bit per tier).
    membership: IdMap<u8>,
    active: [u64; TIERS],
    /// Big enough against `min_fraction`.
    large_enough: [bool; TIERS],
}

impl Tiers {
    fn new(
        ids: &[EndpointId],
        endpoints: &[Endpoint],
        zone: &str,
        settings: &Settings,
        active: &ActiveConnections,
    ) -> Self {
        let by_id = weir_sdk::ids::ById::new(endpoints);
        let mut tiers = Tiers::default();
        for &id in ids {
            let Some(e) = by_id.get(id) else {
                continue;
            };
            let same_zone = !zone.is_empty() && e.zone.as_deref() == Some(zone);
            let mask = u8::from(e.is_local) | u8::from(e.is_local || same_zone) << 1 | 1 << 2;
            tiers.membership.insert(id, mask);
            for t in 0..TIERS {
                if mask & (1 << t) != 0 {
                    tiers.sets[t].push(id);
                    tiers.active[t] += u64::from(active.get(id));
                }
            }
        }
        let total = ids.len() as f64;
        for t in 0..TIERS {
            let len = tiers.sets[t].len();
            tiers.large_enough[t] = len > 0 && len as f64 >= settings.min_fraction * total;
        }
        tiers
    }

    fn adjust(&mut self, id: EndpointId, up: bool) {
        let mask = self.membership.get(&id).copied().unwrap_or(0);
        for t in 0..TIERS {
            if mask & (1 << t) != 0 {
                self.active[t] = if up {
                    self.active[t] + 1
                } else {
                    self.active[t].saturating_sub(1)
                };
            }
        }
    }

    /// The closest set that is large enough and not too busy; everything as a last resort.
    fn chosen(&self, max_per_endpoint: u32) -> &[EndpointId] {
        for t in 0..TIERS - 1 {
            let busy = max_per_endpoint > 0
                && self.active[t] >= u64::from(max_per_endpoint) * self.sets[t].len() as u64;
            if self.large_enough[t] && !busy {
                return &self.sets[t];
            }
        }
        &self.sets[TIERS - 1]
    }
}

#[derive(Debug, Default)]
pub struct State {
    settings: Option<Settings>,
    active: ActiveConnections,
    tiers: PerScope<Tiers>,
}

impl Policy for Locality {
    type State = State;

    fn configure(config: &str) -> Result<Self, String> {
        Ok(Locality {
            settings: Layered::configure(config)?,
        })
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
        let settings = self.settings.for_service(service, state.settings.as_ref());
        let known = weir_sdk::ids::ById::new(endpoints);
        state.active.retain(|id| known.contains(id));
        let active = &state.active;
        state.tiers = PerScope::build(&eligibility, |ids| {
            Tiers::new(ids, endpoints, node.zone(), &settings, active)
        });
        state.settings = Some(settings);
        eligibility
    }

    fn select(
        &self,
        state: &mut State,
        _: &Service,
        eligible: &[EndpointId],
        connection: &Connection,
    ) -> Decision {
        let limit = state
            .settings
            .as_ref()
            .map_or(0, |s| s.max_connections_per_endpoint);
        let set = state.tiers.get(connection.scope).chosen(limit);
        let endpoint = if set.is_empty() {
            eligible[0]
        } else {
            set[weir_sdk::random_below(set.len())]
        };
        self.forwarded(state, endpoint);
        Decision::Forward(endpoint)
    }

    fn forwarded(&self, state: &mut State, endpoint: EndpointId) {
        state.active.opened(endpoint);
        for tiers in state.tiers.each_mut() {
            tiers.adjust(endpoint, true);
        }
    }

    fn observe(&self, state: &mut State, outcome: &Outcome) {
        if let Some(id) = state.active.observe(outcome) {
            for tiers in state.tiers.each_mut() {
                tiers.adjust(id, false);
            }
        }
    }
}

weir_sdk::export_policy!(Locality);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::host::testing::seed_random;
    use weir_sdk::{Driver, OutcomeKind, Scope, ZONE_LABEL};

    /// Endpoint 1 on this node (zone a), 2 and 3 elsewhere in zone a, 4 to 7 in zone b.
    fn endpoints() -> Vec<Endpoint> {
        (1..=7)
            .map(|id| Endpoint {
                is_local: id == 1,
                node_name: Some(if id == 1 { "node-a" } else { "other" }.into()),
                zone: Some(if id <= 3 { "a" } else { "b" }.into()),
                ..Endpoint::ready(id, format!("198.18.0.{id}:8080").parse().unwrap())
            })
            .collect()
    }

    fn driver(config: Option<&str>) -> Driver<Locality> {
        let mut driver = Driver::<Locality>::configure("").unwrap();
        let service = Service {
            config: config.map(str::to_string),
            ..Service::cluster_ip("default", "web", "198.19.0.1".parse().unwrap(), 80)
        };
        let node = Node {
            name: "node-a".into(),
            labels: vec![(ZONE_LABEL.into(), "a".into())],
        };
        driver.update(1, service, &node, &endpoints());
        driver
    }

    fn picks(driver: &mut Driver<Locality>, n: usize, close: bool) -> [u32; 8] {
        let connection = Connection {
            client: "198.18.100.1:40000".parse().unwrap(),
            destination: "198.19.0.1:80".parse().unwrap(),
            scope: Scope::Internal,
        };
        let mut counts = [0u32; 8];
        for _ in 0..n {
            let Decision::Forward(id) = driver.select(1, &connection) else {
                panic!()
            };
            counts[id as usize] += 1;
            if close {
                driver.observe(
                    1,
                    &Outcome {
                        endpoint: id,
                        kind: OutcomeKind::Closed,
                        micros: 0,
                    },
                );
            }
        }
        counts
    }

    #[test]
    fn prefers_this_node() {
        seed_random(31);
        let counts = picks(&mut driver(None), 100, true);
        assert_eq!(counts[1], 100);
    }

    #[test]
    fn spills_to_the_zone_when_this_node_is_too_small_a_share() {
        seed_random(32);
        // One local endpoint of seven is 14%: below 20%, so zone a (three of seven) is used.
        let counts = picks(&mut driver(Some(r#"{"min_fraction": 0.2}"#)), 3000, true);
        assert_eq!(counts[4..].iter().sum::<u32>(), 0, "{counts:?}");
        for id in 1..=3 {
            assert!((850..1150).contains(&counts[id]), "{counts:?}");
        }
    }

    #[test]
    fn spills_to_everything_when_the_zone_is_too_small_too() {
        seed_random(33);
        let counts = picks(&mut driver(Some(r#"{"min_fraction": 0.5}"#)), 7000, true);
        for id in 1..=7 {
            assert!((850..1150).contains(&counts[id]), "{counts:?}");
        }
    }

    #[test]
    fn spills_when_the_closer_set_is_busy() {
        seed_random(34);
        // Connections stay open. The local endpoint takes 2; then zone a (endpoints 1 to 3)
        // until they average 2; then everything.
        let mut d = driver(Some(r#"{"max_connections_per_endpoint": 2}"#));
        let connection = Connection {
            client: "198.18.100.1:40000".parse().unwrap(),
            destination: "198.19.0.1:80".parse().unwrap(),
            scope: Scope::Internal,
        };
        let order: Vec<EndpointId> = (0..20)
            .map(|_| match d.select(1, &connection) {
                Decision::Forward(id) => id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(order[..2], [1, 1], "{order:?}");
        assert!(
            order[2..6].iter().all(|id| (1..=3).contains(id)),
            "{order:?}"
        );
        assert!(order[6..].iter().any(|id| *id >= 4), "{order:?}");
        // Closing connections brings traffic home again.
        for _ in 0..20 {
            for id in 1..=7 {
                d.observe(
                    1,
                    &Outcome {
                        endpoint: id,
                        kind: OutcomeKind::Closed,
                        micros: 0,
                    },
                );
            }
        }
        assert_eq!(d.select(1, &connection), Decision::Forward(1));
    }
}
