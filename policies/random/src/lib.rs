//! `random`: kube-proxy's eligibility, then a uniformly random eligible endpoint, or a
//! weighted random one when weights are configured.
//!
//! Configuration (`weir.dev/policy-config`, JSON; every key optional):
//! - `weights`: `{"<ip>:<port>" | "<ip>": weight}`; unlisted endpoints weigh 1, 0 takes an
//!   endpoint out of rotation. Default: none (uniform).
//!
//! Picks are O(1) whatever the number of endpoints (an alias table built in `update`).

use serde::Deserialize;
use weir_sdk::config::Layered;
use weir_sdk::scoped::PerScope;
use weir_sdk::weighted::{AliasTable, Weights};
use weir_sdk::{Connection, Decision, Eligibility, Endpoint, EndpointId, Node, Policy, Service};

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub weights: Weights,
}

pub struct Random {
    settings: Layered<Settings>,
}

#[derive(Default)]
pub struct State {
    settings: Option<Settings>,
    /// `None` without weights: a plain uniform pick needs no table.
    tables: Option<PerScope<AliasTable>>,
}

impl Policy for Random {
    type State = State;

    fn configure(config: &str) -> Result<Self, String> {
        Ok(Random {
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
        state.tables = (!settings.weights.is_empty()).then(|| {
            PerScope::build(&eligibility, |ids| {
                AliasTable::new(&settings.weights.for_ids(ids, endpoints))
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
        let endpoint = match &state.tables {
            Some(tables) => tables.get(connection.scope).pick(weir_sdk::random_u64()),
            None => eligible[weir_sdk::random_below(eligible.len())],
        };
        Decision::Forward(endpoint)
    }
}

weir_sdk::export_policy!(Random);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::host::testing::seed_random;
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

    fn connection() -> Connection {
        Connection {
            client: "198.18.100.1:40000".parse().unwrap(),
            destination: "198.19.0.1:80".parse().unwrap(),
            scope: Scope::Internal,
        }
    }

    fn shares(driver: &mut Driver<Random>, n: usize, picks: u32) -> Vec<f64> {
        let mut counts = vec![0u32; n + 1];
        for _ in 0..picks {
            let Decision::Forward(id) = driver.select(1, &connection()) else {
                panic!()
            };
            counts[id as usize] += 1;
        }
        counts[1..]
            .iter()
            .map(|&c| f64::from(c) / f64::from(picks))
            .collect()
    }

    #[test]
    fn uniform_without_weights() {
        seed_random(11);
        let mut driver = Driver::<Random>::configure("").unwrap();
        driver.update(1, service(None), &Node::default(), &endpoints(4));
        for share in shares(&mut driver, 4, 40_000) {
            assert!((share - 0.25).abs() < 0.015, "{share}");
        }
    }

    #[test]
    fn weights_from_the_service_annotation() {
        seed_random(12);
        let mut driver = Driver::<Random>::configure("").unwrap();
        let config = r#"{"weights": {"198.18.0.1:8080": 3, "198.18.0.3": 0}}"#;
        driver.update(1, service(Some(config)), &Node::default(), &endpoints(3));
        let got = shares(&mut driver, 3, 40_000);
        assert!((got[0] - 0.75).abs() < 0.015, "{got:?}");
        assert!((got[1] - 0.25).abs() < 0.015, "{got:?}");
        assert_eq!(got[2], 0.0);
    }

    #[test]
    fn bad_service_config_keeps_serving_with_the_previous_settings() {
        seed_random(13);
        let mut driver = Driver::<Random>::configure("").unwrap();
        let config = r#"{"weights": {"198.18.0.1:8080": 0}}"#;
        driver.update(1, service(Some(config)), &Node::default(), &endpoints(2));
        driver.update(
            1,
            service(Some("{\"wieghts\": 1}")),
            &Node::default(),
            &endpoints(2),
        );
        assert_eq!(
            shares(&mut driver, 2, 1000),
            vec![0.0, 1.0],
            "previous weights kept"
        );
    }

    #[test]
    fn policy_level_config_is_checked_at_configure() {
        let error = Driver::<Random>::configure(r#"{"weight": {}}"#)
            .err()
            .unwrap();
        assert!(error.contains("unknown field `weight`"), "{error}");
    }
}
