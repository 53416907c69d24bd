//! `round-robin`: the smallest useful policy. kube-proxy's eligibility (the SDK's default
//! `update`), then each eligible endpoint in turn.
//!
//! Build: `cargo build -p round-robin --target wasm32-wasip2 --release`, then put
//! `target/wasm32-wasip2/release/round_robin.wasm` in weir's policies directory as
//! `round-robin.wasm` and annotate a Service with `weir.dev/policy: round-robin`.

use weir_sdk::{Connection, Decision, EndpointId, Policy, Service};

pub struct RoundRobin;

/// Per service port: how many connections it has placed.
#[derive(Debug, Default)]
pub struct State {
    next: usize,
}

impl Policy for RoundRobin {
    type State = State;

    fn configure(_config: &str) -> Result<Self, String> {
        Ok(RoundRobin)
    }

    fn select(
        &self,
        state: &mut State,
        _service: &Service,
        eligible: &[EndpointId],
        _connection: &Connection,
    ) -> Decision {
        let endpoint = eligible[state.next % eligible.len()];
        state.next = state.next.wrapping_add(1);
        Decision::Forward(endpoint)
    }
}

weir_sdk::export_policy!(RoundRobin);
