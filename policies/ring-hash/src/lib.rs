//! `ring-hash`: kube-proxy's eligibility, then ketama-style consistent hashing of the client
//! IP (or IP and port) onto a ring of virtual nodes, as Envoy's ring hash does. Every node
//! builds the same ring from the same endpoints (their `ip:port`, never weir's ids); when
//! one of N endpoints goes away, only the clients on its arcs move, as long as the ring is
//! not at `max_ring_size` (above that, each endpoint's point count shrinks with N and a
//! change moves a little more).
//!
//! Configuration (`weir.dev/policy-config`, JSON; every key optional):
//! - `virtual_nodes`: points per endpoint (default 100), lowered so the ring holds at most
//!   `max_ring_size` points (default 65536, at most 262144: a point is 16 bytes of the
//!   instance's memory, shared by every port using the policy).
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
    pub virtual_nodes: u32,
    pub max_ring_size: u32,
    pub hash: hash::ClientKey,
    /// The request header hashed when `hash` is `"header"`.
    pub header: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            virtual_nodes: 100,
            max_ring_size: 65_536,
            hash: hash::ClientKey::Ip,
            header: None,
        }
    }
}

/// The largest ring a Service may ask for (4 MiB).
pub const MAX_RING_SIZE: u32 = 262_144;

pub struct RingHash {
    settings: Layered<Settings>,
}

#[derive(Debug, Default)]
pub struct State {
    settings: Option<Settings>,
    key: hash::Key,
    rings: PerScope<Vec<(u64, EndpointId)>>,
}

/// The ring for `ids`: `(point, id)` sorted by point.
pub fn ring(
    ids: &[EndpointId],
    endpoints: &[Endpoint],
    settings: &Settings,
) -> Vec<(u64, EndpointId)> {
    let by_id = weir_sdk::ids::ById::new(endpoints);
    let members: Vec<&Endpoint> = ids.iter().filter_map(|id| by_id.get(*id)).collect();
    if members.is_empty() {
        return Vec::new();
    }
    let per_endpoint = settings
        .virtual_nodes
        .min(settings.max_ring_size / members.len() as u32)
        .max(1);
    let mut points = Vec::with_capacity(members.len() * per_endpoint as usize);
    for e in &members {
        let base = hash::endpoint_base(e.address);
        for v in 0..per_endpoint {
            points.push((hash::salted(base, u64::from(v)), e.id));
        }
    }
    points.sort_unstable_by_key(|p| p.0);
    // Equal points (vanishingly rare) are ordered by address, the same on every node.
    let mut start = 0;
    while start < points.len() {
        let end = start
            + points[start..]
                .iter()
                .take_while(|p| p.0 == points[start].0)
                .count();
        if end - start > 1 {
            points[start..end].sort_by_key(|p| by_id.get(p.1).map(|e| e.address));
        }
        start = end;
    }
    points
}

/// The first point at or after `key`, wrapping around.
pub fn lookup(ring: &[(u64, EndpointId)], key: u64) -> Option<EndpointId> {
    let i = ring.partition_point(|(point, _)| *point < key);
    ring.get(i).or_else(|| ring.first()).map(|(_, id)| *id)
}

impl Policy for RingHash {
    type State = State;

    fn configure(config: &str) -> Result<Self, String> {
        let settings = Layered::<Settings>::configure(config)?;
        let defaults = settings.defaults();
        hash::Key::new(defaults.hash, defaults.header.as_deref())?;
        Ok(RingHash { settings })
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
        if settings.max_ring_size > MAX_RING_SIZE {
            weir_sdk::log(
                LogLevel::Warn,
                &format!(
                    "{}: ring-hash max_ring_size {} is above {MAX_RING_SIZE}; using {MAX_RING_SIZE}",
                    service.display_name(),
                    settings.max_ring_size
                ),
            );
            settings.max_ring_size = MAX_RING_SIZE;
        }
        state.rings = PerScope::build(&eligibility, |ids| ring(ids, endpoints, &settings));
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
        Decision::Forward(lookup(state.rings.get(connection.scope), key).unwrap_or(eligible[0]))
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
        Decision::Forward(lookup(state.rings.get(connection.scope), key).unwrap_or(eligible[0]))
    }
}

weir_sdk::export_policy!(RingHash);

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

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

    fn clients() -> impl Iterator<Item = u64> {
        (0..20_000u32).map(|i| hash::ip(IpAddr::from([198, 19, (i >> 8) as u8, i as u8])))
    }

    #[test]
    fn load_is_spread_within_bounds() {
        let eps = endpoints(10);
        let r = ring(&ids(&eps), &eps, &Settings::default());
        assert_eq!(r.len(), 1000);
        let mut counts = [0u32; 11];
        for key in clients() {
            counts[lookup(&r, key).unwrap() as usize] += 1;
        }
        for &c in &counts[1..] {
            assert!((1200..2900).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn removing_one_of_n_moves_only_its_clients() {
        let n = 20;
        let eps = endpoints(n);
        let before = ring(&ids(&eps), &eps, &Settings::default());
        let fewer: Vec<Endpoint> = eps.iter().filter(|e| e.id != 7).cloned().collect();
        let after = ring(&ids(&fewer), &fewer, &Settings::default());
        let mut moved = 0;
        for key in clients() {
            let (a, b) = (lookup(&before, key).unwrap(), lookup(&after, key).unwrap());
            if a != b {
                assert_eq!(a, 7, "only the removed endpoint's clients move");
                moved += 1;
            }
        }
        let share = f64::from(moved) / 20_000.0;
        assert!(share < 1.0 / f64::from(n) + 0.03, "{share}");
    }

    #[test]
    fn the_ring_is_capped() {
        let eps = endpoints(1000);
        let r = ring(&ids(&eps), &eps, &Settings::default());
        assert_eq!(r.len(), 65_000, "65 points each");
    }
}
