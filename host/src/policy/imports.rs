//! What a policy instance can reach: weir's log, clock and random imports, and a WASI
//! context that grants nothing (no files, network or environment; stdout and stderr go
//! to the log under the same cap).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::RequestHead;
use super::bindings::weir::policy0_1_0::{clock, log, random, types};
use super::limits::Limits;

/// Everything one instance's `Store` holds.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// Why the last memory or table growth was refused, so a following trap is reported as
    /// the memory cap rather than as the guest's own abort.
    pub(crate) memory_denied: bool,
    /// The service port's memory budget, over all the instance's memories together, and
    /// what they use now.
    pub(crate) memory_budget: usize,
    memory_used: usize,
    max_core_instances: usize,
    max_memories: usize,
    max_tables: usize,
    max_table_elements: usize,
    pub(crate) log: LogBuffer,
    rng: u64,
    clock: Arc<PolicyClock>,
    /// The current call's deadline, as a duration and in epoch ticks.
    pub(crate) deadline: std::time::Duration,
    pub(crate) deadline_ticks: u64,
    /// This thread's CPU time when the current call's deadline last passed, and how many
    /// times it was extended since (see `PolicyInstance::overrun`).
    pub(crate) cpu_at_deadline: Option<std::time::Duration>,
    pub(crate) extensions: u32,
    /// The request lent to the current `select-request` call, if it is one.
    pub(crate) request: Option<Arc<RequestHead>>,
}

/// The clock policies read: monotonic, shared by every instance of an engine, and movable
/// forward by tools that replay time (`weir policy test` scripts). A frozen clock moves
/// only when moved: what a seeded engine gives its instances, so that a run repeats.
#[derive(Debug)]
pub struct PolicyClock {
    origin: Instant,
    offset_nanos: AtomicU64,
    frozen: bool,
}

impl Default for PolicyClock {
    fn default() -> Self {
        PolicyClock {
            origin: Instant::now(),
            offset_nanos: AtomicU64::new(0),
            frozen: false,
        }
    }
}

/// Where a frozen clock's wall time starts: 2026-01-01T00:00:00Z.
const FROZEN_EPOCH_SECONDS: u64 = 1_767_225_600;

impl PolicyClock {
    /// A clock that moves only with [`PolicyClock::advance`].
    pub fn frozen() -> Self {
        PolicyClock {
            frozen: true,
            ..PolicyClock::default()
        }
    }

    pub fn now_nanos(&self) -> u64 {
        let offset = self.offset_nanos.load(Ordering::Relaxed);
        if self.frozen {
            return offset;
        }
        self.origin.elapsed().as_nanos() as u64 + offset
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.offset_nanos
            .fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl StoreState {
    /// `seed` makes the instance's randomness repeatable (`None`: from the time);
    /// `memory_budget` caps all of the instance's linear memory together.
    pub fn new(
        policy: &str,
        limits: &Limits,
        clock: Arc<PolicyClock>,
        seed: Option<u64>,
        memory_budget: usize,
    ) -> Self {
        let log = LogBuffer::new(policy, limits);
        let mut wasi = WasiCtx::builder();
        wasi.stdout(log.clone())
            .stderr(log.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(limits.random_bytes_per_call);
        if let Some(seed) = seed {
            // Seeded: WASI's randomness and clocks repeat too, not only weir's imports.
            wasi.secure_random(seeded_bytes(seed))
                .insecure_random(seeded_bytes(seed.rotate_left(17)))
                .insecure_random_seed(u128::from(seed))
                .monotonic_clock(TestClock(clock.clone()))
                .wall_clock(TestClock(clock.clone()));
        }
        let mut table = ResourceTable::new();
        table.set_max_capacity(limits.max_resources);
        StoreState {
            wasi: wasi.build(),
            table,
            memory_denied: false,
            memory_budget,
            memory_used: 0,
            max_core_instances: limits.max_core_instances,
            max_memories: limits.max_memories,
            max_tables: limits.max_tables,
            max_table_elements: limits.max_table_elements,
            log,
            rng: seed.unwrap_or_else(time_seed),
            clock,
            deadline: limits.update_deadline,
            deadline_ticks: limits.ticks(limits.update_deadline),
            cpu_at_deadline: None,
            extensions: 0,
            request: None,
        }
    }
}

/// 64 KiB from `seed` (splitmix64), repeated: WASI randomness for a seeded instance.
fn seeded_bytes(seed: u64) -> wasmtime_wasi::Deterministic {
    let mut state = seed;
    let mut bytes = Vec::with_capacity(64 << 10);
    while bytes.len() < 64 << 10 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        bytes.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    wasmtime_wasi::Deterministic::new(bytes)
}

/// WASI's clocks from the engine's clock, for seeded instances.
struct TestClock(Arc<PolicyClock>);

impl wasmtime_wasi::HostMonotonicClock for TestClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.0.now_nanos()
    }
}

impl wasmtime_wasi::HostWallClock for TestClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(1)
    }

    fn now(&self) -> std::time::Duration {
        std::time::Duration::from_secs(FROZEN_EPOCH_SECONDS)
            + std::time::Duration::from_nanos(self.0.now_nanos())
    }
}

fn time_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let stack = &nanos as *const u64 as u64;
    (nanos ^ stack.rotate_left(32)) | 1
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime::ResourceLimiter for StoreState {
    /// Counts every memory of the instance against one budget (a memory's creation is a
    /// growth from 0), so extra memories cannot multiply it.
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let used = self.memory_used + desired.saturating_sub(current);
        let allowed = used <= self.memory_budget;
        if allowed {
            self.memory_used = used;
        }
        self.memory_denied |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.max_table_elements;
        self.memory_denied |= !allowed;
        Ok(allowed)
    }

    fn instances(&self) -> usize {
        self.max_core_instances
    }

    fn memories(&self) -> usize {
        self.max_memories
    }

    fn tables(&self) -> usize {
        self.max_tables
    }
}

impl types::Host for StoreState {}

impl log::Host for StoreState {
    // Shadowed by [`link_log`], which copies no more of the message than the cap.
    fn log(&mut self, level: types::LogLevel, message: String) {
        self.log.message(level, &message);
    }
}

/// The log import, reading the message in place in the guest's memory and copying at
/// most the per-message cap out of it (the generated binding would copy it all first).
pub(crate) fn link_log(linker: &mut wasmtime::component::Linker<StoreState>) -> anyhow::Result<()> {
    use wasmtime::component::WasmStr;
    linker.allow_shadowing(true);
    let mut log = linker.instance(LOG_INTERFACE)?;
    log.func_wrap(
        "log",
        |store: wasmtime::StoreContextMut<'_, StoreState>,
         (level, message): (types::LogLevel, WasmStr)| {
            let text = message.to_str(&store)?;
            store.data().log.message(level, &text);
            Ok(())
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The log interface's name as the component model links it.
const LOG_INTERFACE: &str = "weir:policy/log@0.1.0";

impl clock::Host for StoreState {
    fn now(&mut self) -> u64 {
        self.clock.now_nanos()
    }
}

impl random::Host for StoreState {
    fn next(&mut self) -> u64 {
        // splitmix64: the guest asks for spread, not secrecy.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Log output of one instance, capped per call. Shared by the log import and the WASI
/// stdout/stderr streams; the per-call accounting is two atomics so that a call that logs
/// nothing pays almost nothing for it.
#[derive(Clone)]
pub struct LogBuffer {
    inner: Arc<LogShared>,
}

struct LogShared {
    policy: String,
    per_call: usize,
    message_cap: usize,
    budget: AtomicUsize,
    dropped: AtomicU64,
    /// Bytes of stdout/stderr not yet ended by a newline.
    partial_line: Mutex<Vec<u8>>,
}

impl LogBuffer {
    fn new(policy: &str, limits: &Limits) -> Self {
        LogBuffer {
            inner: Arc::new(LogShared {
                policy: policy.to_string(),
                per_call: limits.log_bytes_per_call,
                message_cap: limits.log_message_bytes,
                budget: AtomicUsize::new(limits.log_bytes_per_call),
                dropped: AtomicU64::new(0),
                partial_line: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Restores the per-call budget and returns the bytes dropped since the last time.
    pub fn start_call(&self) -> u64 {
        self.inner
            .budget
            .store(self.inner.per_call, Ordering::Relaxed);
        self.inner.dropped.swap(0, Ordering::Relaxed)
    }

    /// Takes `wanted` bytes of the budget if it has them all; otherwise takes nothing and
    /// counts them as dropped.
    fn take_all(&self, wanted: usize) -> bool {
        let budget = self.inner.budget.load(Ordering::Relaxed);
        if wanted <= budget {
            self.inner.budget.store(budget - wanted, Ordering::Relaxed);
            true
        } else {
            self.drop_bytes(wanted);
            false
        }
    }

    fn drop_bytes(&self, bytes: usize) {
        self.inner
            .dropped
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn message(&self, level: types::LogLevel, message: &str) {
        let head = crate::units::head(message, self.inner.message_cap);
        self.drop_bytes(message.len() - head.len());
        if self.take_all(head.len()) {
            emit(&self.inner.policy, level, head);
        }
    }

    fn bytes(&self, bytes: &[u8]) {
        let budget = self.inner.budget.load(Ordering::Relaxed);
        let taken = bytes.len().min(budget);
        self.inner.budget.store(budget - taken, Ordering::Relaxed);
        self.drop_bytes(bytes.len() - taken);
        let cap = self.inner.message_cap;
        let mut partial = crate::locks::lock(&self.inner.partial_line);
        partial.extend_from_slice(&bytes[..taken]);
        while let Some(end) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]);
            let head = crate::units::head(&text, cap);
            self.drop_bytes(text.len() - head.len());
            emit(&self.inner.policy, types::LogLevel::Info, head);
        }
        if partial.len() > cap {
            // A line longer than the cap: its head is written, the rest dropped.
            let line = std::mem::take(&mut *partial);
            self.drop_bytes(line.len() - cap);
            emit(
                &self.inner.policy,
                types::LogLevel::Info,
                &String::from_utf8_lossy(&line[..cap]),
            );
        }
    }
}

fn emit(policy: &str, level: types::LogLevel, text: &str) {
    match level {
        types::LogLevel::Trace => tracing::trace!(target: "weir::policy::guest", policy, "{text}"),
        types::LogLevel::Debug => tracing::debug!(target: "weir::policy::guest", policy, "{text}"),
        types::LogLevel::Info => tracing::info!(target: "weir::policy::guest", policy, "{text}"),
        types::LogLevel::Warn => tracing::warn!(target: "weir::policy::guest", policy, "{text}"),
        types::LogLevel::Error => tracing::error!(target: "weir::policy::guest", policy, "{text}"),
    }
}

impl IsTerminal for LogBuffer {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogBuffer {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASIp3 guests use this; weir links WASIp2, so their output is discarded.
        Box::new(tokio::io::sink())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogStream(self.clone()))
    }
}

struct LogStream(LogBuffer);

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.0.bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 << 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    fn state(budget: usize) -> StoreState {
        StoreState::new("test", &Limits::default(), Arc::default(), Some(1), budget)
    }

    #[test]
    fn every_memory_of_an_instance_counts_against_one_budget() {
        let mut state = state(8 << 20);
        // A first memory created at 4 MiB, then a second one: together past 8 MiB.
        assert!(state.memory_growing(0, 4 << 20, None).unwrap());
        assert!(state.memory_growing(0, 3 << 20, None).unwrap());
        assert!(!state.memory_growing(0, 2 << 20, None).unwrap());
        assert!(state.memory_denied);
        // Growing the first by 1 MiB still fits.
        assert!(state.memory_growing(4 << 20, 5 << 20, None).unwrap());
    }

    #[test]
    fn components_may_not_multiply_instances_memories_or_tables() {
        let state = state(16 << 20);
        let limits = Limits::default();
        assert_eq!(state.instances(), limits.max_core_instances);
        assert_eq!(state.memories(), limits.max_memories);
        assert_eq!(state.tables(), limits.max_tables);
        let mut state = state;
        assert!(
            !state
                .table_growing(0, limits.max_table_elements + 1, None)
                .unwrap()
        );
    }
}
