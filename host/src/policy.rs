//! Running policies: one wasmtime Engine, components compiled under a budget and cached,
//! an instance per Service port (the built-in kube-default natively), every call under a
//! deadline and the port's memory budget, and failures contained by the port's failure
//! mode.

mod bindings;
mod cache;
pub mod compile;
mod convert;
mod engine;
mod imports;
mod instance;
mod limits;
pub mod metrics;
mod port;
mod registry;
mod request;
mod runtime;
mod service;
pub mod settings;

pub use engine::{CompiledPolicy, LoadError, PolicyEngine, module_sha256, sha256_hex, unpack};
pub use instance::{CallError, CallKind, FailureKind};
pub use limits::Limits;
pub use registry::{Binding, Registry, RegistryError};
pub use request::RequestHead;
pub use runtime::PolicyRuntime;
pub use service::{FailureMode, HostDecision, ServiceInput, UpdateAnswer};
pub use settings::PolicySettings;

/// The name of the policy every Service gets unless its `weir.dev/policy` annotation
/// names another one.
pub const DEFAULT_POLICY: &str = "kube-default";

/// The WIT interface a policy must export, with its version.
pub const EXPECTED_EXPORT: &str = "weir:policy/policy@0.1.0";
/// What a policy targeting contract 0.2.0 exports besides: its per-request decisions.
pub const REQUESTS_EXPORT: &str = "weir:policy/requests@0.2.0";

/// The kube-default component, built for wasm32-wasip2 by build.rs and embedded so weir
/// works with no policy files at all.
pub static KUBE_DEFAULT_WASM: &[u8] = include_bytes!(env!("WEIR_KUBE_DEFAULT_WASM"));
