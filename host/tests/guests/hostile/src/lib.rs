//! A policy that misbehaves on request, to test that weir contains it.
//!
//! Each Service chooses its misbehaviour with its config (`weir.dev/policy-config`); any
//! other config behaves: kube-proxy's eligibility and round-robin selection. A few arms
//! behave within bounds (`spin-select:<ms>`, `allocate-8mib-update`) so tests can show a
//! limit is the configured one, and `client-echo` forwards to the endpoint whose id is the
//! last byte of the client's address, to check addresses cross the boundary intact. The policy's
//! own configuration can make `configure` refuse (`refuse`) or panic (`panic`).
//! `resource-flood-update` and `random-bomb-update` push the host's bounds on WASI
//! resources held and random bytes per call.

use std::cell::RefCell;

use weir_sdk::{
    Connection, Decision, Eligibility, Endpoint, EndpointId, LogLevel, Node, Policy, Service,
};

pub struct Hostile;

#[derive(Default)]
pub struct State {
    next: usize,
    /// For `ineligible-select`: an endpoint `update` left out on purpose.
    excluded: Option<EndpointId>,
}

thread_local! {
    /// Where the memory bombs keep what they allocate, so nothing is freed.
    static HOARD: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// `update` calls this instance has had, for `panic-if-first-update`.
    static UPDATES_SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
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
/// Busy for `millis` of the host's clock, then done.
fn spin_for(millis: u64) {
    let start = weir_sdk::now_nanos();
    while weir_sdk::now_nanos() - start < millis * 1_000_000 {
        std::hint::black_box(());
    }
}

/// Host resources (WASI pollables) created and never dropped.
/// WASI's secure and insecure randomness, wall clock and monotonic clock, mixed.
#[cfg(target_arch = "wasm32")]
fn wasi_entropy() -> u64 {
    let wall = wasip2::clocks::wall_clock::now();
    wasip2::random::random::get_random_u64()
        ^ wasip2::random::insecure::get_insecure_random_u64().rotate_left(13)
        ^ wall.seconds.wrapping_mul(31)
        ^ u64::from(wall.nanoseconds)
        ^ wasip2::clocks::monotonic_clock::now().rotate_left(29)
}

#[cfg(not(target_arch = "wasm32"))]
fn wasi_entropy() -> u64 {
    0
}

fn hoard_resources() -> ! {
    #[cfg(target_arch = "wasm32")]
    loop {
        std::mem::forget(wasip2::clocks::monotonic_clock::subscribe_duration(1));
    }
    #[cfg(not(target_arch = "wasm32"))]
    unreachable!("only as a component")
}

/// 64 MiB of randomness in one call.
fn random_bomb() -> usize {
    #[cfg(target_arch = "wasm32")]
    return wasip2::random::random::get_random_bytes(64 << 20).len();
    #[cfg(not(target_arch = "wasm32"))]
    unreachable!("only as a component")
}

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
        state: &mut State,
        service: &Service,
        node: &Node,
        endpoints: &[Endpoint],
    ) -> Eligibility {
        let seen = UPDATES_SEEN.with(|n| n.replace(n.get() + 1));
        match service.config.as_deref() {
            // Fine when other services came first; fails when replayed first into a fresh
            // instance (replays go in handle order).
            Some("panic-if-first-update") if seen == 0 => panic!("first update of an instance"),
            Some("sleep-update") => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                unreachable!("slept an hour")
            }
            Some("allocate-8mib-update") => {
                let block = vec![1u8; 8 << 20];
                std::hint::black_box(&block);
                weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints)
            }
            Some("ineligible-select") => {
                let mut eligibility =
                    weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints);
                state.excluded = eligibility.internal.endpoints.pop();
                eligibility
            }
            Some("loop-update") => spin_forever(),
            Some("memory-update") => allocate_forever(),
            Some("resource-flood-update") => hoard_resources(),
            Some("random-bomb-update") => {
                std::hint::black_box(random_bomb());
                weir_sdk::kube::kube_proxy_eligibility(service, node, endpoints)
            }
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
        connection: &Connection,
    ) -> Decision {
        match service.config.as_deref() {
            Some("sleep-select") => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                unreachable!("slept an hour")
            }
            Some(spin) if spin.starts_with("spin-select:") => {
                spin_for(spin["spin-select:".len()..].parse().expect("milliseconds"));
                Decision::Forward(eligible[0])
            }
            Some("ineligible-select") => Decision::Forward(state.excluded.expect("update ran")),
            Some("client-echo") => {
                // The last byte of the client's address names the endpoint, so a host that
                // mangled either half of an IPv6 address would be caught.
                let id = match connection.client.ip() {
                    std::net::IpAddr::V4(v4) if v4.octets()[0] == 198 => v4.octets()[3],
                    std::net::IpAddr::V6(v6) if v6.octets()[0] == 0xfd => v6.octets()[15],
                    _ => return Decision::Reject,
                };
                Decision::Forward(u32::from(id))
            }
            Some("loop-select") => spin_forever(),
            Some("memory-select") => allocate_forever(),
            Some("panic-select") => panic!("select panics on purpose"),
            Some("unknown-id-select") => Decision::Forward(9_999),
            // WASI's randomness and clocks pick the endpoint: repeatable only if the host
            // makes them so.
            Some("wasi-select") => {
                let picked = wasi_entropy() % eligible.len() as u64;
                Decision::Forward(eligible[picked as usize])
            }
            _ => {
                let endpoint = eligible[state.next % eligible.len()];
                state.next += 1;
                Decision::Forward(endpoint)
            }
        }
    }
}

weir_sdk::export_policy!(Hostile);
