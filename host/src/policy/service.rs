//! What the host and a policy runtime say about one service port: the input a policy is
//! told, the answer to an update, the decision for a connection, and the failure mode.

use std::net::SocketAddr;
use std::sync::Arc;

use weir_sdk::{Endpoint, EndpointId, Node, Service};

use super::instance::CallError;
use weir_sdk::Eligibility;

/// What a service gets when its policy fails (`open` or `closed` in weir.toml and
/// policies.toml).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// weir's built-in kube-default answer: kube-proxy's eligibility and random selection.
    #[default]
    Open,
    /// Reject all traffic.
    Closed,
}

impl FailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
        }
    }
}

/// Everything a policy is told about one service port, kept to rebuild its instance.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceInput {
    pub service: Service,
    pub node: Arc<Node>,
    /// The endpoints with their host-assigned ids, sorted by id.
    pub endpoints: Vec<Endpoint>,
    pub failure_mode: FailureMode,
    /// The port's memory budget in MiB, when its Service or policy sets one (else
    /// `limits.memory_mib`); never more than the node's ceiling.
    pub memory_mib: Option<u32>,
}

impl ServiceInput {
    /// The `ip:port` of every endpoint in `set`, sorted as strings (how reports show them).
    /// `set` is normalized (sorted); this input's endpoints may be in any order.
    pub fn addresses(&self, set: &weir_sdk::EndpointSet) -> Vec<String> {
        let mut out: Vec<String> = self
            .endpoints
            .iter()
            .filter(|e| set.endpoints.binary_search(&e.id).is_ok())
            .map(|e| e.address.to_string())
            .collect();
        out.sort();
        out
    }

    pub(crate) fn address(&self, id: EndpointId) -> Option<SocketAddr> {
        self.endpoints
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .map(|i| self.endpoints[i].address)
    }
}

/// The host's decision for one connection, with the address to connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostDecision {
    Forward {
        endpoint: EndpointId,
        address: SocketAddr,
    },
    Reject,
    Drop,
}

/// The outcome of pushing one update.
#[derive(Clone, Debug)]
pub struct UpdateAnswer {
    /// What serves the service now: the policy's answer, or the failure mode's.
    pub eligibility: Eligibility,
    /// Why the policy's answer is not in use, when it is not.
    pub failure: Option<CallError>,
}
