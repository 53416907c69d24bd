//! The one wasmtime `Engine` of the process, configured in one place, and the loading of
//! policy components into it: format checks, compile (or cache hit), world check, link.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{Component, InstancePre, Linker};

use super::bindings::exports::weir::{policy0_1_0::policy, policy0_2_0::requests};
use super::cache::ArtifactCache;
use super::compile::{self, Compiler, Outcome, engine_config};
use super::imports::{PolicyClock, StoreState};
use super::limits::Limits;
use super::metrics::PolicyMetrics;
use super::{EXPECTED_EXPORT, REQUESTS_EXPORT, bindings};

/// Why a module was refused. Every message names the module and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "{source_name}: not a WebAssembly file (it starts with {found}); a policy is a component built with `cargo build --target wasm32-wasip2`"
    )]
    NotWasm { source_name: String, found: String },
    #[error(
        "{source_name}: a core WebAssembly module, not a component; build the policy for `wasm32-wasip2` (which emits a component), or wrap a core module with `wasm-tools component new`"
    )]
    CoreModule { source_name: String },
    #[error(
        "{source_name}: WebAssembly of an unknown version or layer ({version:#010x}); weir loads components (version 0x0d, layer 1)"
    )]
    UnknownEncoding { source_name: String, version: u32 },
    #[error("{source_name}: failed to compile: {reason}")]
    Compile { source_name: String, reason: String },
    #[error(
        "{source_name}: exports {exports}, but weir expects `{expected}`; build it against weir's wit/ (package weir:policy@0.2.0, or 0.1.0, world policy-world)"
    )]
    WrongWorld {
        source_name: String,
        expected: &'static str,
        exports: String,
    },
    #[error(
        "{source_name}: imports `{import}`, which weir does not provide (policies may import only weir:policy/log, clock, random and WASI)"
    )]
    UnsupportedImport { source_name: String, import: String },
    #[error("{source_name}: does not match weir's `{expected}`: {reason}")]
    Link {
        source_name: String,
        expected: &'static str,
        reason: String,
    },
    #[error("{source_name}: could not read: {reason}")]
    Read { source_name: String, reason: String },
    #[error("{source_name}: refused: {reason}")]
    CompileBudget { source_name: String, reason: String },
    /// Compiling in the background; ask again.
    #[error("{source_name}: compiling")]
    Pending { source_name: String },
}

/// A policy compiled and linked, ready to instantiate any number of times.
pub struct CompiledPolicy {
    /// The policy's name (the file stem of its module, or `kube-default`).
    pub name: String,
    /// Lowercase hex sha256 of the module's bytes.
    pub sha256: String,
    pub size: usize,
    /// Time to compile, or to load from the cache when `from_cache`.
    pub compile_time: Duration,
    pub from_cache: bool,
    pub exports: Vec<String>,
    pub imports: Vec<String>,
    pub(crate) pre: InstancePre<StoreState>,
    /// Where its exports are: 0.1.0's `policy` always, 0.2.0's `requests` when it
    /// targets 0.2.0.
    pub(crate) policy_export: policy::GuestIndices,
    pub(crate) requests_export: Option<requests::GuestIndices>,
    component: Component,
}

impl CompiledPolicy {
    /// The contract version the component targets: `0.2.0` when it decides requests
    /// itself, `0.1.0` when its `select` is asked per request too.
    pub fn contract(&self) -> &'static str {
        if self.requests_export.is_some() {
            "0.2.0"
        } else {
            "0.1.0"
        }
    }
}

/// The process's policy engine: one `Engine` (component model, pooling allocator, epoch
/// interruption), one `Linker` with weir's imports, and the ticker that drives deadlines.
pub struct PolicyEngine {
    pub(crate) engine: Engine,
    linker: Linker<StoreState>,
    pub(crate) limits: Limits,
    cache: Option<ArtifactCache>,
    /// Compiles modules in a child process under a budget; `None`: in this process (the
    /// command-line tools, which compile what their user hands them).
    compiler: Option<Compiler>,
    pub(crate) metrics: Arc<PolicyMetrics>,
    pub(crate) clock: Arc<PolicyClock>,
    /// When set, every instance's randomness is derived from it, in creation order.
    random_seed: Option<u64>,
    instances_created: AtomicU64,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for PolicyEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl PolicyEngine {
    /// Builds the engine. `cache_dir` holds compiled components (`None`: compile every time).
    pub fn new(
        limits: Limits,
        cache_dir: Option<&Path>,
        metrics: Arc<PolicyMetrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let engine = Engine::new(&engine_config(&limits))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        forbid_blocking(&mut linker)?;
        bindings::PolicyWorld::add_to_linker::<_, wasmtime::component::HasSelf<StoreState>>(
            &mut linker,
            |state| state,
        )?;
        super::imports::link_log(&mut linker)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_ticker(engine.clone(), limits.epoch_tick, ticker_stop.clone());
        let cache = cache_dir.and_then(|dir| {
            ArtifactCache::new(&engine, dir)
                .inspect_err(|error| tracing::error!("{error}"))
                .ok()
        });
        Ok(Arc::new(PolicyEngine {
            engine,
            linker,
            limits,
            cache,
            compiler: None,
            metrics,
            clock: Arc::new(PolicyClock::default()),
            random_seed: None,
            instances_created: AtomicU64::new(0),
            ticker_stop,
        }))
    }

    /// An engine whose instances draw repeatable randomness from `seed` (weir's random
    /// import and WASI's) and read a clock that moves only with [`Self::advance_clock`]
    /// (weir's clock import and WASI's clocks), for tools that must give the same answer
    /// twice (`weir policy test`, replays).
    pub fn new_seeded(
        limits: Limits,
        cache_dir: Option<&Path>,
        metrics: Arc<PolicyMetrics>,
        seed: u64,
    ) -> anyhow::Result<Arc<Self>> {
        let mut engine = Self::new(limits, cache_dir, metrics)?;
        let seeded = Arc::get_mut(&mut engine).expect("just built, not shared");
        seeded.random_seed = Some(seed);
        // Time moves only when the tool moves it: a run repeats whatever the machine.
        seeded.clock = Arc::new(PolicyClock::frozen());
        Ok(engine)
    }

    /// An engine that compiles modules in `exe` (weir's own binary, `weir compile-policy`)
    /// under the limits' compile budget, in the background: a module's first load answers
    /// [`LoadError::Pending`] and a later one the outcome.
    pub fn new_isolated(
        limits: Limits,
        cache_dir: Option<&Path>,
        metrics: Arc<PolicyMetrics>,
        exe: std::path::PathBuf,
    ) -> anyhow::Result<Arc<Self>> {
        let compiler = Compiler::new(exe, &limits);
        let mut engine = Self::new(limits, cache_dir, metrics)?;
        Arc::get_mut(&mut engine)
            .expect("just built, not shared")
            .compiler = Some(compiler);
        Ok(engine)
    }

    /// Caches a module's compilation once it has been accepted (swapped in): a module
    /// refused at any step is compiled again, never kept.
    pub fn keep(&self, policy: &CompiledPolicy) {
        if !policy.from_cache
            && let Some(cache) = &self.cache
        {
            cache.store(&policy.sha256, &policy.component);
        }
    }

    /// Whether a module is being compiled in the background now.
    pub fn compiling(&self) -> bool {
        self.compiler.as_ref().is_some_and(Compiler::busy)
    }

    /// Moves the policies' clock forward (session affinity expiry, EWMA decay...).
    pub fn advance_clock(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// The randomness seed for the next instance.
    pub(crate) fn instance_seed(&self) -> Option<u64> {
        let n = self.instances_created.fetch_add(1, Ordering::Relaxed);
        self.random_seed
            .map(|seed| (seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn metrics(&self) -> &Arc<PolicyMetrics> {
        &self.metrics
    }

    /// Reads and loads a module file; the policy's name is the file stem.
    pub fn load_file(&self, path: &Path) -> Result<Arc<CompiledPolicy>, LoadError> {
        let source_name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| LoadError::Read {
            source_name: source_name.clone(),
            reason: e.to_string(),
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.load(&name, &source_name, &bytes)
    }

    /// Checks, compiles (or loads from the cache) and links one module.
    pub fn load(
        &self,
        name: &str,
        source_name: &str,
        bytes: &[u8],
    ) -> Result<Arc<CompiledPolicy>, LoadError> {
        let bytes = &*unpack(source_name, bytes, self.limits.max_module_bytes)?;
        check_encoding(source_name, bytes)?;
        if bytes.len() > self.limits.max_module_bytes {
            return Err(LoadError::CompileBudget {
                source_name: source_name.to_string(),
                reason: format!(
                    "{} KiB is over the {} KiB a module may be",
                    bytes.len() >> 10,
                    self.limits.max_module_bytes >> 10
                ),
            });
        }
        let sha256 = sha256_hex(bytes);
        let started = Instant::now();
        let cached = self
            .cache
            .as_ref()
            .and_then(|c| c.load(&self.engine, &sha256));
        let from_cache = cached.is_some();
        let compile_error = |reason: String| LoadError::Compile {
            source_name: source_name.to_string(),
            reason,
        };
        let component = match (cached, &self.compiler) {
            (Some(component), _) => component,
            (None, None) => {
                Component::new(&self.engine, bytes).map_err(|e| compile_error(format!("{e:#}")))?
            }
            (None, Some(compiler)) => match compiler.take(&sha256, bytes) {
                None => {
                    return Err(LoadError::Pending {
                        source_name: source_name.to_string(),
                    });
                }
                Some(Outcome::Compiled(artifact)) => compile::load(&self.engine, &artifact)
                    .map_err(|e| compile_error(format!("{e:#}")))?,
                Some(Outcome::Invalid(reason)) => return Err(compile_error(reason)),
                Some(Outcome::OverBudget(reason)) => {
                    return Err(LoadError::CompileBudget {
                        source_name: source_name.to_string(),
                        reason,
                    });
                }
            },
        };
        let compile_time = started.elapsed();

        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let imports: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        if !exports.iter().any(|e| e == EXPECTED_EXPORT) {
            return Err(LoadError::WrongWorld {
                source_name: source_name.to_string(),
                expected: EXPECTED_EXPORT,
                exports: if exports.is_empty() {
                    "nothing".to_string()
                } else {
                    exports
                        .iter()
                        .map(|e| format!("`{e}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            });
        }
        if let Some(import) = imports
            .iter()
            .find(|i| !(i.starts_with("weir:policy/") || i.starts_with("wasi:")))
        {
            return Err(LoadError::UnsupportedImport {
                source_name: source_name.to_string(),
                import: import.clone(),
            });
        }
        let link_error = |e: wasmtime::Error| LoadError::Link {
            source_name: source_name.to_string(),
            expected: EXPECTED_EXPORT,
            reason: format!("{e:#}"),
        };
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(link_error)?;
        let policy_export = policy::GuestIndices::new(&instance_pre).map_err(link_error)?;
        // A 0.2.0 component decides requests; a 0.1.0 one does not have the export. One
        // that has it in another shape is refused, as any export that does not match.
        let requests_export = if exports.iter().any(|e| e == REQUESTS_EXPORT) {
            Some(requests::GuestIndices::new(&instance_pre).map_err(link_error)?)
        } else {
            None
        };

        Ok(Arc::new(CompiledPolicy {
            name: name.to_string(),
            sha256,
            size: bytes.len(),
            compile_time,
            from_cache,
            exports,
            imports,
            pre: instance_pre,
            policy_export,
            requests_export,
            component,
        }))
    }

    /// The built-in kube-default component.
    pub fn load_kube_default(&self) -> Result<Arc<CompiledPolicy>, LoadError> {
        self.load(
            super::DEFAULT_POLICY,
            "built-in kube-default",
            super::KUBE_DEFAULT_WASM,
        )
    }
}

/// The WASI version wasmtime-wasi links; its blocking functions are replaced below.
const WASI_IO_POLL: &str = "wasi:io/poll@0.2.12";

/// Blocking waits (`pollable.block`, `poll`, hence `std::thread::sleep`) run in the host,
/// where an epoch deadline cannot interrupt them: a policy could hold a worker forever.
/// They trap instead. Nothing a policy needs can block: its only I/O is the log.
fn forbid_blocking(linker: &mut Linker<StoreState>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    let mut poll = linker.instance(WASI_IO_POLL)?;
    for name in ["poll", "[method]pollable.block"] {
        poll.func_new(name, move |_, _, _, _| {
            Err(wasmtime::Error::msg(format!(
                "policies may not block or sleep (called {WASI_IO_POLL}#{name})"
            )))
        })?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// A module as shipped: a component, or a gzip of one (`NAME.wasm.gz`, so that a whole
/// library fits in one ConfigMap), inflated to at most `max` bytes.
pub fn unpack<'a>(
    source_name: &str,
    bytes: &'a [u8],
    max: usize,
) -> Result<std::borrow::Cow<'a, [u8]>, LoadError> {
    use std::io::Read;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(std::borrow::Cow::Borrowed(bytes));
    }
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(max as u64 + 1)
        .read_to_end(&mut inflated)
        .map_err(|e| LoadError::NotWasm {
            source_name: source_name.to_string(),
            found: format!("a gzip stream that does not inflate ({e})"),
        })?;
    if inflated.len() > max {
        return Err(LoadError::CompileBudget {
            source_name: source_name.to_string(),
            reason: format!(
                "it inflates to more than the {} KiB a module may be",
                max >> 10
            ),
        });
    }
    Ok(std::borrow::Cow::Owned(inflated))
}

/// The sha256 a module is known by: that of the component, inflated if it was shipped
/// gzipped (pins name the `.wasm`), or of the bytes as they are if they do not inflate.
pub fn module_sha256(bytes: &[u8], max: usize) -> String {
    match unpack("", bytes, max) {
        Ok(module) => sha256_hex(&module),
        Err(_) => sha256_hex(bytes),
    }
}

fn check_encoding(source_name: &str, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        let head = &bytes[..bytes.len().min(8)];
        return Err(LoadError::NotWasm {
            source_name: source_name.to_string(),
            found: if head.is_empty() {
                "nothing: the file is empty".to_string()
            } else {
                format!("{:?}", String::from_utf8_lossy(head))
            },
        });
    }
    let version = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    match version {
        0x0001_000d => Ok(()),
        0x0000_0001 => Err(LoadError::CoreModule {
            source_name: source_name.to_string(),
        }),
        _ => Err(LoadError::UnknownEncoding {
            source_name: source_name.to_string(),
            version,
        }),
    }
}

/// Lowercase hex sha256: how modules are named in the cache, logs and events.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn spawn_ticker(engine: Engine, tick: Duration, stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("weir-policy-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                engine.increment_epoch();
            }
        })
        .expect("spawning the policy deadline ticker");
}
