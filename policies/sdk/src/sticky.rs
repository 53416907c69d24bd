//! Client IP affinity on top of any policy: [`Sticky<P>`] answers a returning client with
//! its previous endpoint (while eligible and within the timeout) and asks `P` otherwise.
//!
//! The timeout is the Service's own `sessionAffinity: ClientIP` timeout when it sets one,
//! else `affinity_timeout_seconds` from the configuration (the Service's
//! `weir.dev/policy-config` over the policy's), default 10800 as Kubernetes'. That key is
//! taken out before `P` sees the configuration.

use serde_json::{Map, Value};

use crate::affinity::ClientIpAffinity;
use crate::request::{Request, RequestOutcome};
use crate::types::{
    Capabilities, Connection, Decision, Eligibility, Endpoint, EndpointId, Node, Outcome, Service,
};
use crate::{Policy, config};

/// The configuration key Sticky reads.
pub const TIMEOUT_KEY: &str = "affinity_timeout_seconds";
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 10_800;

pub struct Sticky<P> {
    inner: P,
    default_timeout: u32,
}

pub struct StickyState<S> {
    inner: S,
    affinity: ClientIpAffinity,
    timeout: u32,
    /// The Service's last good `affinity_timeout_seconds`.
    configured: Option<u32>,
    /// The Service as `P` sees it: its config without Sticky's key.
    service: Option<Service>,
}

impl<S: Default> Default for StickyState<S> {
    fn default() -> Self {
        StickyState {
            inner: S::default(),
            affinity: ClientIpAffinity::default(),
            timeout: DEFAULT_TIMEOUT_SECONDS,
            configured: None,
            service: None,
        }
    }
}

/// Splits Sticky's timeout out of a configuration text; returns it and the rest.
fn split(text: &str) -> Result<(Option<u32>, String), String> {
    let mut object: Map<String, Value> = config::object(text)?;
    let timeout = match object.remove(TIMEOUT_KEY) {
        None => None,
        Some(value) => match value.as_u64().and_then(|v| u32::try_from(v).ok()) {
            Some(t) if (1..=86_400).contains(&t) => Some(t),
            _ => {
                return Err(format!(
                    "`{TIMEOUT_KEY}` must be a number of seconds from 1 to 86400, got `{value}`"
                ));
            }
        },
    };
    let rest = if object.is_empty() {
        String::new()
    } else {
        Value::Object(object).to_string()
    };
    Ok((timeout, rest))
}

impl<P: Policy> Policy for Sticky<P> {
    type State = StickyState<P::State>;

    fn configure(config: &str) -> Result<Self, String> {
        let (timeout, rest) = split(config)?;
        Ok(Sticky {
            inner: P::configure(&rest)?,
            default_timeout: timeout.unwrap_or(DEFAULT_TIMEOUT_SECONDS),
        })
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn update(
        &self,
        state: &mut Self::State,
        service: &Service,
        node: &Node,
        endpoints: &[Endpoint],
    ) -> Eligibility {
        let mut inner_service = service.clone();
        let configured = match service.config.as_deref().map(split) {
            None => None,
            Some(Ok((timeout, rest))) => {
                inner_service.config = (!rest.is_empty()).then_some(rest);
                timeout
            }
            Some(Err(error)) => {
                crate::log(
                    crate::LogLevel::Warn,
                    &format!(
                        "weir.dev/policy-config of {}: {error}; keeping the previous timeout",
                        service.display_name()
                    ),
                );
                state.configured
            }
        };
        state.configured = configured;
        state.timeout = service
            .session_affinity_timeout
            .or(configured)
            .unwrap_or(self.default_timeout);
        let eligibility = self
            .inner
            .update(&mut state.inner, &inner_service, node, endpoints);
        state.affinity.retain_eligible(&eligibility);
        state.service = Some(inner_service);
        eligibility
    }

    fn select(
        &self,
        state: &mut Self::State,
        service: &Service,
        eligible: &[EndpointId],
        connection: &Connection,
    ) -> Decision {
        self.stick(
            state,
            service,
            eligible,
            connection,
            |inner, state, service| inner.select(state, service, eligible, connection),
        )
    }

    fn select_request(
        &self,
        state: &mut Self::State,
        service: &Service,
        eligible: &[EndpointId],
        connection: &Connection,
        request: &dyn Request,
    ) -> Decision {
        self.stick(
            state,
            service,
            eligible,
            connection,
            |inner, state, service| {
                inner.select_request(state, service, eligible, connection, request)
            },
        )
    }

    fn forwarded(&self, state: &mut Self::State, endpoint: EndpointId) {
        self.inner.forwarded(&mut state.inner, endpoint);
    }

    fn observe(&self, state: &mut Self::State, outcome: &Outcome) {
        self.inner.observe(&mut state.inner, outcome);
    }

    fn observe_request(&self, state: &mut Self::State, outcome: &RequestOutcome) {
        self.inner.observe_request(&mut state.inner, outcome);
    }
}

impl<P: Policy> Sticky<P> {
    /// The client's endpoint while its affinity lasts; otherwise `P`'s answer, through
    /// `ask`, remembered for the client.
    fn stick(
        &self,
        state: &mut StickyState<P::State>,
        service: &Service,
        eligible: &[EndpointId],
        connection: &Connection,
        ask: impl FnOnce(&P, &mut P::State, &Service) -> Decision,
    ) -> Decision {
        let inner_service = state.service.as_ref().unwrap_or(service);
        let inner = &self.inner;
        let inner_state = &mut state.inner;
        let mut asked = false;
        let mut refused = None;
        let endpoint = state.affinity.select(
            connection.client.ip(),
            state.timeout,
            eligible,
            crate::now_nanos(),
            || {
                asked = true;
                match ask(inner, inner_state, inner_service) {
                    Decision::Forward(id) => id,
                    other => {
                        refused = Some(other);
                        eligible[0]
                    }
                }
            },
        );
        match refused {
            Some(decision) => {
                // `P` refused this client: remember nothing for it.
                state.affinity.forget(connection.client.ip());
                decision
            }
            None => {
                if !asked {
                    // Affinity answered: `P` still counts the connection.
                    self.inner.forwarded(&mut state.inner, endpoint);
                }
                Decision::Forward(endpoint)
            }
        }
    }
}
