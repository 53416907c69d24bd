//! `p2c-ewma`: kube-proxy's eligibility, then the better of two random eligible endpoints
//! by cost = peak-EWMA connect latency × (active connections + 1), as Linkerd balances.
//!
//! The latency estimate jumps up at once to a slower sample (peak) and decays towards
//! faster ones with time constant `decay_seconds`; a failed connect counts as a sample of
//! `failure_penalty_ms`. Endpoints never measured cost `default_rtt_ms`.
//!
//! Configuration (`weir.dev/policy-config`, JSON; every key optional):
//! - `decay_seconds` (default 10), `default_rtt_ms` (default 30),
//!   `failure_penalty_ms` (default 1000).

use serde::Deserialize;
use weir_sdk::config::Layered;
use weir_sdk::connections::ActiveConnections;
use weir_sdk::ids::IdMap;
use weir_sdk::{
    Capabilities, Connection, Decision, Eligibility, Endpoint, EndpointId, Node, Outcome,
    OutcomeKind, Policy, Service,
};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub decay_seconds: f64,
    pub default_rtt_ms: f64,
    pub failure_penalty_ms: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            decay_seconds: 10.0,
            default_rtt_ms: 30.0,
            failure_penalty_ms: 1000.0,
        }
    }
}

pub struct P2cEwma {
    settings: Layered<Settings>,
}

#[derive(Clone, Copy, Debug)]
struct Estimate {
    micros: f64,
    stamp_nanos: u64,
}

#[derive(Debug, Default)]
pub struct State {
    settings: Settings,
    configured: bool,
    active: ActiveConnections,
    estimates: IdMap<Estimate>,
}

impl State {
    /// The estimate for `id` decayed to `now`: an endpoint not heard from drifts back
    /// towards being tried, so a past slow spell is not held against it forever.
    fn latency(&self, id: EndpointId, now: u64) -> f64 {
        match self.estimates.get(&id) {
            None => self.settings.default_rtt_ms * 1000.0,
            Some(e) => e.micros * decay_factor(e.stamp_nanos, now, self.settings.decay_seconds),
        }
    }

    fn cost(&self, id: EndpointId, now: u64) -> f64 {
        self.latency(id, now) * f64::from(self.active.get(id) + 1)
    }

    /// Peak EWMA: a slower sample replaces the estimate at once; a faster one pulls it
    /// down by how long it has been since the last sample.
    fn sample(&mut self, id: EndpointId, micros: f64, now: u64) {
        let tau = self.settings.decay_seconds;
        let estimate = self.estimates.entry(id).or_insert(Estimate {
            micros,
            stamp_nanos: now,
        });
        let w = decay_factor(estimate.stamp_nanos, now, tau);
        let decayed = estimate.micros * w;
        estimate.micros = if micros > decayed {
            micros
        } else {
            decayed + micros * (1.0 - w)
        };
        estimate.stamp_nanos = now;
    }
}

/// e^(-Δt/τ): how much of the old estimate remains after Δt.
fn decay_factor(then: u64, now: u64, tau_seconds: f64) -> f64 {
    if tau_seconds <= 0.0 {
        return 1.0;
    }
    let dt = now.saturating_sub(then) as f64 / 1e9;
    (-dt / tau_seconds).exp()
}

impl Policy for P2cEwma {
    type State = State;

    fn configure(config: &str) -> Result<Self, String> {
        Ok(P2cEwma {
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
        let last = state.configured.then_some(&state.settings);
        let settings = self.settings.for_service(service, last);
        state.settings = settings;
        state.configured = true;
        let known = weir_sdk::ids::ById::new(endpoints);
        state.active.retain(|id| known.contains(id));
        state.estimates.retain(|id, _| known.contains(*id));
        // A new endpoint starts at the default estimate and decays like any other, so a
        // scale-up's new pods are tried as soon as the others' estimates drift past it.
        let now = weir_sdk::now_nanos();
        let default = state.settings.default_rtt_ms * 1000.0;
        for e in endpoints {
            state.estimates.entry(e.id).or_insert(Estimate {
                micros: default,
                stamp_nanos: now,
            });
        }
        weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints)
    }

    fn select(
        &self,
        state: &mut State,
        _: &Service,
        eligible: &[EndpointId],
        _: &Connection,
    ) -> Decision {
        let endpoint = if eligible.len() == 1 {
            eligible[0]
        } else {
            let a = weir_sdk::random_below(eligible.len());
            let b = (a + 1 + weir_sdk::random_below(eligible.len() - 1)) % eligible.len();
            let now = weir_sdk::now_nanos();
            let (a, b) = (eligible[a], eligible[b]);
            if state.cost(b, now) < state.cost(a, now) {
                b
            } else {
                a
            }
        };
        self.forwarded(state, endpoint);
        Decision::Forward(endpoint)
    }

    fn forwarded(&self, state: &mut State, endpoint: EndpointId) {
        state.active.opened(endpoint);
    }

    fn observe(&self, state: &mut State, outcome: &Outcome) {
        let now = weir_sdk::now_nanos();
        match outcome.kind {
            OutcomeKind::Connected => state.sample(outcome.endpoint, outcome.micros as f64, now),
            OutcomeKind::ConnectFailed => {
                let penalty = state.settings.failure_penalty_ms * 1000.0;
                state.sample(outcome.endpoint, penalty, now);
            }
            OutcomeKind::Closed => {}
        }
        state.active.observe(outcome);
    }
}

weir_sdk::export_policy!(P2cEwma);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::host::testing::{seed_random, set_clock};
    use weir_sdk::{Driver, Scope};

    const MS: u64 = 1_000_000;

    fn driver(n: u32) -> Driver<P2cEwma> {
        let mut driver = Driver::<P2cEwma>::configure("").unwrap();
        let endpoints: Vec<Endpoint> = (1..=n)
            .map(|id| Endpoint::ready(id, format!("198.18.0.{id}:8080").parse().unwrap()))
            .collect();
        let service = Service::cluster_ip("default", "web", "198.19.0.1".parse().unwrap(), 80);
        driver.update(1, service, &Node::default(), &endpoints);
        driver
    }

    /// One connection: select, then connect with the endpoint's latency, then close.
    fn connect(driver: &mut Driver<P2cEwma>, latency_ms: impl Fn(EndpointId) -> u64) -> EndpointId {
        let connection = Connection {
            client: "198.18.100.1:40000".parse().unwrap(),
            destination: "198.19.0.1:80".parse().unwrap(),
            scope: Scope::Internal,
        };
        let Decision::Forward(id) = driver.select(1, &connection) else {
            panic!()
        };
        let micros = latency_ms(id) * 1000;
        driver.observe(
            1,
            &Outcome {
                endpoint: id,
                kind: OutcomeKind::Connected,
                micros,
            },
        );
        driver.observe(
            1,
            &Outcome {
                endpoint: id,
                kind: OutcomeKind::Closed,
                micros: 0,
            },
        );
        id
    }

    #[test]
    fn a_slow_endpoint_gets_little_traffic() {
        seed_random(21);
        set_clock(Some(0));
        let mut d = driver(4);
        let mut counts = [0u32; 5];
        for i in 0..4000u64 {
            set_clock(Some(i * MS));
            let id = connect(&mut d, |id| if id == 4 { 200 } else { 2 });
            counts[id as usize] += 1;
        }
        set_clock(None);
        // Two random candidates: the slow one wins only against itself, never.
        assert!(counts[4] < 200, "slow endpoint got {counts:?}");
        for fast in 1..=3 {
            assert!(counts[fast] > 1000, "{counts:?}");
        }
    }

    #[test]
    fn a_recovered_endpoint_is_tried_again() {
        seed_random(22);
        set_clock(Some(0));
        let mut d = driver(2);
        for i in 0..100u64 {
            set_clock(Some(i * MS));
            connect(&mut d, |id| if id == 2 { 500 } else { 5 });
        }
        // A minute later endpoint 2's bad estimate has decayed below endpoint 1's.
        set_clock(Some(60_000 * MS));
        let mut seen_two = false;
        for i in 0..50u64 {
            set_clock(Some(60_000 * MS + i * MS));
            seen_two |= connect(&mut d, |_| 5) == 2;
        }
        set_clock(None);
        assert!(seen_two);
    }

    #[test]
    fn failed_connects_push_an_endpoint_away() {
        seed_random(23);
        set_clock(Some(0));
        let mut d = driver(2);
        let connection = Connection {
            client: "198.18.100.1:40000".parse().unwrap(),
            destination: "198.19.0.1:80".parse().unwrap(),
            scope: Scope::Internal,
        };
        let mut counts = [0u32; 3];
        for i in 0..200u64 {
            set_clock(Some(i * MS));
            let Decision::Forward(id) = d.select(1, &connection) else {
                panic!()
            };
            counts[id as usize] += 1;
            let kind = if id == 2 {
                OutcomeKind::ConnectFailed
            } else {
                OutcomeKind::Connected
            };
            d.observe(
                1,
                &Outcome {
                    endpoint: id,
                    kind,
                    micros: 1000,
                },
            );
            if id == 1 {
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
        set_clock(None);
        assert!(counts[2] < 20, "{counts:?}");
    }
}
