//! The host's capabilities as a policy sees them: log lines, a monotonic clock and
//! randomness. In a Wasm guest they call weir's imports; compiled natively (unit tests,
//! weir's built-in fallback) they use a process clock and a seedable generator, so policy
//! logic can be tested with `cargo test` and no Wasm at all.

use crate::types::LogLevel;

/// Writes a log line through the host, tagged with the policy's name.
pub fn log(level: LogLevel, message: &str) {
    imp::log(level, message)
}

/// Nanoseconds on a monotonic clock; only differences are meaningful.
pub fn now_nanos() -> u64 {
    imp::now_nanos()
}

/// A uniformly distributed 64-bit value (not for cryptography).
pub fn random_u64() -> u64 {
    imp::random_u64()
}

/// A uniformly distributed value in `0..n` (`n` > 0), without modulo bias worth caring
/// about for load balancing (Lemire's multiply-shift).
pub fn random_below(n: usize) -> usize {
    debug_assert!(n > 0);
    ((u128::from(random_u64()) * n as u128) >> 64) as usize
}

/// splitmix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
pub(crate) fn mix_for_tests(state: u64) -> u64 {
    mix(state.wrapping_add(0x9e37_79b9_7f4a_7c15))
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::bindings::weir::policy0_1_0::{clock, log as wit_log, random, types};
    use crate::types::LogLevel;

    pub fn log(level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Trace => types::LogLevel::Trace,
            LogLevel::Debug => types::LogLevel::Debug,
            LogLevel::Info => types::LogLevel::Info,
            LogLevel::Warn => types::LogLevel::Warn,
            LogLevel::Error => types::LogLevel::Error,
        };
        wit_log::log(level, message)
    }

    pub fn now_nanos() -> u64 {
        clock::now()
    }

    thread_local! {
        static STATE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// splitmix64 in the guest, seeded once from the host's randomness: a call into the
    /// host per `select` would cost more than the policy's own work.
    pub fn random_u64() -> u64 {
        STATE.with(|state| {
            let mut current = state.get();
            if current == 0 {
                current = random::next() | 1;
            }
            let next = current.wrapping_add(0x9e37_79b9_7f4a_7c15);
            state.set(next);
            super::mix(next)
        })
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use crate::types::LogLevel;
    use std::cell::Cell;
    use std::sync::OnceLock;
    use std::time::Instant;

    thread_local! {
        static CLOCK_OVERRIDE: Cell<Option<u64>> = const { Cell::new(None) };
        static RNG: Cell<u64> = Cell::new(seed_from_time());
    }

    fn seed_from_time() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        nanos | 1
    }

    pub fn log(level: LogLevel, message: &str) {
        if level >= LogLevel::Warn {
            eprintln!("[{level:?}] {message}");
        }
    }

    pub fn now_nanos() -> u64 {
        if let Some(fixed) = CLOCK_OVERRIDE.with(Cell::get) {
            return fixed;
        }
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    pub fn random_u64() -> u64 {
        // splitmix64: tiny, fast, and good enough to spread connections.
        RNG.with(|state| {
            let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            state.set(next);
            super::mix(next)
        })
    }

    pub fn seed(seed: u64) {
        RNG.with(|state| state.set(seed));
    }

    pub fn set_clock(nanos: Option<u64>) {
        CLOCK_OVERRIDE.with(|c| c.set(nanos));
    }
}

/// Control over the native stand-ins for the host's clock and randomness, for tests of
/// policy logic. Each setting is per thread.
#[cfg(not(target_arch = "wasm32"))]
pub mod testing {
    /// Makes `random_u64` deterministic on this thread.
    pub fn seed_random(seed: u64) {
        super::imp::seed(seed)
    }

    /// Freezes `now_nanos` on this thread at `nanos` (`None` returns to the real clock).
    pub fn set_clock(nanos: Option<u64>) {
        super::imp::set_clock(nanos)
    }
}
