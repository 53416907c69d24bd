//! What a policy instance can reach: weir's log, clock and random imports, and a WASI
//! context that grants nothing (no files, network or environment; stdout and stderr go
//! to the log under the same cap).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::weir::policy::{clock, log, random, types};
use super::limits::Limits;

/// Everything one instance's `Store` holds.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// Why the last memory or table growth was refused, so a following trap is reported as
    /// the memory cap rather than as the guest's own abort.
    pub(crate) memory_denied: bool,
    memory_bytes: usize,
    pub(crate) log: LogBuffer,
    rng: u64,
    clock_origin: Instant,
}

impl StoreState {
    pub fn new(policy: &str, limits: &Limits, clock_origin: Instant) -> Self {
        let log = LogBuffer::new(policy, limits);
        let mut wasi = WasiCtx::builder();
        wasi.stdout(log.clone())
            .stderr(log.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        StoreState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            memory_denied: false,
            memory_bytes: limits.memory_bytes,
            log,
            rng: seed(),
            clock_origin,
        }
    }
}

fn seed() -> u64 {
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
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_bytes;
        self.memory_denied |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= 100_000;
        self.memory_denied |= !allowed;
        Ok(allowed)
    }
}

impl types::Host for StoreState {}

impl log::Host for StoreState {
    fn log(&mut self, level: types::LogLevel, message: String) {
        self.log.message(level, &message);
    }
}

impl clock::Host for StoreState {
    fn now(&mut self) -> u64 {
        self.clock_origin.elapsed().as_nanos() as u64
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
/// stdout/stderr streams.
#[derive(Clone)]
pub struct LogBuffer {
    inner: Arc<Mutex<LogState>>,
}

struct LogState {
    policy: String,
    budget: usize,
    per_call: usize,
    message_cap: usize,
    dropped: u64,
    partial_line: Vec<u8>,
}

impl LogBuffer {
    fn new(policy: &str, limits: &Limits) -> Self {
        LogBuffer {
            inner: Arc::new(Mutex::new(LogState {
                policy: policy.to_string(),
                budget: limits.log_bytes_per_call,
                per_call: limits.log_bytes_per_call,
                message_cap: limits.log_message_bytes,
                dropped: 0,
                partial_line: Vec::new(),
            })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a call: restores the per-call budget. Returns the bytes dropped since the
    /// previous call, for the metrics.
    pub fn start_call(&self) -> u64 {
        let mut state = self.state();
        state.budget = state.per_call;
        std::mem::take(&mut state.dropped)
    }

    fn message(&self, level: types::LogLevel, message: &str) {
        let mut state = self.state();
        let cut = floor_char_boundary(message, state.message_cap);
        let text = &message[..cut];
        if text.len() > state.budget {
            state.dropped += message.len() as u64;
            return;
        }
        state.budget -= text.len();
        state.dropped += (message.len() - cut) as u64;
        emit(&state.policy, level, text);
    }

    fn bytes(&self, bytes: &[u8]) {
        let mut state = self.state();
        let take = bytes.len().min(state.budget);
        state.budget -= take;
        state.dropped += (bytes.len() - take) as u64;
        state.partial_line.extend_from_slice(&bytes[..take]);
        while let Some(end) = state.partial_line.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = state.partial_line.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]);
            let cut = floor_char_boundary(&text, state.message_cap);
            emit(&state.policy, types::LogLevel::Info, &text[..cut]);
        }
        if state.partial_line.len() > state.message_cap {
            let line = std::mem::take(&mut state.partial_line);
            let cut = state.message_cap;
            emit(
                &state.policy,
                types::LogLevel::Info,
                &String::from_utf8_lossy(&line[..cut]),
            );
        }
    }
}

fn floor_char_boundary(text: &str, max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    (0..=max)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
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
