//! `client-ip-affinity`: kube-proxy's eligibility and uniform random selection, with every
//! client IP kept on its endpoint while that stays eligible and the client keeps connecting
//! within the timeout, whether or not the Service asks for session affinity. It is the
//! SDK's [`Sticky`](weir_sdk::sticky::Sticky) over a three-line random policy: wrap any
//! other policy's type the same way (`Sticky<MyPolicy>`) to give it affinity.
//!
//! Configuration (`weir.dev/policy-config`, JSON; every key optional):
//! - `affinity_timeout_seconds` (default 10800; the Service's own `sessionAffinity:
//!   ClientIP` timeout wins when set).

use weir_sdk::sticky::Sticky;
use weir_sdk::{Connection, Decision, EndpointId, Policy, Service};

pub type ClientIpAffinity = Sticky<Uniform>;

/// A random eligible endpoint: what a client gets the first time.
pub struct Uniform;

impl Policy for Uniform {
    type State = ();

    fn configure(config: &str) -> Result<Self, String> {
        match weir_sdk::config::object(config)?.keys().next() {
            None => Ok(Uniform),
            Some(key) => Err(format!(
                "unknown setting `{key}`; client-ip-affinity takes only `{}`",
                weir_sdk::sticky::TIMEOUT_KEY
            )),
        }
    }

    fn update(
        &self,
        _: &mut (),
        service: &Service,
        node: &weir_sdk::Node,
        endpoints: &[weir_sdk::Endpoint],
    ) -> weir_sdk::Eligibility {
        // Sticky took its key out; whatever is left is a mistake worth a word.
        if let Some(key) = service
            .config
            .as_deref()
            .and_then(|c| weir_sdk::config::object(c).ok())
            .and_then(|o| o.keys().next().cloned())
        {
            weir_sdk::log(
                weir_sdk::LogLevel::Warn,
                &format!(
                    "weir.dev/policy-config of {}: unknown setting `{key}` ignored; client-ip-affinity takes only `{}`",
                    service.display_name(),
                    weir_sdk::sticky::TIMEOUT_KEY
                ),
            );
        }
        weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints)
    }

    fn select(&self, _: &mut (), _: &Service, eligible: &[EndpointId], _: &Connection) -> Decision {
        Decision::Forward(eligible[weir_sdk::random_below(eligible.len())])
    }
}

weir_sdk::export_policy!(ClientIpAffinity);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::host::testing::{seed_random, set_clock};
    use weir_sdk::{Connection, Decision, Driver, Endpoint, Node, Scope, Service};

    const SECOND: u64 = 1_000_000_000;

    fn driver(config: Option<&str>, session_affinity: Option<u32>) -> Driver<ClientIpAffinity> {
        let mut driver = Driver::<ClientIpAffinity>::configure("").unwrap();
        let endpoints: Vec<Endpoint> = (1..=5)
            .map(|id| Endpoint::ready(id, format!("198.18.0.{id}:8080").parse().unwrap()))
            .collect();
        let service = Service {
            config: config.map(str::to_string),
            session_affinity_timeout: session_affinity,
            ..Service::cluster_ip("default", "web", "198.19.0.1".parse().unwrap(), 80)
        };
        driver.update(1, service, &Node::default(), &endpoints);
        driver
    }

    fn pick(driver: &mut Driver<ClientIpAffinity>, client: u8, at_seconds: u64) -> u32 {
        set_clock(Some(at_seconds * SECOND));
        let connection = Connection {
            client: format!("198.18.100.{client}:{}", 40_000 + at_seconds)
                .parse()
                .unwrap(),
            destination: "198.19.0.1:80".parse().unwrap(),
            scope: Scope::Internal,
        };
        let Decision::Forward(id) = driver.select(1, &connection) else {
            panic!()
        };
        set_clock(None);
        id
    }

    #[test]
    fn clients_stick_within_the_configured_timeout() {
        seed_random(41);
        let mut d = driver(Some(r#"{"affinity_timeout_seconds": 30}"#), None);
        for client in 1..=20 {
            let first = pick(&mut d, client, 0);
            for t in 1..10 {
                assert_eq!(
                    pick(&mut d, client, t * 20),
                    first,
                    "client {client} moved at {t}"
                );
            }
        }
    }

    #[test]
    fn clients_may_move_after_the_timeout() {
        seed_random(42);
        let mut d = driver(Some(r#"{"affinity_timeout_seconds": 30}"#), None);
        let moved = (1..=20)
            .filter(|&c| pick(&mut d, c, 0) != pick(&mut d, c, 100))
            .count();
        assert!(moved > 5, "{moved} of 20 moved after expiry");
    }

    #[test]
    fn the_services_session_affinity_timeout_wins() {
        seed_random(43);
        let mut d = driver(Some(r#"{"affinity_timeout_seconds": 1000}"#), Some(10));
        let moved = (1..=20)
            .filter(|&c| pick(&mut d, c, 0) != pick(&mut d, c, 50))
            .count();
        assert!(moved > 5, "the Service's 10 s applied: {moved} moved");
    }

    #[test]
    fn other_settings_are_refused_by_name() {
        let error = Driver::<ClientIpAffinity>::configure(r#"{"timeout": 5}"#)
            .err()
            .unwrap();
        assert!(error.contains("unknown setting `timeout`"), "{error}");
    }

    #[test]
    fn a_bad_timeout_is_refused_with_its_name() {
        let error = Driver::<ClientIpAffinity>::configure(r#"{"affinity_timeout_seconds": 0}"#)
            .err()
            .unwrap();
        assert!(error.contains("affinity_timeout_seconds"), "{error}");
    }
}
