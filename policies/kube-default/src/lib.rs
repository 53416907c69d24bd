//! `kube-default`: kube-proxy's behaviour as a weir policy, and weir's built-in default.
//!
//! Eligibility is exactly kube-proxy's (EndpointSlice readiness, terminating fallback,
//! topology hints, internal/external traffic policy Local, reject vs drop; see
//! `weir_sdk::kube`). Selection is uniform random among the eligible endpoints, as
//! kube-proxy's iptables `statistic --mode random` and nftables `numgen random` rules do,
//! with `sessionAffinity: ClientIP` keeping a client on its endpoint within the timeout.

use weir_sdk::affinity::ClientIpAffinity;
use weir_sdk::{Connection, Decision, EndpointId, Policy, Service};

/// Takes no configuration.
#[derive(Debug, Default)]
pub struct KubeDefault;

/// Per service port: the client IP affinity table (used only with `sessionAffinity: ClientIP`).
#[derive(Debug, Default)]
pub struct State {
    affinity: ClientIpAffinity,
}

impl Policy for KubeDefault {
    type State = State;

    fn configure(config: &str) -> Result<Self, String> {
        if config.trim().is_empty() || config.trim() == "{}" {
            Ok(KubeDefault)
        } else {
            Err(format!(
                "kube-default takes no configuration, got {:?}; remove it",
                truncate(config)
            ))
        }
    }

    fn select(
        &self,
        state: &mut State,
        service: &Service,
        eligible: &[EndpointId],
        connection: &Connection,
    ) -> Decision {
        let random = || eligible[weir_sdk::random_below(eligible.len())];
        let endpoint = match service.session_affinity_timeout {
            Some(timeout) => state.affinity.select(
                connection.client.ip(),
                timeout,
                eligible,
                weir_sdk::now_nanos(),
                random,
            ),
            None => random(),
        };
        Decision::Forward(endpoint)
    }
}

fn truncate(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

weir_sdk::export_policy!(KubeDefault);
