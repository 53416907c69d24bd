//! The policies a host serves, by name: the built-in kube-default plus every module of a
//! policies directory. A module that fails to load is recorded with its reason; the
//! services that name it follow their failure mode.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::engine::{LoadError, PolicyEngine};
use super::runtime::PolicyRuntime;
use super::{CallError, DEFAULT_POLICY};

/// What a service's policy name resolves to.
pub enum Binding {
    Policy(Arc<PolicyRuntime>),
    /// The named policy is not available; the reason says why, for the operator.
    Missing(String),
}

pub struct Registry {
    engine: Arc<PolicyEngine>,
    workers: usize,
    policies: BTreeMap<String, Arc<PolicyRuntime>>,
    rejected: BTreeMap<String, String>,
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
}

impl Registry {
    /// A registry with the built-in kube-default loaded, `workers` instances per policy.
    pub fn new(engine: Arc<PolicyEngine>, workers: usize) -> anyhow::Result<Self> {
        let mut registry = Registry {
            engine,
            workers,
            policies: BTreeMap::new(),
            rejected: BTreeMap::new(),
        };
        let compiled = registry.engine.load_kube_default()?;
        let runtime = PolicyRuntime::new(registry.engine.clone(), compiled, "", workers)
            .map_err(|e| anyhow::anyhow!("the built-in kube-default policy failed: {e}"))?;
        registry
            .policies
            .insert(DEFAULT_POLICY.to_string(), Arc::new(runtime));
        Ok(registry)
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
                PolicyRuntime::new(self.engine.clone(), compiled, config, self.workers).map_err(
                    |error| RegistryError::Instantiate {
                        source_name: source_name.to_string(),
                        error,
                    },
                )
            });
        match result {
            Ok(runtime) => {
                let runtime = Arc::new(runtime);
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

    /// The runtime serving `name`.
    pub fn resolve(&self, name: &str) -> Binding {
        match self.policies.get(name) {
            Some(runtime) => Binding::Policy(runtime.clone()),
            None => Binding::Missing(match self.rejected.get(name) {
                Some(reason) => format!("policy `{name}` was rejected: {reason}"),
                None => format!(
                    "policy `{name}` is not loaded (no {name}.wasm in the policies directory)"
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
