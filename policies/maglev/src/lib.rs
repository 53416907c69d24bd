//! `maglev`: kube-proxy's eligibility, then Maglev consistent hashing (Eisenbud et al.,
//! NSDI 2016) of the client IP, or IP and port. Every node computes the same table from
//! the same endpoints (hashing their `ip:port`, never weir's ids), so a client reaches the
//! same endpoint through any node; when one of N endpoints goes away, about 1/N of clients
//! move.
//!
//! Configuration (`weir.dev/policy-config`, JSON; every key optional):
//! - `table_size`: a prime larger than the endpoint count, at most 1,000,003 (default
//!   65537). When it is not prime or too small, the smallest prime above 100 × endpoints
//!   is used; when too large, 65537; either way a warning is logged.
//!
//! Memory: a table is 4 bytes a slot, one per port (two when internal and external traffic
//! have different endpoints), in the instance's memory (16 MiB by default, shared by every
//! port using the policy): about 60 ports at the default size. Lower `table_size` for more.
//! - `hash`: `"ip"` (default), `"ip-port"`, or `"header"` with `header` naming a request
//!   header (`{"hash": "header", "header": "x-user"}`): on HTTP ports, each distinct value
//!   of that header sticks to one endpoint, and requests without it hash the client's IP;
//!   on other ports, connections hash the client's IP.

use serde::Deserialize;
use weir_sdk::config::Layered;
use weir_sdk::scoped::PerScope;
use weir_sdk::{
    Connection, Decision, Eligibility, Endpoint, EndpointId, LogLevel, Node, Policy, Request,
    Service, hash,
};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub table_size: u32,
    pub hash: hash::ClientKey,
    /// The request header hashed when `hash` is `"header"`.
    pub header: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            table_size: 65_537,
            hash: hash::ClientKey::Ip,
            header: None,
        }
    }
}

/// The largest table a Service may ask for (4 MB).
pub const MAX_TABLE_SIZE: u32 = 1_000_003;

pub struct Maglev {
    settings: Layered<Settings>,
}

#[derive(Debug, Default)]
pub struct State {
    settings: Option<Settings>,
    key: hash::Key,
    tables: PerScope<Vec<EndpointId>>,
}

/// Builds the lookup table for `ids` (any order): each endpoint fills the slots of its
/// own permutation in turn until the table is full.
pub fn table(ids: &[EndpointId], endpoints: &[Endpoint], size: u32) -> Vec<EndpointId> {
    let by_id = weir_sdk::ids::ById::new(endpoints);
    let mut backends: Vec<(String, EndpointId, std::net::SocketAddr)> = ids
        .iter()
        .filter_map(|id| by_id.get(*id))
        .map(|e| (e.address.to_string(), e.id, e.address))
        .collect();
    if backends.is_empty() {
        return Vec::new();
    }
    // The order every node agrees on.
    backends.sort();
    let m = u64::from(size);
    if backends.len() as u64 >= m {
        // No room for Maglev's permutations; `update` never asks for this.
        return (0..m as usize)
            .map(|i| backends[i % backends.len()].1)
            .collect();
    }
    let mut offset: Vec<u64> = Vec::with_capacity(backends.len());
    let mut skip: Vec<u64> = Vec::with_capacity(backends.len());
    for (_, _, address) in &backends {
        let base = hash::endpoint_base(*address);
        offset.push(hash::salted(base, 0) % m);
        skip.push(hash::salted(base, 1) % (m - 1) + 1);
    }
    let mut next = vec![0u64; backends.len()];
    let mut entry = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for i in 0..backends.len() {
            let mut slot = ((offset[i] + next[i] * skip[i]) % m) as usize;
            while entry[slot] != u32::MAX {
                next[i] += 1;
                slot = ((offset[i] + next[i] * skip[i]) % m) as usize;
            }
            entry[slot] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry.into_iter().map(|i| backends[i as usize].1).collect()
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u32| u64::from(*d) * u64::from(*d) <= u64::from(n))
            .all(|d| !n.is_multiple_of(d))
}

fn next_prime(mut n: u32) -> u32 {
    while !is_prime(n) {
        n += 1;
    }
    n
}

impl Policy for Maglev {
    type State = State;

    fn configure(config: &str) -> Result<Self, String> {
        let settings = Layered::<Settings>::configure(config)?;
        let defaults = settings.defaults();
        hash::Key::new(defaults.hash, defaults.header.as_deref())?;
        Ok(Maglev { settings })
    }

    fn update(
        &self,
        state: &mut State,
        service: &Service,
        node: &Node,
        endpoints: &[Endpoint],
    ) -> Eligibility {
        let eligibility = weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints);
        let mut settings = self.settings.for_service(service, state.settings.as_ref());
        if settings.table_size > MAX_TABLE_SIZE {
            weir_sdk::log(
                LogLevel::Warn,
                &format!(
                    "{}: maglev table_size {} is above {MAX_TABLE_SIZE}; using 65537",
                    service.display_name(),
                    settings.table_size
                ),
            );
            settings.table_size = 65_537;
        }
        if !is_prime(settings.table_size) || settings.table_size as usize <= endpoints.len() {
            let size = next_prime((endpoints.len() as u32).saturating_mul(100).max(3));
            weir_sdk::log(
                LogLevel::Warn,
                &format!(
                    "{}: maglev table_size {} is not a prime above the {} endpoints; using {size}",
                    service.display_name(),
                    settings.table_size,
                    endpoints.len()
                ),
            );
            settings.table_size = size;
        }
        state.tables = PerScope::build(&eligibility, |ids| {
            table(ids, endpoints, settings.table_size)
        });
        state.key = hash::Key::for_service(
            settings.hash,
            settings.header.as_deref(),
            service,
            state.settings.is_some().then_some(&state.key),
        );
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
        let key = state.key.of(connection);
        Decision::Forward(slot(state.tables.get(connection.scope), key).unwrap_or(eligible[0]))
    }

    fn select_request(
        &self,
        state: &mut State,
        _: &Service,
        eligible: &[EndpointId],
        connection: &Connection,
        request: &dyn Request,
    ) -> Decision {
        let key = state.key.of_request(connection, request);
        Decision::Forward(slot(state.tables.get(connection.scope), key).unwrap_or(eligible[0]))
    }
}

/// The endpoint in `key`'s slot of the table, if it has any.
fn slot(table: &[EndpointId], key: u64) -> Option<EndpointId> {
    (!table.is_empty()).then(|| table[(key % table.len() as u64) as usize])
}

weir_sdk::export_policy!(Maglev);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn endpoints(n: u32) -> Vec<Endpoint> {
        (1..=n)
            .map(|id| {
                Endpoint::ready(
                    id,
                    format!("198.18.{}.{}:8080", id / 200, id % 200)
                        .parse()
                        .unwrap(),
                )
            })
            .collect()
    }

    fn ids(endpoints: &[Endpoint]) -> Vec<EndpointId> {
        endpoints.iter().map(|e| e.id).collect()
    }

    #[test]
    fn the_table_is_full_and_even() {
        let eps = endpoints(10);
        let t = table(&ids(&eps), &eps, 65_537);
        assert_eq!(t.len(), 65_537);
        let mut counts: HashMap<EndpointId, u32> = HashMap::new();
        for id in &t {
            *counts.entry(*id).or_default() += 1;
        }
        assert_eq!(counts.len(), 10);
        for (&id, &c) in &counts {
            assert!((6400..=6700).contains(&c), "endpoint {id} holds {c} slots");
        }
    }

    #[test]
    fn the_same_endpoints_give_the_same_table_whatever_their_ids() {
        let eps = endpoints(20);
        let renumbered: Vec<Endpoint> = eps
            .iter()
            .map(|e| Endpoint {
                id: e.id + 1000,
                ..e.clone()
            })
            .collect();
        let a = table(&ids(&eps), &eps, 251);
        let b: Vec<EndpointId> = table(&ids(&renumbered), &renumbered, 251)
            .iter()
            .map(|id| id - 1000)
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth_of_the_slots() {
        let n = 50;
        let eps = endpoints(n);
        let before = table(&ids(&eps), &eps, 65_537);
        let fewer: Vec<Endpoint> = eps.iter().filter(|e| e.id != 17).cloned().collect();
        let after = table(&ids(&fewer), &fewer, 65_537);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / 65_537.0;
        // The removed endpoint's 1/N must move; Maglev moves little more than that.
        assert!(moved >= 1.0 / n as f64 - 0.001, "{moved}");
        assert!(moved <= 1.0 / n as f64 + 0.01, "{moved}");
    }

    #[test]
    fn requests_with_the_same_header_value_meet_whatever_their_client() {
        use weir_sdk::{Driver, RequestParts, Scope};
        let mut driver =
            Driver::<Maglev>::configure(r#"{"hash": "header", "header": "x-user"}"#).unwrap();
        let service = Service::cluster_ip("default", "web", "198.19.0.1".parse().unwrap(), 80);
        driver.update(1, service, &Node::default(), &endpoints(10));
        let from = |client: u32| Connection {
            client: std::net::SocketAddr::new(std::net::IpAddr::from(client.to_be_bytes()), 5000),
            destination: "198.19.0.1:80".parse().unwrap(),
            scope: Scope::Internal,
        };
        let mut per_user = HashMap::new();
        for client in 0..200u32 {
            let user = format!("user-{}", client % 7);
            let request = RequestParts::get("/").with_header("X-User", user.clone());
            let decision = driver.select_request(1, &from(0xc613_0000 + client), &request);
            assert_eq!(*per_user.entry(user).or_insert(decision), decision);
        }
        // Seven users, not all on one endpoint.
        let distinct: std::collections::HashSet<_> = per_user.values().collect();
        assert!(distinct.len() > 1, "{per_user:?}");
    }

    #[test]
    fn a_bad_table_size_is_replaced_by_a_prime_that_fits() {
        assert!(is_prime(65_537) && !is_prime(65_536));
        assert_eq!(next_prime(1000), 1009);
    }
}
