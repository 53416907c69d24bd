//! Session affinity by client IP (`sessionAffinity: ClientIP`), usable on top of any
//! selection: a client keeps its endpoint while the endpoint stays eligible and the
//! client keeps opening connections within the timeout.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::types::{Eligibility, EndpointId};

/// Clients remembered per service port; beyond this, new clients are not recorded until
/// expired ones are reaped. It bounds the guest's memory (about 80 bytes a client, so
/// ~330 KiB per full table against the instance's 16 MiB) whatever the number of clients.
/// kube-proxy's iptables `recent` lists hold 200 entries each by default.
pub const DEFAULT_MAX_CLIENTS: usize = 4_096;

/// How long a full table waits before scanning for expired clients again, so a table full
/// of live clients does not cost a scan per new connection.
const REAP_INTERVAL_NANOS: u64 = 1_000_000_000;

#[derive(Clone, Copy, Debug)]
struct Sticky {
    endpoint: EndpointId,
    last_seen_nanos: u64,
}

/// One table per service port, as kube-proxy keeps one `recent` list per endpoint chain.
#[derive(Debug)]
pub struct ClientIpAffinity {
    clients: HashMap<IpAddr, Sticky>,
    max_clients: usize,
    next_reap_nanos: u64,
}

impl Default for ClientIpAffinity {
    fn default() -> Self {
        ClientIpAffinity::with_capacity(DEFAULT_MAX_CLIENTS)
    }
}

impl ClientIpAffinity {
    pub fn with_capacity(max_clients: usize) -> Self {
        ClientIpAffinity {
            clients: HashMap::new(),
            max_clients,
            next_reap_nanos: 0,
        }
    }

    /// The endpoint for `client`: its previous one if that was used less than
    /// `timeout_seconds` ago and is still in `eligible` (sorted), else `pick()`. Either
    /// way the client's entry is refreshed to `now_nanos`, as every new connection
    /// refreshes kube-proxy's `recent` entry.
    pub fn select(
        &mut self,
        client: IpAddr,
        timeout_seconds: u32,
        eligible: &[EndpointId],
        now_nanos: u64,
        pick: impl FnOnce() -> EndpointId,
    ) -> EndpointId {
        let timeout_nanos = u64::from(timeout_seconds) * 1_000_000_000;
        if let Some(sticky) = self.clients.get_mut(&client)
            && now_nanos.saturating_sub(sticky.last_seen_nanos) < timeout_nanos
            && eligible.binary_search(&sticky.endpoint).is_ok()
        {
            sticky.last_seen_nanos = now_nanos;
            return sticky.endpoint;
        }
        let endpoint = pick();
        if self.clients.len() >= self.max_clients
            && !self.clients.contains_key(&client)
            && now_nanos >= self.next_reap_nanos
        {
            self.clients
                .retain(|_, s| now_nanos.saturating_sub(s.last_seen_nanos) < timeout_nanos);
            self.next_reap_nanos = now_nanos.saturating_add(REAP_INTERVAL_NANOS);
        }
        if self.clients.len() < self.max_clients || self.clients.contains_key(&client) {
            self.clients.insert(
                client,
                Sticky {
                    endpoint,
                    last_seen_nanos: now_nanos,
                },
            );
        }
        endpoint
    }

    /// Forgets clients whose endpoint is eligible for neither scope any more: call it after
    /// `update`, so clients of removed endpoints hold no place in the table.
    pub fn retain_eligible(&mut self, eligibility: &Eligibility) {
        self.clients.retain(|_, s| {
            eligibility
                .internal
                .endpoints
                .binary_search(&s.endpoint)
                .is_ok()
                || eligibility
                    .external
                    .endpoints
                    .binary_search(&s.endpoint)
                    .is_ok()
        });
    }

    /// Drops `client`'s entry.
    pub fn forget(&mut self, client: IpAddr) {
        self.clients.remove(&client);
    }

    /// Whether `client` has an entry (live or not yet reaped).
    pub fn contains(&self, client: IpAddr) -> bool {
        self.clients.contains_key(&client)
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn client(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 1, last])
    }

    #[test]
    fn client_keeps_its_endpoint_within_the_timeout() {
        let mut affinity = ClientIpAffinity::default();
        assert_eq!(affinity.select(client(1), 10, &[1, 2, 3], 0, || 2), 2);
        assert_eq!(
            affinity.select(client(1), 10, &[1, 2, 3], 9 * SECOND, || 3),
            2
        );
    }

    #[test]
    fn each_connection_refreshes_the_timeout() {
        let mut affinity = ClientIpAffinity::default();
        affinity.select(client(1), 10, &[1, 2], 0, || 1);
        affinity.select(client(1), 10, &[1, 2], 9 * SECOND, || 2);
        assert_eq!(
            affinity.select(client(1), 10, &[1, 2], 18 * SECOND, || 2),
            1
        );
    }

    #[test]
    fn expired_affinity_picks_again() {
        let mut affinity = ClientIpAffinity::default();
        affinity.select(client(1), 10, &[1, 2], 0, || 1);
        assert_eq!(
            affinity.select(client(1), 10, &[1, 2], 10 * SECOND, || 2),
            2
        );
    }

    #[test]
    fn endpoint_no_longer_eligible_picks_again() {
        let mut affinity = ClientIpAffinity::default();
        affinity.select(client(1), 10, &[1, 2], 0, || 1);
        assert_eq!(affinity.select(client(1), 10, &[2, 3], SECOND, || 3), 3);
    }

    #[test]
    fn affinity_is_per_client_ip() {
        let mut affinity = ClientIpAffinity::default();
        affinity.select(client(1), 10, &[1, 2], 0, || 1);
        assert_eq!(affinity.select(client(2), 10, &[1, 2], 0, || 2), 2);
        assert_eq!(affinity.select(client(1), 10, &[1, 2], 0, || 2), 1);
    }

    #[test]
    fn table_is_bounded_and_reaps_expired_clients() {
        let mut affinity = ClientIpAffinity::with_capacity(2);
        affinity.select(client(1), 10, &[1], 0, || 1);
        affinity.select(client(2), 10, &[1], 0, || 1);
        affinity.select(client(3), 10, &[1], SECOND, || 1);
        assert_eq!(affinity.len(), 2, "full table records no new client");
        affinity.select(client(3), 10, &[1], 11 * SECOND, || 1);
        assert_eq!(
            affinity.len(),
            1,
            "expired clients were reaped for the new one"
        );
    }

    #[test]
    fn a_full_table_of_live_clients_is_not_rescanned_for_every_new_client() {
        let mut affinity = ClientIpAffinity::with_capacity(1);
        affinity.select(client(1), 10, &[1], 0, || 1);
        // Full: scans at 9.5 s, client 1 is still live, client 2 is not recorded.
        affinity.select(client(2), 10, &[1], 9 * SECOND + SECOND / 2, || 1);
        // Client 1 expired at 10 s, but the next scan is due at 10.5 s.
        affinity.select(client(3), 10, &[1], 10 * SECOND + SECOND / 5, || 1);
        assert!(affinity.contains(client(1)) && !affinity.contains(client(3)));
        affinity.select(client(4), 10, &[1], 11 * SECOND, || 1);
        assert!(!affinity.contains(client(1)) && affinity.contains(client(4)));
    }
}
