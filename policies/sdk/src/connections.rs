//! Active connections per endpoint, as this instance has placed them: counted up when
//! `select` forwards (so a burst of new connections does not all pick the same endpoint
//! before any has connected) and down when the host reports the connection failed or
//! closed. Policies using it must ask for outcomes (`Capabilities::observe_outcomes`).

use crate::ids::IdMap;
use crate::types::{EndpointId, Outcome, OutcomeKind};

#[derive(Clone, Debug, Default)]
pub struct ActiveConnections {
    active: IdMap<u32>,
}

impl ActiveConnections {
    pub fn get(&self, id: EndpointId) -> u32 {
        self.active.get(&id).copied().unwrap_or(0)
    }

    /// A connection was forwarded to `id`.
    pub fn opened(&mut self, id: EndpointId) {
        *self.active.entry(id).or_default() += 1;
    }

    /// Applies an outcome; returns the endpoint whose count changed, if any.
    pub fn observe(&mut self, outcome: &Outcome) -> Option<EndpointId> {
        match outcome.kind {
            OutcomeKind::Connected => None,
            OutcomeKind::ConnectFailed | OutcomeKind::Closed => {
                // A close for a connection this instance never counted (placed by an
                // instance since replaced) changes nothing.
                let count = self.active.get_mut(&outcome.endpoint).filter(|c| **c > 0)?;
                *count -= 1;
                Some(outcome.endpoint)
            }
        }
    }

    /// Forgets endpoints no longer known (after an update).
    pub fn retain(&mut self, known: impl Fn(EndpointId) -> bool) {
        self.active.retain(|id, _| known(*id));
    }
}
