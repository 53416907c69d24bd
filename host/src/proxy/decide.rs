//! The one decision path every protocol takes for a new connection, flow or request:
//! admission (LoadBalancer source ranges), scope (traffic from the node to an external
//! address uses the internal endpoints), the policy's choice, another endpoint when one
//! cannot be reached, and outcomes to the policies that learn from them. A protocol's
//! file only moves bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_sdk::{Connection, EndpointId, Outcome, OutcomeKind, RequestEvent, RequestOutcome, Scope};

use super::{Route, Shared};
use crate::policy::{HostDecision, PolicyRuntime, RequestHead};

/// Why a connection is not served, before any policy is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its source is outside the LoadBalancer's source ranges: kube-proxy drops it.
    SourceRange,
    /// The Service's policy is unavailable and its failure mode is closed: reject.
    NoPolicy,
}

/// What to do with a connection next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Connect to this endpoint.
    Forward {
        endpoint: EndpointId,
        address: SocketAddr,
    },
    Reject,
    Drop,
    /// Every endpoint it may try was tried (or the attempts ran out): give up.
    GiveUp,
}

/// One connection's (or one HTTP request's) way through its Service's policy, attempt
/// by attempt.
pub struct Decision {
    route: Arc<Route>,
    policy: Arc<PolicyRuntime>,
    request: Connection,
    /// The HTTP request decided, when this is one: the policy is asked `select-request`
    /// and told request outcomes.
    head: Option<Arc<RequestHead>>,
    tried: Vec<EndpointId>,
    attempts_left: u32,
    /// When the last step was decided.
    decided: Option<Instant>,
}

/// Admits a connection from `peer` to `destination` on `route`: checks its source, works
/// out its scope, and returns its decision path.
pub fn admit(
    route: &Arc<Route>,
    shared: &Shared,
    peer: SocketAddr,
    destination: SocketAddr,
) -> Result<Decision, Refusal> {
    let ip = crate::net::canonical(peer.ip());
    if !route.source_ranges.is_empty() && !route.source_ranges.iter().any(|r| r.contains(ip)) {
        route.metrics.source_range.inc();
        return Err(Refusal::SourceRange);
    }
    // kube-proxy: traffic from the node itself or its pods to an external address gets
    // the Service's Cluster endpoints, even with externalTrafficPolicy Local.
    let scope = if route.scope == Scope::External
        && route.local_sources_use_cluster
        && shared.is_local_source(ip)
    {
        Scope::Internal
    } else {
        route.scope
    };
    let Some(policy) = route.policy.clone() else {
        route.metrics.reject.inc();
        return Err(Refusal::NoPolicy);
    };
    Ok(Decision {
        route: route.clone(),
        policy,
        request: Connection {
            client: SocketAddr::new(ip, peer.port()),
            destination,
            scope,
        },
        head: None,
        tried: Vec::new(),
        attempts_left: shared.settings.connect_attempts,
        decided: None,
    })
}

impl Decision {
    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }

    /// Makes this the decision for one HTTP request on the connection.
    pub fn for_request(mut self, head: Arc<RequestHead>) -> Self {
        self.head = Some(head);
        self
    }

    /// Whether `endpoint` at `address`, chosen under this decision's route, may still
    /// serve it under `current` (the route its listener has now): same policy port, and
    /// still eligible for the scope. A flow that outlives a change asks this.
    pub fn still_serves(&self, current: &Route, endpoint: EndpointId, address: SocketAddr) -> bool {
        current.handle == self.route.handle
            && (current.policy.as_ref()).is_some_and(|policy| {
                policy.still_eligible(current.handle, self.request.scope, endpoint, address)
            })
    }

    /// The next endpoint to try: the policy's choice, or, when it names one already
    /// tried (a hashing policy will), the next eligible one not tried yet.
    pub fn next_step(&mut self) -> Next {
        if self.attempts_left == 0 {
            return self.give_up();
        }
        self.attempts_left -= 1;
        let started = Instant::now();
        let handle = self.route.handle;
        let mut decision = match &self.head {
            None => self.policy.select(handle, &self.request),
            Some(head) => self.policy.select_request(handle, &self.request, head),
        };
        if let HostDecision::Forward { endpoint, .. } = decision
            && self.tried.contains(&endpoint)
        {
            match self
                .policy
                .alternative(handle, self.request.scope, &self.tried)
            {
                Some(other) => decision = other,
                None => return self.give_up(),
            }
        }
        let decided = Instant::now();
        self.decided = Some(decided);
        let metrics = &self.route.metrics;
        metrics
            .select
            .observe(decided.duration_since(started).as_secs_f64());
        match decision {
            HostDecision::Forward { endpoint, address } => {
                if self.tried.is_empty() {
                    metrics.forward.inc();
                }
                Next::Forward { endpoint, address }
            }
            HostDecision::Reject => {
                metrics.reject.inc();
                Next::Reject
            }
            HostDecision::Drop => {
                metrics.drop.inc();
                Next::Drop
            }
        }
    }

    /// When the last step was decided: the time an attempt on its endpoint began (one
    /// clock read fewer on every connection and request).
    pub fn decided_at(&self) -> Instant {
        self.decided.unwrap_or_else(Instant::now)
    }

    /// The endpoint answered, after `took`.
    pub fn connected(&self, endpoint: EndpointId, took: Duration) {
        self.outcome(endpoint, OutcomeKind::Connected, took);
    }

    /// The endpoint answered the request with `status`, `took` after it was sent.
    pub fn responded(&self, endpoint: EndpointId, status: u16, took: Duration) {
        self.report(endpoint, RequestEvent::Response(status), took);
    }

    /// The endpoint could not be reached within `took`: counted, told to the policy,
    /// and not tried again for this connection.
    pub fn unreachable(&mut self, endpoint: EndpointId, address: SocketAddr, took: Duration) {
        self.route.metrics.endpoint(address).unreachable.inc();
        match self.head {
            None => self.outcome(endpoint, OutcomeKind::ConnectFailed, took),
            Some(_) => self.report(endpoint, RequestEvent::ConnectFailed, took),
        }
        self.tried.push(endpoint);
    }

    /// The endpoint took the request but failed before answering, `took` after it was
    /// sent: counted and told to the policy.
    pub fn failed(&self, endpoint: EndpointId, address: SocketAddr, took: Duration) {
        self.route.metrics.endpoint(address).unreachable.inc();
        self.report(endpoint, RequestEvent::Failed, took);
    }

    /// The endpoint refused what it was sent (UDP: ICMP port unreachable) after `took`:
    /// counted and told to the policy.
    pub fn refused(&self, endpoint: EndpointId, address: SocketAddr, took: Duration) {
        self.route.metrics.endpoint(address).unreachable.inc();
        self.outcome(endpoint, OutcomeKind::ConnectFailed, took);
    }

    /// The endpoint at `address`, if it may serve this connection: a flow resumed after
    /// a restart keeps its endpoint without asking the policy again.
    pub fn resume(&self, address: SocketAddr) -> Option<(EndpointId, SocketAddr)> {
        let endpoint = (self.policy).eligible_at(self.route.handle, self.request.scope, address)?;
        self.route.metrics.forward.inc();
        Some((endpoint, address))
    }

    /// Not to be tried for this connection: it refused the client just before (the
    /// policy is not told again).
    pub fn avoid(&mut self, endpoint: EndpointId, _address: SocketAddr) {
        self.tried.push(endpoint);
    }

    /// A connection that had connected (a request whose response had begun) ended
    /// after `lasted`.
    pub fn closed(&self, endpoint: EndpointId, lasted: Duration) {
        match self.head {
            None => self.outcome(endpoint, OutcomeKind::Closed, lasted),
            Some(_) => self.report(endpoint, RequestEvent::Finished, lasted),
        }
    }

    fn give_up(&self) -> Next {
        self.route.metrics.gave_up.inc();
        Next::GiveUp
    }

    fn report(&self, endpoint: EndpointId, event: RequestEvent, took: Duration) {
        self.policy.observe_request(
            self.route.handle,
            &RequestOutcome {
                endpoint,
                event,
                micros: took.as_micros() as u64,
            },
        );
    }

    fn outcome(&self, endpoint: EndpointId, kind: OutcomeKind, took: Duration) {
        self.policy.observe(
            self.route.handle,
            &Outcome {
                endpoint,
                kind,
                micros: took.as_micros() as u64,
            },
        );
    }
}
