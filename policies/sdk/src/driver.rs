//! The per-instance bookkeeping between the host's calls and a [`Policy`]: state and
//! eligibility per service handle. The Wasm export glue drives one; so do native tests
//! and weir's built-in fallback.

use crate::Policy;
use crate::ids::IdMap;
use crate::request::{Request, RequestOutcome};
use crate::types::{
    Capabilities, Connection, Decision, Eligibility, Endpoint, Node, Outcome, Service,
    ServiceHandle,
};

struct Entry<S> {
    service: Service,
    eligibility: Eligibility,
    state: S,
}

/// One configured policy and the service ports it has been told about.
pub struct Driver<P: Policy> {
    policy: P,
    services: IdMap<Entry<P::State>>,
}

impl<P: Policy> Driver<P> {
    pub fn configure(config: &str) -> Result<Self, String> {
        Ok(Driver {
            policy: P::configure(config)?,
            services: IdMap::default(),
        })
    }

    pub fn policy(&self) -> &P {
        &self.policy
    }

    pub fn capabilities(&self) -> Capabilities {
        self.policy.capabilities()
    }

    /// Runs the policy's `update` for `handle` and remembers the (normalized) answer.
    pub fn update(
        &mut self,
        handle: ServiceHandle,
        service: Service,
        node: &Node,
        endpoints: &[Endpoint],
    ) -> Eligibility {
        let entry = self.services.entry(handle).or_insert_with(|| Entry {
            service: service.clone(),
            eligibility: Eligibility::reject_all(),
            state: P::State::default(),
        });
        entry.service = service;
        let mut eligibility = self
            .policy
            .update(&mut entry.state, &entry.service, node, endpoints);
        eligibility.normalize();
        entry.eligibility = eligibility.clone();
        eligibility
    }

    pub fn remove(&mut self, handle: ServiceHandle) {
        self.services.remove(&handle);
    }

    /// The policy's decision for one connection; the empty-set action when nothing is
    /// eligible for its scope; `Reject` for a handle never updated.
    pub fn select(&mut self, handle: ServiceHandle, connection: &Connection) -> Decision {
        let Some(entry) = self.services.get_mut(&handle) else {
            return Decision::Reject;
        };
        let set = entry.eligibility.for_scope(connection.scope);
        if set.endpoints.is_empty() {
            return set.empty_decision();
        }
        self.policy
            .select(&mut entry.state, &entry.service, &set.endpoints, connection)
    }

    /// The policy's decision for one request on an HTTP port, under the same rules as
    /// [`select`](Driver::select).
    pub fn select_request(
        &mut self,
        handle: ServiceHandle,
        connection: &Connection,
        request: &dyn Request,
    ) -> Decision {
        let Some(entry) = self.services.get_mut(&handle) else {
            return Decision::Reject;
        };
        let set = entry.eligibility.for_scope(connection.scope);
        if set.endpoints.is_empty() {
            return set.empty_decision();
        }
        self.policy.select_request(
            &mut entry.state,
            &entry.service,
            &set.endpoints,
            connection,
            request,
        )
    }

    pub fn observe_request(&mut self, handle: ServiceHandle, outcome: &RequestOutcome) {
        if let Some(entry) = self.services.get_mut(&handle) {
            self.policy.observe_request(&mut entry.state, outcome);
        }
    }

    pub fn observe(&mut self, handle: ServiceHandle, outcome: &Outcome) {
        if let Some(entry) = self.services.get_mut(&handle) {
            self.policy.observe(&mut entry.state, outcome);
        }
    }

    /// The last answer of `update` for `handle`.
    pub fn eligibility(&self, handle: ServiceHandle) -> Option<&Eligibility> {
        self.services.get(&handle).map(|e| &e.eligibility)
    }

    /// The policy's state for `handle`, for tests.
    pub fn state(&self, handle: ServiceHandle) -> Option<&P::State> {
        self.services.get(&handle).map(|e| &e.state)
    }
}
