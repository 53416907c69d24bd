//! Policy modules: the policies directory and the policies ConfigMaps, each module
//! through the transactional swap; rejections are logged, counted and announced.

use super::*;

/// A policy module shipped in a ConfigMap, loaded or refused.
pub(super) struct Shipped {
    /// The last module tried under this name, with its settings.
    sha256: String,
    pub(super) config: String,
    pub(super) pin: Option<String>,
    /// Whether a version of it is serving.
    pub(super) loaded: bool,
    /// The ConfigMap it came from (`namespace/name`), and what its Events are about.
    pub(super) map: String,
    pub(super) from: Subject,
}

/// The policy modules weir knows of, from the policies directory and ConfigMaps, and the
/// settings that came with them.
pub(super) struct Modules {
    /// The policies directory (file mode), watched.
    pub(super) policy_dir: Option<crate::discovery::watch::DirWatch>,
    pub(super) policy_dir_error: Option<String>,
    /// Modules loaded from policies ConfigMaps, and the settings that came with them.
    pub(super) shipped: BTreeMap<String, Shipped>,
    pub(super) policy_settings: BTreeMap<String, PolicySettings>,
    /// The policies ConfigMaps as last read, for a retry of what failed for a reason
    /// that may pass (`policies_retry`: when).
    pub(super) shipped_maps: Vec<PolicyMap>,
    pub(super) policies_retry: Option<Instant>,
    /// The wait before that retry, doubling while refusals stay transient.
    pub(super) retry_after: std::time::Duration,
    /// Each policies ConfigMap's last good settings, and the text of settings that did
    /// not parse (announced once).
    pub(super) map_settings: BTreeMap<String, settings::Shipped>,
    /// The `[default]` of the first policies ConfigMap that has one: wins over
    /// `policies.default` in weir.toml.
    pub(super) shipped_default: Option<settings::DefaultPolicy>,
    pub(super) bad_settings: BTreeMap<String, String>,
}

impl Modules {
    pub(super) fn new(config: &Config) -> Self {
        Modules {
            policy_dir: (config.policies.dir.clone())
                .map(|dir| crate::discovery::watch::DirWatch::new(dir, "wasm")),
            policy_dir_error: None,
            shipped: BTreeMap::new(),
            policy_settings: BTreeMap::new(),
            shipped_maps: Vec::new(),
            policies_retry: None,
            retry_after: std::time::Duration::ZERO,
            map_settings: BTreeMap::new(),
            shipped_default: None,
            bad_settings: BTreeMap::new(),
        }
    }
}

/// Why a module was not loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Compiling in the background: looked at again once it has compiled.
    Pending,
    /// Refused for a reason that may pass (a deadline on a busy machine): retried.
    Transient,
    /// Refused until the module or its configuration changes.
    Final,
}

const RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(5);
const RETRY_CAP: std::time::Duration = std::time::Duration::from_secs(300);

pub(super) fn policy_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl ControlPlane {
    /// Loads new and changed modules of the policies directory, each through the
    /// transactional swap, and unloads deleted ones. Returns whether any policy changed.
    pub(super) fn poll_policies(&mut self) -> bool {
        if let Source::Kubernetes(kube) = &mut self.source {
            let retry_due = self
                .modules
                .policies_retry
                .is_some_and(|at| Instant::now() >= at);
            let maps = match kube.policies() {
                Some(maps) => maps,
                None if retry_due => std::mem::take(&mut self.modules.shipped_maps),
                None => return false,
            };
            let changed = self.load_shipped(&maps);
            self.modules.shipped_maps = maps;
            return changed;
        }
        let Some(watch) = self.modules.policy_dir.as_mut() else {
            return false;
        };
        let look = match watch.look() {
            Ok(look) => {
                self.modules.policy_dir_error = None;
                look
            }
            Err(error) => {
                let message = format!(
                    "{}: cannot read the policies directory: {error}; the policies loaded keep serving",
                    watch.dir().display()
                );
                if self.modules.policy_dir_error.as_ref() != Some(&message) {
                    tracing::error!("{message}");
                    self.modules.policy_dir_error = Some(message);
                }
                return false;
            }
        };
        let mut changed = false;
        for path in look.gone {
            let name = policy_name(&path);
            changed = true;
            self.queued();
            tracing::warn!(
                policy = %name,
                "{} was deleted: its Services fall back to the built-in kube-default",
                path.display()
            );
            self.registry.unload(&name);
        }
        for (path, fingerprint) in look.changed {
            let name = policy_name(&path);
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(error) => {
                    // Not settled: read again at the next look.
                    tracing::error!(policy = %name, "{}: cannot read: {error}", path.display());
                    continue;
                }
            };
            let sha256 = crate::policy::sha256_hex(&bytes);
            if self.registry.sha256(&name) != Some(sha256.as_str()) {
                // A rejected module changes nothing: only an accepted one is a change to
                // apply (and to count against the health timeout until it is).
                let source = path.display().to_string();
                match self.swap(&name, &source, &bytes, &sha256, "", None) {
                    Ok(()) => {
                        self.queued();
                        changed = true;
                    }
                    // Not settled: looked at again once it has compiled.
                    Err(Refusal::Pending) => continue,
                    Err(_) => {}
                }
            }
            if let Some(watch) = self.modules.policy_dir.as_mut() {
                watch.settle(path, fingerprint);
            }
        }
        changed
    }

    /// Loads the modules of the policies ConfigMaps (`binaryData` `NAME.wasm`) with their
    /// settings (`data` `policies.toml`), each through the transactional swap, and unloads
    /// those no longer shipped. Every outcome is an Event on the ConfigMap. A ConfigMap
    /// whose settings do not parse is held as it was (its modules, and its last good
    /// settings); the other ConfigMaps are applied. Returns whether a policy or its
    /// settings changed.
    pub(super) fn load_shipped(&mut self, maps: &[PolicyMap]) -> bool {
        let mut held = BTreeSet::new();
        for map in maps {
            let Some(text) = &map.settings else {
                self.modules.map_settings.remove(&map.name);
                self.modules.bad_settings.remove(&map.name);
                continue;
            };
            match settings::parse(text) {
                Ok(parsed) => {
                    self.modules.map_settings.insert(map.name.clone(), parsed);
                    self.modules.bad_settings.remove(&map.name);
                }
                Err(error) => {
                    held.insert(map.name.as_str());
                    if self.modules.bad_settings.get(&map.name) == Some(text) {
                        continue; // announced already
                    }
                    self.modules
                        .bad_settings
                        .insert(map.name.clone(), text.clone());
                    let message = format!(
                        "{POLICY_SETTINGS_KEY}: {error}; nothing in this ConfigMap was applied: its policies and last good settings keep serving"
                    );
                    tracing::error!(configmap = %map.name, "{message}");
                    self.metrics
                        .proxy
                        .reload(POLICY_SETTINGS_KEY, ReloadResult::rejected);
                    self.announce(map.subject.clone(), true, "PolicyRejected", message);
                }
            }
        }
        let present: BTreeSet<&str> = maps.iter().map(|m| m.name.as_str()).collect();
        self.modules
            .map_settings
            .retain(|name, _| present.contains(name.as_str()));
        self.modules
            .bad_settings
            .retain(|name, _| present.contains(name.as_str()));
        // Merged in ConfigMap name order, the first one naming a policy wins.
        let mut settings = BTreeMap::new();
        for map in maps {
            let shipped = self.modules.map_settings.get(&map.name);
            for (name, policy) in shipped.map(|s| &s.policies).into_iter().flatten() {
                settings
                    .entry(name.clone())
                    .or_insert_with(|| policy.clone());
            }
        }
        let mut modules: BTreeMap<&str, (&[u8], &PolicyMap)> = BTreeMap::new();
        for map in maps.iter().filter(|m| !held.contains(m.name.as_str())) {
            for key in &map.ignored {
                tracing::warn!(configmap = %map.name, "binaryData key {key} is not NAME.wasm: ignored");
            }
            for (name, bytes) in &map.modules {
                match modules.get(name.as_str()) {
                    Some((_, first)) => tracing::warn!(
                        policy = %name,
                        "{name}.wasm is in ConfigMaps {} and {}: the first serves",
                        first.name,
                        map.name
                    ),
                    None => {
                        modules.insert(name, (bytes, map));
                    }
                }
            }
        }
        let mut changed = false;
        // Gone: shipped by no ConfigMap (a held one's modules still count), and not last
        // seen in a held one.
        let shipped_anywhere: BTreeSet<&str> = maps
            .iter()
            .flat_map(|m| m.modules.iter().map(|(name, _)| name.as_str()))
            .collect();
        let gone: Vec<String> = (self.modules.shipped.iter())
            .filter(|(name, shipped)| {
                !shipped_anywhere.contains(name.as_str()) && !held.contains(shipped.map.as_str())
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let Some(shipped) = self.modules.shipped.remove(&name) else {
                continue;
            };
            // A refused module is forgotten too: its Services stop saying it was refused.
            self.registry.unload(&name);
            changed = true;
            self.queued();
            let message = format!(
                "{name}.wasm was removed from the policies ConfigMap: its Services fall back to the built-in kube-default"
            );
            tracing::warn!(policy = %name, "{message}");
            self.announce(shipped.from, false, "PolicyRemoved", message);
        }
        let mut retry = false;
        let mut compiling = false;
        for (name, (bytes, map)) in modules {
            let name = name.to_string();
            let policy = settings.get(&name).cloned().unwrap_or_default();
            let config = policy.config.clone().unwrap_or_default();
            let max = self.registry.engine().limits().max_module_bytes;
            let sha256 = crate::policy::module_sha256(bytes, max);
            if let Some(shipped) = self.modules.shipped.get_mut(&name) {
                // It may have moved to another ConfigMap: Events go where it is now.
                shipped.map.clone_from(&map.name);
                shipped.from = map.subject.clone();
                // Already loaded, or refused for good: nothing to do or announce.
                if shipped.sha256 == sha256
                    && shipped.config == config
                    && shipped.pin == policy.sha256
                {
                    continue;
                }
            }
            let from = map.subject.clone();
            let outcome = if let Some(pin) = &policy.sha256
                && !pin.eq_ignore_ascii_case(&sha256)
            {
                let error = format!(
                    "its sha256 is not the one {POLICY_SETTINGS_KEY} pins ({pin}): ship the pinned module or change the pin"
                );
                self.rejected(&name, &sha256, "pinned", &error, Some(&from));
                Err(Refusal::Final)
            } else {
                let source = format!("configmap {} key {name}.wasm", map.name);
                self.swap(&name, &source, bytes, &sha256, &config, Some(&from))
            };
            if outcome == Err(Refusal::Pending) {
                // Not recorded: looked at again at the next look, once it has compiled.
                compiling = true;
                continue;
            }
            let was_loaded = self.modules.shipped.get(&name).is_some_and(|s| s.loaded);
            // Either way what its Services resolve to changed, unless a loaded version
            // keeps serving.
            changed |= outcome.is_ok() || !was_loaded;
            if outcome.is_ok() {
                self.queued();
            }
            // A deadline missed on a busy machine is worth another try; a module that
            // does not compile, fits no contract or whose configure refuses is not, until
            // it (or its configuration) changes.
            let transient = outcome == Err(Refusal::Transient);
            retry |= transient;
            self.modules.shipped.insert(
                name,
                Shipped {
                    sha256: if transient { String::new() } else { sha256 },
                    config,
                    pin: policy.sha256,
                    loaded: outcome.is_ok() || was_loaded,
                    map: map.name.clone(),
                    from,
                },
            );
        }
        // Transient refusals are retried at 5 s, doubling up to 5 minutes while they last.
        self.modules.retry_after = if retry {
            (self.modules.retry_after * 2).clamp(RETRY_FIRST, RETRY_CAP)
        } else {
            std::time::Duration::ZERO
        };
        self.modules.policies_retry = if compiling {
            Some(Instant::now())
        } else {
            retry.then(|| Instant::now() + self.modules.retry_after)
        };
        if settings != self.modules.policy_settings {
            self.modules.policy_settings = settings;
            changed = true;
        }
        let default = maps
            .iter()
            .find_map(|map| self.modules.map_settings.get(&map.name)?.default.clone());
        if default != self.modules.shipped_default {
            self.modules.shipped_default = default;
            changed = true;
        }
        changed
    }

    /// Publishes an Event (Kubernetes mode only).
    pub(super) fn announce(
        &self,
        subject: Subject,
        warning: bool,
        reason: &'static str,
        note: String,
    ) {
        if let Some(kube) = self.source.kubernetes() {
            kube.announce(Announcement {
                subject,
                warning,
                reason,
                action: "Load",
                note,
            });
        }
    }

    /// One module through the transactional swap, with the policy's configuration.
    /// Returns whether it was accepted. `regarding`: the object its Events are about.
    pub(super) fn swap(
        &mut self,
        name: &str,
        source: &str,
        bytes: &[u8],
        sha256: &str,
        config: &str,
        regarding: Option<&Subject>,
    ) -> Result<(), Refusal> {
        let started = Instant::now();
        let replay = self.bindings.replay(name);
        match self.registry.swap(name, source, bytes, config, &replay) {
            // Compiling in the background: nothing to apply or refuse yet.
            Err(error) if error.is_pending() => Err(Refusal::Pending),
            Ok((runtime, answers)) => {
                (self.bindings).swapped(name, &runtime, answers, &self.metrics);
                self.metrics.proxy.reload(name, ReloadResult::accepted);
                tracing::info!(
                    policy = %name,
                    sha256 = %sha256,
                    services = replay.len(),
                    "policy loaded from {source} in {:?}",
                    started.elapsed()
                );
                if let Some(regarding) = regarding {
                    self.announce(
                        regarding.clone(),
                        false,
                        "PolicyLoaded",
                        match replay.len() {
                            0 => format!("policy {name} ({name}.wasm, sha256 {sha256}) loaded"),
                            ports => format!(
                                "policy {name} ({name}.wasm, sha256 {sha256}) loaded: serving {ports} service ports"
                            ),
                        },
                    );
                }
                Ok(())
            }
            Err(error) => {
                let reason = error.reason();
                self.rejected(name, sha256, reason, &error.to_string(), regarding);
                Err(if error.is_transient() {
                    Refusal::Transient
                } else {
                    Refusal::Final
                })
            }
        }
    }

    /// Records, logs, counts and announces a module refused; the previous version (if
    /// any) keeps serving.
    pub(super) fn rejected(
        &mut self,
        name: &str,
        sha256: &str,
        reason: &'static str,
        error: &str,
        regarding: Option<&Subject>,
    ) {
        self.metrics.proxy.reload(name, ReloadResult::rejected);
        self.metrics
            .proxy
            .policy_rejections
            .get_or_create(&RejectionLabels {
                policy: name.to_string(),
                reason,
            })
            .inc();
        self.registry.refuse(name, error.to_string());
        let serving = match self.registry.sha256(name) {
            Some(previous) => format!("the previous version (sha256 {previous}) keeps serving"),
            None => "its Services follow their failure mode".to_string(),
        };
        tracing::error!(policy = %name, sha256 = %sha256, "policy rejected: {error}; {serving}");
        if let Some(regarding) = regarding {
            self.announce(
                regarding.clone(),
                true,
                "PolicyRejected",
                format!(
                    "policy {name} ({name}.wasm, sha256 {sha256}) rejected: {error}; {serving}"
                ),
            );
        }
    }
}
