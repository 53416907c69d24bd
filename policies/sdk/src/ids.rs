//! Maps keyed by the host's small integer ids (service handles, endpoint ids), hashed with
//! one multiply: `select` looks one up per call, and SipHash would cost more than the rest.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use crate::types::{Endpoint, EndpointId};

/// A hasher for `u32` ids. Not for keys an adversary chooses.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A `HashMap` keyed by an id.
pub type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// A `HashSet` of ids.
pub type IdSet = HashSet<u32, BuildHasherDefault<IdHasher>>;

/// Endpoints by id, for `update`s that walk eligible ids: one O(1) lookup each instead of
/// a scan of the list (which would make a 10,000-endpoint update quadratic).
pub struct ById<'a> {
    map: IdMap<&'a Endpoint>,
}

impl<'a> ById<'a> {
    pub fn new(endpoints: &'a [Endpoint]) -> Self {
        ById {
            map: endpoints.iter().map(|e| (e.id, e)).collect(),
        }
    }

    pub fn get(&self, id: EndpointId) -> Option<&'a Endpoint> {
        self.map.get(&id).copied()
    }

    pub fn contains(&self, id: EndpointId) -> bool {
        self.map.contains_key(&id)
    }
}
