//! Stable identities across snapshots: a handle per service port and an id per endpoint,
//! kept while the port or endpoint exists, so policies can key state on them (affinity,
//! hash tables, counters) from one update to the next.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use weir_sdk::{Endpoint, ServiceHandle};

use crate::model::{ServicePortKey, ServicePortSnapshot};

/// Hands out service handles and endpoint ids. Handles are never reused; endpoint ids are
/// per service port, never reused within it.
#[derive(Debug, Default)]
pub struct Identities {
    next_handle: ServiceHandle,
    ports: BTreeMap<ServicePortKey, PortIdentities>,
}

#[derive(Debug)]
struct PortIdentities {
    handle: ServiceHandle,
    next_id: u32,
    ids: HashMap<SocketAddr, u32>,
}

impl Identities {
    /// The handle of `snapshot`'s port, and its endpoints with their ids. Endpoints seen
    /// before keep their ids; ids of endpoints that are gone are forgotten.
    pub fn assign(&mut self, snapshot: &ServicePortSnapshot) -> (ServiceHandle, Vec<Endpoint>) {
        let next_handle = &mut self.next_handle;
        let port = self.ports.entry(snapshot.key.clone()).or_insert_with(|| {
            *next_handle += 1;
            PortIdentities {
                handle: *next_handle,
                next_id: 0,
                ids: HashMap::new(),
            }
        });
        let mut endpoints = snapshot.endpoints.clone();
        let mut kept = HashMap::with_capacity(endpoints.len());
        for endpoint in &mut endpoints {
            let id = match port.ids.get(&endpoint.address) {
                Some(id) => *id,
                None => {
                    port.next_id += 1;
                    port.next_id
                }
            };
            endpoint.id = id;
            kept.insert(endpoint.address, id);
        }
        port.ids = kept;
        (port.handle, endpoints)
    }

    /// Forgets one port, returning its handle (to `remove` from its policy).
    pub fn forget(&mut self, key: &ServicePortKey) -> Option<ServiceHandle> {
        self.ports.remove(key).map(|port| port.handle)
    }

    /// Forgets ports not in `present`, returning their handles (to `remove` from policies).
    pub fn retain(&mut self, present: &[&ServicePortKey]) -> Vec<ServiceHandle> {
        let present: std::collections::HashSet<&ServicePortKey> = present.iter().copied().collect();
        let mut gone = Vec::new();
        self.ports.retain(|key, port| {
            let keep = present.contains(key);
            if !keep {
                gone.push(port.handle);
            }
            keep
        });
        gone
    }
}
