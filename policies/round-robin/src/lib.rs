//! `round-robin`: kube-proxy's eligibility (the SDK's default `update`), then each eligible
//! endpoint in turn, in proportion to its weight when weights are configured.
//!
//! Configuration (`weir.dev/policy-config`, JSON; every key optional):
//! - `weights`: `{"<ip>:<port>" | "<ip>": weight}`; unlisted endpoints weigh 1, 0 takes an
//!   endpoint out of rotation. Default: none (each endpoint once per round). Weighted turns
//!   are spread out (weights 3 and 1 give `a a b a`, not `a a a b`).
//!
//! Build: `cargo build -p round-robin --target wasm32-wasip2 --release`, then put
//! `target/wasm32-wasip2/release/round_robin.wasm` in weir's policies directory as
//! `round-robin.wasm` and annotate a Service with `weir.dev/policy: round-robin`.

use serde::Deserialize;
use weir_sdk::config::Layered;
use weir_sdk::scoped::PerScope;
use weir_sdk::weighted::{Weights, schedule};
use weir_sdk::{Connection, Decision, Eligibility, Endpoint, EndpointId, Node, Policy, Service};

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub weights: Weights,
}

pub struct RoundRobin {
    settings: Layered<Settings>,
}

/// Per service port: the weighted order (if any) and the position in it, per scope.
#[derive(Debug, Default)]
pub struct State {
    settings: Option<Settings>,
    schedules: Option<PerScope<Vec<EndpointId>>>,
    next: PerScope<usize>,
}

impl Policy for RoundRobin {
    type State = State;

    fn configure(config: &str) -> Result<Self, String> {
        Ok(RoundRobin {
            settings: Layered::configure(config)?,
        })
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
        state.schedules = (!settings.weights.is_empty()).then(|| {
            PerScope::build(&eligibility, |ids| {
                schedule(&settings.weights.for_ids(ids, endpoints))
            })
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
        let order = match &state.schedules {
            Some(schedules) => schedules.get(connection.scope).as_slice(),
            None => eligible,
        };
        let next = state.next.get_mut(connection.scope);
        let endpoint = order[*next % order.len()];
        *next = next.wrapping_add(1);
        Decision::Forward(endpoint)
    }
}

weir_sdk::export_policy!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::{Driver, Scope};

    fn endpoints(n: u32) -> Vec<Endpoint> {
        (1..=n)
            .map(|id| Endpoint::ready(id, format!("198.18.0.{id}:8080").parse().unwrap()))
            .collect()
    }

    fn service(config: Option<&str>) -> Service {
        Service {
            config: config.map(str::to_string),
            ..Service::cluster_ip("default", "web", "198.19.0.1".parse().unwrap(), 80)
        }
    }

    fn picks(driver: &mut Driver<RoundRobin>, n: usize) -> Vec<EndpointId> {
        let connection = Connection {
            client: "198.18.100.1:40000".parse().unwrap(),
            destination: "198.19.0.1:80".parse().unwrap(),
            scope: Scope::Internal,
        };
        (0..n)
            .map(|_| match driver.select(1, &connection) {
                Decision::Forward(id) => id,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn each_endpoint_in_turn() {
        let mut driver = Driver::<RoundRobin>::configure("").unwrap();
        driver.update(1, service(None), &Node::default(), &endpoints(3));
        assert_eq!(picks(&mut driver, 6), vec![1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn weights_give_proportional_spread_out_turns() {
        let mut driver = Driver::<RoundRobin>::configure("").unwrap();
        let config = r#"{"weights": {"198.18.0.1": 3}}"#;
        driver.update(1, service(Some(config)), &Node::default(), &endpoints(2));
        let got = picks(&mut driver, 8);
        assert_eq!(got.iter().filter(|&&id| id == 1).count(), 6);
        assert!(
            !got.windows(4).any(|w| w == [1, 1, 1, 1]),
            "spread out: {got:?}"
        );
    }

    #[test]
    fn policy_defaults_apply_to_every_service() {
        let mut driver =
            Driver::<RoundRobin>::configure(r#"{"weights": {"198.18.0.2:8080": 0}}"#).unwrap();
        driver.update(1, service(None), &Node::default(), &endpoints(2));
        assert_eq!(picks(&mut driver, 3), vec![1, 1, 1]);
    }

    #[test]
    fn not_ready_endpoints_never_get_a_turn() {
        let mut driver = Driver::<RoundRobin>::configure("").unwrap();
        let mut eps = endpoints(3);
        eps[1].ready = false;
        driver.update(1, service(None), &Node::default(), &eps);
        assert_eq!(picks(&mut driver, 4), vec![1, 3, 1, 3]);
    }
}
