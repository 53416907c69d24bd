//! The policies a host serves, by name: the built-in kube-default plus every module of a
//! policies directory. A module that fails to load is recorded with its reason; the
//! services that name it follow their failure mode.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use super::engine::{LoadError, PolicyEngine};
use super::runtime::PolicyRuntime;
use super::service::ServiceInput;
use super::{CallError, DEFAULT_POLICY, FailureKind};
use weir_sdk::Eligibility;

/// A policy swapped in, with its answer for each service replayed into it.
pub type Swapped = (Arc<PolicyRuntime>, Vec<(u32, Eligibility)>);

/// What a service's policy name resolves to.
pub enum Binding {
    Policy(Arc<PolicyRuntime>),
    /// The named policy is not available; the reason says why, for the operator.
    Missing(String),
}

pub struct Registry {
    engine: Arc<PolicyEngine>,
    policies: BTreeMap<String, Arc<PolicyRuntime>>,
    rejected: BTreeMap<String, String>,
    deleted: BTreeSet<String>,
}

/// A module refused while loading a directory.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{source_name}: {error}")]
    Instantiate {
        source_name: String,
        error: CallError,
    },
    #[error(
        "{source_name}: update for {service} failed while the current services were replayed: {error}"
    )]
    Replay {
        source_name: String,
        service: String,
        error: CallError,
    },
}

impl RegistryError {
    /// The module is compiling in the background: ask again later; nothing was refused.
    pub fn is_pending(&self) -> bool {
        matches!(self, RegistryError::Load(LoadError::Pending { .. }))
    }

    /// Whether another try of the same module and configuration may pass: a deadline
    /// missed on a busy machine, or no instance slot free. A `configure` that refuses, a
    /// trap or a module that does not fit is refused again until something changes.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Load(_) => false,
            RegistryError::Instantiate { error, .. } | RegistryError::Replay { error, .. } => {
                matches!(error.kind, FailureKind::Timeout | FailureKind::Instantiate)
            }
        }
    }

    /// A short, bounded reason for metrics: `not_wasm`, `not_component`, `compile`,
    /// `compile_budget`, `wrong_version`, `unsupported_import`, `read`, `instantiate`,
    /// `configure`, `replay`.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistryError::Load(error) => match error {
                LoadError::NotWasm { .. } => "not_wasm",
                LoadError::CoreModule { .. } | LoadError::UnknownEncoding { .. } => "not_component",
                LoadError::Compile { .. } => "compile",
                LoadError::WrongWorld { .. } | LoadError::Link { .. } => "wrong_version",
                LoadError::UnsupportedImport { .. } => "unsupported_import",
                LoadError::Read { .. } => "read",
                LoadError::CompileBudget { .. } => "compile_budget",
                LoadError::Pending { .. } => "pending",
            },
            RegistryError::Instantiate { error, .. } => match error.kind {
                FailureKind::Refused => "configure",
                _ => "instantiate",
            },
            RegistryError::Replay { .. } => "replay",
        }
    }
}

impl Registry {
    /// A registry with the built-in kube-default (native) loaded.
    pub fn new(engine: Arc<PolicyEngine>) -> Self {
        let builtin = Arc::new(PolicyRuntime::native(engine.clone()));
        Registry {
            engine,
            policies: BTreeMap::from([(DEFAULT_POLICY.to_string(), builtin)]),
            rejected: BTreeMap::new(),
            deleted: BTreeSet::new(),
        }
    }

    /// Rebuilds the instances that data-plane failures poisoned, in every policy.
    pub fn repair(&self) -> usize {
        self.policies.values().map(|p| p.repair()).sum()
    }

    pub fn engine(&self) -> &Arc<PolicyEngine> {
        &self.engine
    }

    /// Loads every `*.wasm` in `dir`; the file stem is the policy's name. Returns the
    /// modules refused, each with its reason.
    pub fn load_dir(&mut self, dir: &Path) -> std::io::Result<Vec<RegistryError>> {
        let mut files: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
            .collect();
        files.sort();
        let mut refused = Vec::new();
        for file in files {
            let name = file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = match std::fs::read(&file) {
                Ok(bytes) => bytes,
                Err(e) => {
                    let error = RegistryError::Load(LoadError::Read {
                        source_name: file.display().to_string(),
                        reason: e.to_string(),
                    });
                    self.rejected.insert(name, error.to_string());
                    refused.push(error);
                    continue;
                }
            };
            if let Err(error) = self.load(&name, &file.display().to_string(), &bytes, "") {
                refused.push(error);
            }
        }
        Ok(refused)
    }

    /// Loads (or replaces) one policy. On failure the previous version, if any, stays.
    pub fn load(
        &mut self,
        name: &str,
        source_name: &str,
        bytes: &[u8],
        config: &str,
    ) -> Result<Arc<PolicyRuntime>, RegistryError> {
        let result = self
            .engine
            .load(name, source_name, bytes)
            .map_err(RegistryError::from)
            .and_then(|compiled| {
                PolicyRuntime::new(self.engine.clone(), compiled, config).map_err(|error| {
                    RegistryError::Instantiate {
                        source_name: source_name.to_string(),
                        error,
                    }
                })
            });
        match result {
            Ok(runtime) => {
                let runtime = Arc::new(runtime);
                if let Some(compiled) = runtime.compiled() {
                    self.engine.keep(compiled);
                }
                self.rejected.remove(name);
                self.policies.insert(name.to_string(), runtime.clone());
                Ok(runtime)
            }
            Err(error) => {
                tracing::warn!(policy = name, "{error}");
                if !self.policies.contains_key(name) {
                    self.rejected.insert(name.to_string(), error.to_string());
                }
                Err(error)
            }
        }
    }

    /// Replaces (or adds) a policy transactionally: compile, check the world and version,
    /// instantiate and configure, replay `update` for each of `replay` (the services bound
    /// to it now), and only then swap it in. Any failure leaves the previous version
    /// serving. Returns the new runtime with its answer for each replayed service.
    pub fn swap(
        &mut self,
        name: &str,
        source_name: &str,
        bytes: &[u8],
        config: &str,
        replay: &[(u32, Arc<ServiceInput>)],
    ) -> Result<Swapped, RegistryError> {
        let compiled = self.engine.load(name, source_name, bytes)?;
        let runtime =
            PolicyRuntime::new(self.engine.clone(), compiled, config).map_err(|error| {
                RegistryError::Instantiate {
                    source_name: source_name.to_string(),
                    error,
                }
            })?;
        let mut answers = Vec::with_capacity(replay.len());
        for (handle, input) in replay {
            let answer = runtime.update(*handle, input.clone());
            if let Some(error) = answer.failure {
                return Err(RegistryError::Replay {
                    source_name: source_name.to_string(),
                    service: input.service.display_name(),
                    error,
                });
            }
            answers.push((*handle, answer.eligibility));
        }
        let runtime = Arc::new(runtime);
        if let Some(compiled) = runtime.compiled() {
            self.engine.keep(compiled);
        }
        self.rejected.remove(name);
        self.deleted.remove(name);
        self.policies.insert(name.to_string(), runtime.clone());
        Ok((runtime, answers))
    }

    /// Records a module that was refused, so services naming it say why.
    pub fn refuse(&mut self, name: &str, reason: String) {
        // Refused is what it is now, whatever happened to it before.
        self.deleted.remove(name);
        if !self.policies.contains_key(name) {
            self.rejected.insert(name.to_string(), reason);
        }
    }

    /// Forgets a policy whose module was deleted. kube-default goes back to the built-in.
    pub fn unload(&mut self, name: &str) {
        self.rejected.remove(name);
        if name == DEFAULT_POLICY {
            let builtin = PolicyRuntime::native(self.engine.clone());
            self.policies.insert(name.to_string(), Arc::new(builtin));
        } else if self.policies.remove(name).is_some() {
            self.deleted.insert(name.to_string());
        }
    }

    /// Whether `name`'s module was deleted (and nothing has replaced it).
    pub fn was_deleted(&self, name: &str) -> bool {
        self.deleted.contains(name)
    }

    /// The sha256 of the module serving `name`.
    pub fn sha256(&self, name: &str) -> Option<&str> {
        self.policies.get(name).map(|p| p.sha256())
    }

    /// The runtime serving `name`.
    pub fn resolve(&self, name: &str) -> Binding {
        match self.policies.get(name) {
            Some(runtime) => Binding::Policy(runtime.clone()),
            None => Binding::Missing(match self.rejected.get(name) {
                Some(reason) => format!("policy `{name}` was rejected: {reason}"),
                None if self.deleted.contains(name) => {
                    format!(
                        "policy `{name}` was deleted ({name}.wasm is gone from the policies directory or ConfigMap)"
                    )
                }
                None => format!(
                    "policy `{name}` is not loaded (no {name}.wasm in the policies directory or ConfigMap)"
                ),
            }),
        }
    }

    /// The built-in kube-default runtime (or a module that replaced it).
    pub fn default_runtime(&self) -> Arc<PolicyRuntime> {
        self.policies[DEFAULT_POLICY].clone()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.policies.keys().map(String::as_str)
    }
}
