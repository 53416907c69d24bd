//! Per-endpoint weights from configuration, and the two O(1)-per-pick structures that use
//! them: an alias table for weighted random picks and a stride schedule for weighted
//! round robin. Both are built in `update`, so `select` stays flat in the endpoint count.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;

use serde::Deserialize;

use crate::types::{Endpoint, EndpointId};

/// A schedule never grows past this many slots; weights are scaled down to fit.
pub const MAX_SCHEDULE: u64 = 65_536;

/// `{"198.18.0.5:8080": 3, "198.18.0.6": 1}`: by `ip:port` or by IP; unlisted endpoints
/// weigh 1; 0 takes an endpoint out of rotation (unless every endpoint weighs 0).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Weights(BTreeMap<String, u32>);

impl Weights {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn of(&self, address: SocketAddr) -> u32 {
        self.0
            .get(&address.to_string())
            .or_else(|| self.0.get(&address.ip().to_string()))
            .copied()
            .unwrap_or(1)
    }

    /// `(id, weight)` for each eligible id, with the all-zero case treated as all-one.
    pub fn for_ids(&self, ids: &[EndpointId], endpoints: &[Endpoint]) -> Vec<(EndpointId, u32)> {
        let by_id = crate::ids::ById::new(endpoints);
        let mut out: Vec<(EndpointId, u32)> = ids
            .iter()
            .map(|id| (*id, by_id.get(*id).map_or(1, |e| self.of(e.address))))
            .collect();
        if out.iter().all(|(_, w)| *w == 0) {
            out.iter_mut().for_each(|(_, w)| *w = 1);
        }
        out
    }
}

/// Weighted random picks in O(1) (Vose's alias method).
#[derive(Clone, Debug, Default)]
pub struct AliasTable {
    ids: Vec<EndpointId>,
    /// Chance, out of 2^32, that slot `i` answers its own id rather than its alias.
    keep: Vec<u64>,
    alias: Vec<u32>,
}

impl AliasTable {
    pub fn new(weighted: &[(EndpointId, u32)]) -> Self {
        let items: Vec<(EndpointId, u64)> = weighted
            .iter()
            .filter(|(_, w)| *w > 0)
            .map(|(id, w)| (*id, u64::from(*w)))
            .collect();
        let n = items.len() as u64;
        if n == 0 {
            return AliasTable::default();
        }
        let total: u64 = items.iter().map(|(_, w)| w).sum();
        // Scaled so the average slot holds exactly 2^32.
        let mut scaled: Vec<u64> = items
            .iter()
            .map(|(_, w)| (((u128::from(*w) * u128::from(n)) << 32) / u128::from(total)) as u64)
            .collect();
        let mut keep = vec![1u64 << 32; items.len()];
        let mut alias: Vec<u32> = (0..items.len() as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..items.len()).partition(|&i| scaled[i] < 1 << 32);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            keep[s] = scaled[s];
            alias[s] = l as u32;
            scaled[l] = scaled[l] + scaled[s] - (1 << 32);
            if scaled[l] < 1 << 32 {
                large.pop();
                small.push(l);
            }
        }
        AliasTable {
            ids: items.iter().map(|(id, _)| *id).collect(),
            keep,
            alias,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id for a uniformly random `r`.
    pub fn pick(&self, r: u64) -> EndpointId {
        let slot = ((u128::from(r >> 32) * self.ids.len() as u128) >> 32) as usize;
        if (r & 0xffff_ffff) < self.keep[slot] {
            self.ids[slot]
        } else {
            self.ids[self.alias[slot] as usize]
        }
    }
}

/// A weighted round-robin order, spread out (stride scheduling): with weights 3 and 1,
/// `a a b a` rather than `a a a b`. Weights are divided by their GCD and scaled down to
/// fit [`MAX_SCHEDULE`] slots.
pub fn schedule(weighted: &[(EndpointId, u32)]) -> Vec<EndpointId> {
    let items: Vec<(EndpointId, u64)> = weighted
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(id, w)| (*id, u64::from(*w)))
        .collect();
    if items.is_empty() {
        return Vec::new();
    }
    let g = items.iter().fold(0, |g, (_, w)| gcd(g, *w));
    let mut weights: Vec<u64> = items.iter().map(|(_, w)| w / g).collect();
    let total: u64 = weights.iter().sum();
    if total > MAX_SCHEDULE.max(items.len() as u64) {
        let room = MAX_SCHEDULE.max(items.len() as u64);
        weights = weights.iter().map(|w| (w * room / total).max(1)).collect();
    }
    let total: u64 = weights.iter().sum();
    const SPAN: u64 = 1 << 40;
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| Reverse((SPAN / w / 2, i)))
        .collect();
    let mut order = Vec::with_capacity(total as usize);
    while (order.len() as u64) < total {
        let Reverse((pass, i)) = heap.pop().expect("non-empty");
        order.push(items[i].0);
        heap.push(Reverse((pass + SPAN / weights[i], i)));
    }
    order
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_table_follows_the_weights() {
        let table = AliasTable::new(&[(1, 1), (2, 3), (3, 0), (4, 4)]);
        let mut counts = [0u32; 5];
        let mut r: u64 = 7;
        for _ in 0..80_000 {
            r = crate::host::mix_for_tests(r);
            counts[table.pick(r) as usize] += 1;
        }
        assert_eq!(counts[3], 0, "weight 0 is never picked");
        for (id, share) in [(1, 1.0 / 8.0), (2, 3.0 / 8.0), (4, 4.0 / 8.0)] {
            let got = f64::from(counts[id]) / 80_000.0;
            assert!((got - share).abs() < 0.01, "id {id}: {got} vs {share}");
        }
    }

    #[test]
    fn schedule_spreads_each_endpoint_by_weight() {
        let order = schedule(&[(1, 3), (2, 1)]);
        assert_eq!(order.len(), 4);
        assert_eq!(order.iter().filter(|&&id| id == 1).count(), 3);
        assert_ne!(order, vec![1, 1, 1, 2], "spread out, not bunched");
    }

    #[test]
    fn equal_weights_give_plain_round_robin() {
        assert_eq!(schedule(&[(4, 5), (9, 5), (2, 5)]).len(), 3);
    }

    #[test]
    fn huge_weights_are_scaled_to_fit() {
        let order = schedule(&[(1, 1_000_000), (2, 3_000_000), (3, 7)]);
        assert!(order.len() as u64 <= MAX_SCHEDULE + 3);
        assert!(order.contains(&3), "a tiny weight still gets a slot");
    }

    #[test]
    fn weights_match_ip_port_then_ip() {
        let weights: Weights =
            serde_json::from_str(r#"{"198.18.0.1:8080": 5, "198.18.0.2": 2}"#).unwrap();
        assert_eq!(weights.of("198.18.0.1:8080".parse().unwrap()), 5);
        assert_eq!(weights.of("198.18.0.1:9090".parse().unwrap()), 1);
        assert_eq!(weights.of("198.18.0.2:9090".parse().unwrap()), 2);
    }
}
