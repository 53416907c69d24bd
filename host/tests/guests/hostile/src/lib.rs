//! A policy that misbehaves on request, to test that weir contains it.
//!
//! Each Service chooses its misbehaviour with its config (`weir.dev/policy-config`); any
//! other config behaves: kube-proxy's eligibility and round-robin selection. The policy's
//! own configuration can make `configure` refuse (`refuse`) or panic (`panic`).

use std::cell::RefCell;

use weir_sdk::{
    Connection, Decision, Eligibility, Endpoint, EndpointId, LogLevel, Node, Policy, Service,
};

pub struct Hostile;

#[derive(Default)]
pub struct State {
    next: usize,
}

thread_local! {
    /// Where the memory bombs keep what they allocate, so nothing is freed.
    static HOARD: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn spin_forever() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn allocate_forever() -> ! {
    // One allocation far past any sane cap, then 1 MiB at a time.
    HOARD.with(|h| h.borrow_mut().push(Vec::with_capacity(256 << 20)));
    loop {
        HOARD.with(|h| h.borrow_mut().push(vec![1u8; 1 << 20]));
    }
}

/// 4 MiB through the log import and 4 MiB through stdout.
fn flood_logs() {
    let line = "x".repeat(4096);
    for _ in 0..1024 {
        weir_sdk::log(LogLevel::Info, &line);
        println!("{line}");
    }
}

impl Policy for Hostile {
    type State = State;

    fn configure(config: &str) -> Result<Self, String> {
        match config {
            "refuse" => Err("this configuration is refused on purpose".into()),
            "panic" => panic!("configure panics on purpose"),
            _ => Ok(Hostile),
        }
    }

    fn update(
        &self,
        _: &mut State,
        service: &Service,
        node: &Node,
        endpoints: &[Endpoint],
    ) -> Eligibility {
        match service.config.as_deref() {
            Some("loop-update") => spin_forever(),
            Some("memory-update") => allocate_forever(),
            Some("panic-update") => panic!("update panics on purpose"),
            Some("log-flood") => {
                flood_logs();
                weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints)
            }
            Some("unknown-id-update") => {
                let mut eligibility =
                    weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints);
                eligibility.internal.endpoints.push(9_999);
                eligibility
            }
            _ => weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints),
        }
    }

    fn select(
        &self,
        state: &mut State,
        service: &Service,
        eligible: &[EndpointId],
        _: &Connection,
    ) -> Decision {
        match service.config.as_deref() {
            Some("loop-select") => spin_forever(),
            Some("memory-select") => allocate_forever(),
            Some("panic-select") => panic!("select panics on purpose"),
            Some("unknown-id-select") => Decision::Forward(9_999),
            _ => {
                let endpoint = eligible[state.next % eligible.len()];
                state.next += 1;
                Decision::Forward(endpoint)
            }
        }
    }
}

weir_sdk::export_policy!(Hostile);
