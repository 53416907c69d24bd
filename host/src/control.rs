//! The control plane: watches objects and policy modules, keeps every policy told about
//! the service ports it serves, and publishes the routing table and listeners that
//! follow from their answers. It runs on its own thread: a policy's `update` may take up
//! to its deadline, and must never hold up a data-plane thread.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use weir_sdk::{Eligibility, EmptyAction, Scope, ServiceHandle};

use crate::admin::{HealthChecks, Readiness};
use crate::capture::Capture;
use crate::config::Config;
use crate::discovery::Source;
use crate::discovery::kubernetes::{Announcement, POLICY_SETTINGS_KEY, PolicyMap, Subject};
use crate::discovery::watch::{Changed, Fingerprint};
use crate::health::ProxyHealth;
use crate::metrics::{Metrics, RejectionLabels, ReloadResult, TrafficPolicyLabels};
use crate::model::{self, FamilyKey, ProtocolKey, ServiceKey, ServicePortKey, ServicePortSnapshot};
use crate::objects::{Diagnostic, Severity};
use crate::policy::{
    Binding, FailureMode, PolicyRuntime, PolicySettings, Registry, ServiceInput, settings,
};
use crate::proxy::{
    Listen, ListenerKind, Listeners, Route, RouteMetrics, Routes, Shared, Transport,
};
use crate::state::Identities;

/// What a service port's policy was last told, and answered.
struct Bound {
    policy: String,
    /// Set while the port is on its failure mode because its policy failed its update:
    /// the series of `weir_policy_service_failed` it holds.
    failed: Option<crate::metrics::PortFailureLabels>,
    runtime: Option<Arc<PolicyRuntime>>,
    /// Shared with the policy's runtime, which keeps the same copy.
    input: Arc<ServiceInput>,
    eligibility: Eligibility,
}

/// What the control thread is told.
#[derive(Debug)]
pub enum Signal {
    /// Objects changed: look now rather than at the next poll.
    Wake,
    /// Close every listener and return.
    Stop,
}

/// A policy module shipped in a ConfigMap, loaded or refused.
struct Shipped {
    /// The last module tried under this name, with its settings.
    sha256: String,
    config: String,
    pin: Option<String>,
    /// Whether a version of it is serving.
    loaded: bool,
    /// The ConfigMap it came from (`namespace/name`), and what its Events are about.
    map: String,
    from: Subject,
}

pub struct ControlPlane {
    pub(crate) config: Config,
    pub(crate) source: Source,
    pub(crate) registry: Registry,
    policy_files: BTreeMap<PathBuf, Fingerprint>,
    policy_dir_error: Option<String>,
    /// Modules loaded from policies ConfigMaps, and the settings that came with them.
    shipped: BTreeMap<String, Shipped>,
    policy_settings: BTreeMap<String, PolicySettings>,
    /// The policies ConfigMaps as last read, for a retry of what failed for a reason
    /// that may pass (`policies_retry`: when).
    shipped_maps: Vec<PolicyMap>,
    policies_retry: Option<Instant>,
    /// Each policies ConfigMap's last good settings, and the text of settings that did
    /// not parse (announced once).
    map_settings: BTreeMap<String, settings::Shipped>,
    /// The `[default]` of the first policies ConfigMap that has one: wins over
    /// `policies.default` in weir.toml.
    shipped_default: Option<settings::DefaultPolicy>,
    bad_settings: BTreeMap<String, String>,
    /// Where NodePorts and health checks listen.
    node_addresses: Vec<IpAddr>,
    capture: Option<Capture>,
    capture_error: Option<String>,
    /// When to try the capture interface again after a failure.
    capture_retry: Option<Instant>,
    /// Every address of the Services proxied (ClusterIPs, externalIPs, LB IPs), with the
    /// number of Services that have it: what the capture interface holds, listened on or
    /// not (a Service with no endpoints has no listener, and its address must still be
    /// local, so that connections are refused rather than routed off the node).
    service_ips: HashMap<IpAddr, usize>,
    identities: Identities,
    bound: HashMap<ServiceHandle, Bound>,
    /// Warnings logged at the last sync: each is logged once while it lasts, and again if
    /// it comes back after going away.
    reported: Reported,
    /// Warnings of the sync in progress.
    seen: Reported,
    pub(crate) listeners: Listeners,
    pub(crate) shared: Arc<Shared>,
    pub(crate) health_checks: Arc<HealthChecks>,
    pub(crate) health: Arc<ProxyHealth>,
    pub(crate) readiness: Arc<Readiness>,
    pub(crate) metrics: Arc<Metrics>,
    /// Service ports to remove from a policy they left, once no connection can still be
    /// deciding with the routing table that named it.
    retired: Vec<(Instant, Arc<PolicyRuntime>, ServiceHandle)>,
    /// Objects changed and not applied yet.
    pending: Changed,
    /// Each Service's part of what is published, and the published state itself.
    services: HashMap<ServiceKey, Contribution>,
    routes: HashMap<Listen, Arc<Route>>,
    owners: HashMap<Listen, ServiceKey>,
    wanted: BTreeMap<Listen, ListenerKind>,
    health_counts: HashMap<ServiceKey, usize>,
    no_local: [i64; 2],
    /// Services that wanted an address another Service has: re-applied when it is freed,
    /// so the outcome does not depend on the order changes came in.
    waiting: HashMap<Listen, BTreeSet<ServiceKey>>,
    /// Routes of addresses that went away, until their ports leave their policies.
    retired_routes: HashMap<Listen, (Instant, Arc<Route>)>,
}

/// How long a policy keeps a service port after the routes stop naming it: a connection
/// that read the previous routing table may still ask it, for as long as its connect
/// attempts can take.
fn retire_after(config: &Config) -> std::time::Duration {
    config.proxy.connect_timeout.0 * config.proxy.connect_attempts
        + std::time::Duration::from_secs(2)
}

impl ControlPlane {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        source: Source,
        registry: Registry,
        listeners: Listeners,
        shared: Arc<Shared>,
        health_checks: Arc<HealthChecks>,
        health: Arc<ProxyHealth>,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
    ) -> Self {
        ControlPlane {
            source,
            capture: config.capture_interface().map(Capture::new),
            capture_error: None,
            capture_retry: None,
            service_ips: HashMap::new(),
            node_addresses: config.node_addresses().unwrap_or_default(),
            shipped: BTreeMap::new(),
            policy_settings: BTreeMap::new(),
            shipped_maps: Vec::new(),
            policies_retry: None,
            map_settings: BTreeMap::new(),
            shipped_default: None,
            bad_settings: BTreeMap::new(),
            config,
            registry,
            policy_files: BTreeMap::new(),
            policy_dir_error: None,
            identities: Identities::default(),
            bound: HashMap::new(),
            reported: HashMap::new(),
            seen: HashMap::new(),
            listeners,
            shared,
            health_checks,
            health,
            readiness,
            metrics,
            retired: Vec::new(),
            pending: Changed::Nothing,
            services: HashMap::new(),
            routes: HashMap::new(),
            owners: HashMap::new(),
            wanted: BTreeMap::new(),
            health_counts: HashMap::new(),
            no_local: [0; 2],
            waiting: HashMap::new(),
            retired_routes: HashMap::new(),
        }
    }

    /// Removes a service port from a policy it left, after [`retire_after`].
    /// A port that left the same policy before (and came back meanwhile) is due only
    /// from now: the earlier entry would remove it while the latest routes still name it.
    fn retire(&mut self, runtime: Arc<PolicyRuntime>, handle: ServiceHandle) {
        let due = Instant::now() + retire_after(&self.config);
        self.retired
            .retain(|(_, r, h)| !(*h == handle && Arc::ptr_eq(r, &runtime)));
        self.retired.push((due, runtime, handle));
    }

    fn remove_retired(&mut self) {
        let now = Instant::now();
        let bound = &self.bound;
        self.retired.retain(|(due, runtime, handle)| {
            let keep = now < *due;
            // A port that came back to this policy meanwhile stays.
            let returned = bound
                .get(handle)
                .and_then(|b| b.runtime.as_ref())
                .is_some_and(|r| Arc::ptr_eq(r, runtime));
            if !keep && !returned {
                runtime.remove(*handle);
            }
            keep
        });
    }

    /// Syncs once, then follows changes until told to stop (App sends `Stop`; in
    /// Kubernetes mode the watchers hold a sender too, so only `Stop` ends it); closes
    /// every listener on the way out. In Kubernetes mode the first sync waits for
    /// every watch to list in full, saying in `/readyz` what it waits for.
    pub fn run(mut self, signals: Receiver<Signal>) {
        let interval = self
            .config
            .source
            .poll_interval
            .0
            .min(self.config.policies.poll_interval.0);
        if let Some(kube) = self.source.kubernetes() {
            while !kube.synced() {
                self.readiness.set_pending(kube.pending());
                match signals.recv_timeout(interval) {
                    Ok(Signal::Wake) | Err(RecvTimeoutError::Timeout) => {}
                    Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        }
        self.poll_policies();
        // The first routes wait for the modules compiling (each within its budget), so
        // that no Service starts on a fallback only because its policy is compiling.
        if self.registry.engine().compiling() {
            self.readiness
                .set_pending(vec!["policies: compiling".to_string()]);
            while self.registry.engine().compiling() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            self.poll_policies();
        }
        self.poll_objects();
        self.sync(Changed::Everything);
        self.readiness.set_pending(Vec::new());
        tracing::info!(
            listeners = self.listeners.listening().len(),
            "first sync done: ready"
        );
        loop {
            match signals.recv_timeout(interval) {
                Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Signal::Wake) | Err(RecvTimeoutError::Timeout) => {}
            }
            // Changes come in bursts (a rollout, a relist): take them together.
            let mut stop = false;
            while let Ok(signal) = signals.try_recv() {
                stop |= matches!(signal, Signal::Stop);
            }
            if stop {
                break;
            }
            // Instances that data-plane calls poisoned are rebuilt here, never there.
            self.registry.repair();
            if self.poll_policies() {
                // Which Services a policy serves can change with it: all are checked
                // (unchanged ports cost a comparison, not a call).
                self.pending = Changed::Everything;
            }
            let touched = self.poll_objects();
            self.pending.merge(touched);
            if !self.pending.is_nothing() {
                let changed = std::mem::take(&mut self.pending);
                self.sync(changed);
            } else {
                // Whatever woke us (a watch event that changed nothing weir uses) is
                // handled: `/healthz` must not count it as waiting.
                self.health.updated();
                let capture_due = self.capture_retry.is_some_and(|at| Instant::now() >= at);
                if self.listeners.has_failed() || capture_due {
                    // Only what failed is tried again; nothing else has changed.
                    self.reconcile_listeners();
                }
            }
            self.remove_retired();
        }
        self.listeners.close_all();
    }

    /// Re-reads changed object files. Returns what the change touches.
    fn poll_objects(&mut self) -> Changed {
        let poll = self.source.poll();
        let mut rejected = false;
        for diagnostic in &poll.diagnostics {
            log_diagnostic(diagnostic);
            rejected |= diagnostic.is_error();
        }
        if rejected {
            self.metrics.proxy.reload("objects", ReloadResult::rejected);
        }
        if poll.changed {
            self.metrics.proxy.reload("objects", ReloadResult::accepted);
        }
        if !poll.touched.is_nothing() {
            self.queued();
        }
        poll.touched
    }

    fn queued(&self) {
        self.health.queued();
        self.metrics.proxy.last_queued.set(unix_now());
    }

    /// Loads new and changed modules of the policies directory, each through the
    /// transactional swap, and unloads deleted ones. Returns whether any policy changed.
    fn poll_policies(&mut self) -> bool {
        if let Source::Kubernetes(kube) = &mut self.source {
            let retry_due = self.policies_retry.is_some_and(|at| Instant::now() >= at);
            let maps = match kube.policies() {
                Some(maps) => maps,
                None if retry_due => std::mem::take(&mut self.shipped_maps),
                None => return false,
            };
            let changed = self.load_shipped(&maps);
            self.shipped_maps = maps;
            return changed;
        }
        let Some(dir) = self.config.policies.dir.clone() else {
            return false;
        };
        let mut found = BTreeMap::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                self.policy_dir_error = None;
                for path in entries.filter_map(Result::ok).map(|e| e.path()) {
                    if path.extension().is_some_and(|e| e == "wasm")
                        && let Ok(fingerprint) = Fingerprint::of(&path)
                    {
                        found.insert(path, fingerprint);
                    }
                }
            }
            Err(error) => {
                let message = format!(
                    "{}: cannot read the policies directory: {error}; the policies loaded keep serving",
                    dir.display()
                );
                if self.policy_dir_error.as_ref() != Some(&message) {
                    tracing::error!("{message}");
                    self.policy_dir_error = Some(message);
                }
                return false;
            }
        }
        let mut changed = false;
        let gone: Vec<PathBuf> = self
            .policy_files
            .keys()
            .filter(|p| !found.contains_key(*p))
            .cloned()
            .collect();
        for path in gone {
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
        let mut unreadable = Vec::new();
        for (path, fingerprint) in &found {
            if self.policy_files.get(path) == Some(fingerprint) {
                continue;
            }
            let name = policy_name(path);
            let bytes = match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(error) => {
                    tracing::error!(policy = %name, "{}: cannot read: {error}", path.display());
                    unreadable.push(path.clone());
                    continue;
                }
            };
            let sha256 = crate::policy::sha256_hex(&bytes);
            if self.registry.sha256(&name) == Some(sha256.as_str()) {
                continue;
            }
            // A rejected module changes nothing: only an accepted one is a change to apply
            // (and to count against the health timeout until it is).
            let source = path.display().to_string();
            match self.swap(&name, &source, &bytes, &sha256, "", None) {
                Ok(()) => {
                    self.queued();
                    changed = true;
                }
                // Not recorded: looked at again once it has compiled.
                Err("pending") => unreadable.push(path.clone()),
                Err(_) => {}
            }
        }
        for path in unreadable {
            // Not recorded: read again at the next look.
            found.remove(&path);
        }
        self.policy_files = found;
        changed
    }

    /// Loads the modules of the policies ConfigMaps (`binaryData` `NAME.wasm`) with their
    /// settings (`data` `policies.toml`), each through the transactional swap, and unloads
    /// those no longer shipped. Every outcome is an Event on the ConfigMap. A ConfigMap
    /// whose settings do not parse is held as it was (its modules, and its last good
    /// settings); the other ConfigMaps are applied. Returns whether a policy or its
    /// settings changed.
    fn load_shipped(&mut self, maps: &[PolicyMap]) -> bool {
        let mut held = BTreeSet::new();
        for map in maps {
            let Some(text) = &map.settings else {
                self.map_settings.remove(&map.name);
                self.bad_settings.remove(&map.name);
                continue;
            };
            match settings::parse(text) {
                Ok(parsed) => {
                    self.map_settings.insert(map.name.clone(), parsed);
                    self.bad_settings.remove(&map.name);
                }
                Err(error) => {
                    held.insert(map.name.as_str());
                    if self.bad_settings.get(&map.name) == Some(text) {
                        continue; // announced already
                    }
                    self.bad_settings.insert(map.name.clone(), text.clone());
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
        self.map_settings
            .retain(|name, _| present.contains(name.as_str()));
        self.bad_settings
            .retain(|name, _| present.contains(name.as_str()));
        // Merged in ConfigMap name order, the first one naming a policy wins.
        let mut settings = BTreeMap::new();
        for map in maps {
            let shipped = self.map_settings.get(&map.name);
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
        let gone: Vec<String> = self
            .shipped
            .iter()
            .filter(|(name, shipped)| {
                !shipped_anywhere.contains(name.as_str()) && !held.contains(shipped.map.as_str())
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let Some(shipped) = self.shipped.remove(&name) else {
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
            let sha256 = crate::policy::sha256_hex(bytes);
            if let Some(shipped) = self.shipped.get_mut(&name) {
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
                Err("pinned")
            } else {
                let source = format!("configmap {} key {name}.wasm", map.name);
                self.swap(&name, &source, bytes, &sha256, &config, Some(&from))
            };
            if outcome == Err("pending") {
                // Not recorded: looked at again at the next look, once it has compiled.
                compiling = true;
                continue;
            }
            let was_loaded = self.shipped.get(&name).is_some_and(|s| s.loaded);
            // Either way what its Services resolve to changed, unless a loaded version
            // keeps serving.
            changed |= outcome.is_ok() || !was_loaded;
            if outcome.is_ok() {
                self.queued();
            }
            // A deadline missed on a busy machine is worth another try; a module that
            // does not compile or fits no contract is not, until it changes.
            let transient = matches!(outcome, Err("instantiate" | "configure" | "replay"));
            retry |= transient;
            self.shipped.insert(
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
        self.policies_retry = if compiling {
            Some(Instant::now())
        } else {
            retry.then(|| Instant::now() + std::time::Duration::from_secs(5))
        };
        if settings != self.policy_settings {
            self.policy_settings = settings;
            changed = true;
        }
        let default = maps
            .iter()
            .find_map(|map| self.map_settings.get(&map.name)?.default.clone());
        if default != self.shipped_default {
            self.shipped_default = default;
            changed = true;
        }
        changed
    }

    /// Publishes an Event (Kubernetes mode only).
    fn announce(&self, subject: Subject, warning: bool, reason: &'static str, note: String) {
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
    fn swap(
        &mut self,
        name: &str,
        source: &str,
        bytes: &[u8],
        sha256: &str,
        config: &str,
        regarding: Option<&Subject>,
    ) -> Result<(), &'static str> {
        let started = Instant::now();
        let mut replay: Vec<(ServiceHandle, Arc<ServiceInput>)> = self
            .bound
            .iter()
            .filter(|(_, b)| b.policy == name && b.runtime.is_some())
            .map(|(handle, b)| (*handle, b.input.clone()))
            .collect();
        replay.sort_by_key(|(handle, _)| *handle);
        match self.registry.swap(name, source, bytes, config, &replay) {
            // Compiling in the background: nothing to apply or refuse yet.
            Err(error) if error.is_pending() => Err("pending"),
            Ok((runtime, answers)) => {
                for (handle, eligibility) in answers {
                    if let Some(bound) = self.bound.get_mut(&handle) {
                        // A service that was on a fallback leaves it; the previous
                        // version of this policy goes away as a whole.
                        let previous = bound.runtime.replace(runtime.clone());
                        bound.eligibility = eligibility;
                        // The new version answered it: off its failure mode.
                        if let Some(labels) = bound.failed.take() {
                            self.metrics.proxy.ports_failed.remove(&labels);
                        }
                        if let Some(previous) = previous
                            && previous.name() != name
                        {
                            self.retire(previous, handle);
                        }
                    }
                }
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
                Err(reason)
            }
        }
    }

    /// Records, logs, counts and announces a module refused; the previous version (if
    /// any) keeps serving.
    fn rejected(
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

    /// Applies what changed: rebuilds the ports of the Services touched (every Service
    /// for `Everything`), tells their policies, and publishes the routes, health check
    /// counts and listeners. The work is in proportion to what changed.
    fn sync(&mut self, changed: Changed) {
        let started = Instant::now();
        let node_name = self.config.node.name.clone();
        let only = match changed {
            Changed::Nothing => return,
            Changed::Services(keys) => Some(keys),
            Changed::Everything => None,
        };
        let objects = match &only {
            Some(keys) => self.source.objects_for(keys),
            None => self.source.objects(),
        };
        let mut model = model::build(&objects, &node_name);
        let default_mode = self.config.policies.failure_mode;
        // The node's default policy, for Services that name none.
        let default = match &self.shipped_default {
            Some(shipped) => Some((&shipped.policy, &shipped.config)),
            None => (self.config.policies.default.as_ref())
                .map(|policy| (policy, &self.config.policies.default_config)),
        };
        for port in &mut model.ports {
            if !port.policy_annotated
                && let Some((policy, config)) = default
            {
                port.policy = policy.clone();
                if port.service.config.is_none() {
                    port.service.config = config.clone();
                }
            }
            let settings = self.policy_settings.get(&port.policy);
            if !port.failure_mode_annotated {
                port.failure_mode = settings
                    .and_then(PolicySettings::failure_mode)
                    .unwrap_or(default_mode);
            }
            port.memory_mib = port.memory_mib.or(settings.and_then(|s| s.memory_mib));
        }
        self.node_addresses = self
            .config
            .node_addresses()
            .unwrap_or_else(|| model::node_addresses(&objects, &node_name));
        if self.node_addresses.is_empty()
            && once(
                &self.reported,
                &mut self.seen,
                format!("Node {node_name} has no InternalIP or ExternalIP address"),
                None,
            )
        {
            tracing::warn!(
                "Node {node_name} has no InternalIP or ExternalIP address in its status: NodePorts and health checks are not served until it has; set node.addresses to choose them"
            );
        }
        let local_sources = match &self.config.node.local_cidrs {
            Some(cidrs) => cidrs.clone(),
            None => {
                let mut cidrs: Vec<_> = self
                    .node_addresses
                    .iter()
                    .copied()
                    .map(crate::net::Cidr::host)
                    .collect();
                cidrs.extend(model::node_pod_cidrs(&objects, &node_name));
                cidrs
            }
        };
        if **self.shared.local_sources.load() != local_sources {
            self.shared.local_sources.store(Arc::new(local_sources));
        }
        self.health
            .set_node_eligible(model::node_eligible(&objects, &node_name));
        for diagnostic in &model.diagnostics {
            if once(&self.reported, &mut self.seen, diagnostic.to_string(), None) {
                log_diagnostic(diagnostic);
            }
        }

        let mut by_service: BTreeMap<ServiceKey, Vec<ServicePortSnapshot>> = BTreeMap::new();
        for port in model.ports {
            let key = (port.key.namespace.clone(), port.key.name.clone());
            by_service.entry(key).or_default().push(port);
        }
        let affected: BTreeSet<ServiceKey> = match &only {
            Some(keys) => keys.clone(),
            None => self
                .services
                .keys()
                .chain(by_service.keys())
                .cloned()
                .collect(),
        };
        // Everything touched is withdrawn before anything is applied, so an address one
        // of them gives up is free for another.
        let mut withdrawn = Vec::with_capacity(affected.len());
        for key in affected {
            let ports = by_service.remove(&key).unwrap_or_default();
            let metrics = self.withdraw(&key, &ports);
            withdrawn.push((key, ports, metrics));
        }
        for (key, ports, metrics) in withdrawn {
            if !ports.is_empty() {
                let contribution = self.apply(&key, &ports, &model.node, metrics);
                self.services.insert(key, contribution);
            }
        }

        let previous = self.shared.routes.swap(Arc::new(Routes {
            by_listen: self.routes.clone(),
        }));
        self.retire_routes(&previous);
        let seen = std::mem::take(&mut self.seen);
        match &only {
            // Warnings about the Services rebuilt are replaced; the others still stand.
            Some(keys) => {
                self.reported
                    .retain(|_, service| !service.as_ref().is_some_and(|k| keys.contains(k)));
                self.reported.extend(seen);
            }
            None => self.reported = seen,
        }
        self.health_checks
            .store(Arc::new(self.health_counts.clone()));
        self.reconcile_listeners();
        let proxy = &self.metrics.proxy;
        for (i, policy) in ["internal", "external"].into_iter().enumerate() {
            proxy
                .no_local_endpoints
                .get_or_create(&TrafficPolicyLabels {
                    traffic_policy: policy,
                })
                .set(self.no_local[i]);
        }
        proxy.sync_seconds.observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            services = only.as_ref().map_or(self.services.len(), BTreeSet::len),
            took = ?started.elapsed(),
            "synced"
        );
        proxy.last_sync.set(unix_now());
        self.health.updated();
    }

    /// Opens and closes listeners for what is wanted. With a capture interface, the
    /// Service addresses are put on it first and the stale ones taken off after.
    fn reconcile_listeners(&mut self) {
        let virtual_ips: Option<BTreeSet<IpAddr>> = self.capture.is_some().then(|| {
            self.service_ips
                .keys()
                .filter(|ip| !self.node_addresses.contains(ip) && !ip.is_unspecified())
                .copied()
                .collect()
        });
        let Some(ips) = virtual_ips else {
            for error in self.listeners.reconcile(&self.wanted) {
                tracing::warn!("{error}; retrying");
            }
            return;
        };
        let capture = self.capture.as_mut().expect("checked above");
        let added = capture.reconcile(&ips, false);
        for error in self.listeners.reconcile(&self.wanted) {
            tracing::warn!("{error}; retrying");
        }
        // Stale addresses are taken off only once everything wanted is there.
        let result = added.and_then(|()| capture.reconcile(&ips, true));
        self.report_capture(result);
    }

    /// One report per reconcile: logged when the problem changes, and `/readyz` lists it
    /// while it lasts (the node cannot take its Services' traffic).
    fn report_capture(&mut self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.capture_retry = None;
                if self.capture_error.take().is_some() {
                    tracing::info!("the capture interface holds every Service address again");
                    self.readiness.set_capture(None);
                }
            }
            Err(error) => {
                if self.capture_error.as_ref() != Some(&error) {
                    tracing::error!(
                        "cannot put Service addresses on the capture interface: {error}; retrying"
                    );
                    self.readiness
                        .set_capture(Some(format!("capture interface: {error}")));
                }
                self.capture_error = Some(error);
                self.capture_retry = Some(Instant::now() + std::time::Duration::from_secs(2));
            }
        }
    }

    /// Keeps the routes of addresses that just went away, for the connections their
    /// listeners accepted before closing, as long as their policies keep the ports.
    fn retire_routes(&mut self, previous: &Routes) {
        let now = Instant::now();
        let due = now + retire_after(&self.config);
        for (address, route) in &previous.by_listen {
            if !self.routes.contains_key(address) {
                self.retired_routes.insert(*address, (due, route.clone()));
            }
        }
        let routes = &self.routes;
        self.retired_routes
            .retain(|address, (due, _)| now < *due && !routes.contains_key(address));
        self.shared.retired.store(Arc::new(
            self.retired_routes
                .iter()
                .map(|(address, (_, route))| (*address, route.clone()))
                .collect(),
        ));
    }

    /// Takes a Service's part out of the routes, listeners and health checks, and forgets
    /// its ports that are not among `ports` (its ports from now on). Returns its metric
    /// handles, to reuse.
    fn withdraw(
        &mut self,
        key: &ServiceKey,
        ports: &[ServicePortSnapshot],
    ) -> HashMap<(String, String), Arc<RouteMetrics>> {
        let Some(old) = self.services.remove(key) else {
            return HashMap::new();
        };
        for address in &old.addresses {
            if self.owners.get(address) == Some(key) {
                self.owners.remove(address);
                self.routes.remove(address);
                self.wanted.remove(address);
                if let Some(mut waiting) = self.waiting.remove(address) {
                    waiting.remove(key);
                    if !waiting.is_empty() {
                        self.pending.merge(Changed::Services(waiting));
                    }
                }
            }
        }
        self.health_counts.remove(key);
        for ip in &old.service_ips {
            if let Some(count) = self.service_ips.get_mut(ip) {
                *count -= 1;
                if *count == 0 {
                    self.service_ips.remove(ip);
                }
            }
        }
        self.no_local[0] -= old.no_local[0];
        self.no_local[1] -= old.no_local[1];
        let kept: HashSet<&ServicePortKey> = ports
            .iter()
            .filter(|p| p.key.protocol == ProtocolKey::Tcp)
            .map(|p| &p.key)
            .collect();
        for (port, handle) in old.ports {
            if !kept.contains(&port) {
                self.identities.forget(&port);
                self.forget(handle);
            }
        }
        old.metrics
    }

    /// Puts a Service's ports into the routes, listeners and health checks, telling their
    /// policies what changed.
    fn apply(
        &mut self,
        key: &ServiceKey,
        ports: &[ServicePortSnapshot],
        node: &Arc<weir_sdk::Node>,
        mut reusable: HashMap<(String, String), Arc<RouteMetrics>>,
    ) -> Contribution {
        let mut contribution = Contribution::default();
        // Ready endpoint IPs per family, for the healthCheckNodePort.
        let mut ready_ips: BTreeMap<FamilyKey, BTreeSet<IpAddr>> = BTreeMap::new();
        let mut health_port = None;
        for snapshot in ports {
            health_port = health_port.or(snapshot.health_check.map(|c| c.node_port));
            let service = &snapshot.service;
            contribution.service_ips.insert(service.cluster_ip);
            contribution.service_ips.extend(
                service
                    .external_ips
                    .iter()
                    .chain(&service.load_balancer_ips),
            );
            if snapshot.key.protocol != ProtocolKey::Tcp {
                let message = format!(
                    "{}: {} is not proxied (weir proxies TCP; UDP comes later)",
                    snapshot.service.display_name(),
                    snapshot.key.protocol.as_str()
                );
                if once(&self.reported, &mut self.seen, message.clone(), Some(key)) {
                    tracing::warn!("{message}");
                }
                // Not proxied, but its Service's health check counts it, as kube-proxy's.
                ready_ips.entry(snapshot.key.family).or_default().extend(
                    snapshot
                        .endpoints
                        .iter()
                        .filter(|e| e.ready && e.is_local)
                        .map(|e| e.address.ip()),
                );
                continue;
            }
            let (handle, endpoints) = self.identities.assign(snapshot);
            contribution.ports.push((snapshot.key.clone(), handle));
            let input = snapshot.input(node.clone(), endpoints);
            let has_any = input.endpoints.iter().any(|e| e.ready || e.serving);
            let (runtime, policy_label) = self.resolve(snapshot);
            let eligibility = self.push(handle, snapshot, runtime.clone(), input);
            let service = &snapshot.service;
            if has_any
                && service.internal_traffic_local
                && eligibility.internal.endpoints.is_empty()
            {
                contribution.no_local[0] += 1;
            }
            if has_any
                && service.external_traffic_local
                && eligibility.external.endpoints.is_empty()
            {
                contribution.no_local[1] += 1;
            }
            // kube-proxy counts this node's ready endpoints; weir counts the ready
            // endpoints the policy lets serve external traffic (the same, for kube-default).
            let external = &eligibility.external.endpoints;
            ready_ips.entry(snapshot.key.family).or_default().extend(
                self.bound[&handle]
                    .input
                    .endpoints
                    .iter()
                    .filter(|e| e.ready && external.binary_search(&e.id).is_ok())
                    .map(|e| e.address.ip()),
            );

            let service_label = format!(
                "{}/{}:{}",
                snapshot.key.namespace,
                snapshot.key.name,
                if snapshot.key.port_name.is_empty() {
                    service.port.to_string()
                } else {
                    snapshot.key.port_name.clone()
                }
            );
            let metrics_key = (service_label, policy_label);
            let metrics = reusable
                .remove(&metrics_key)
                .or_else(|| contribution.metrics.get(&metrics_key).cloned())
                .unwrap_or_else(|| {
                    Arc::new(RouteMetrics::new(
                        &self.metrics.proxy,
                        &metrics_key.0,
                        &metrics_key.1,
                    ))
                });
            contribution.metrics.insert(metrics_key, metrics.clone());

            // UDP ports were set aside above, until they are served.
            let listen = |ip: IpAddr, port: u16| Listen {
                address: SocketAddr::new(ip, port),
                transport: Transport::Tcp,
            };
            let mut routes = Vec::new();
            if serves(&eligibility, Scope::Internal) {
                routes.push((
                    listen(service.cluster_ip, service.port),
                    Scope::Internal,
                    Vec::new(),
                ));
            }
            if serves(&eligibility, Scope::External) || serves(&eligibility, Scope::Internal) {
                if service.node_port != 0 {
                    for address in &self.node_addresses {
                        if address.is_ipv4() == service.cluster_ip.is_ipv4() {
                            routes.push((
                                listen(*address, service.node_port),
                                Scope::External,
                                Vec::new(),
                            ));
                        }
                    }
                }
                for ip in &service.external_ips {
                    routes.push((listen(*ip, service.port), Scope::External, Vec::new()));
                }
                for ip in &service.load_balancer_ips {
                    routes.push((
                        listen(*ip, service.port),
                        Scope::External,
                        snapshot.load_balancer_source_ranges.clone(),
                    ));
                }
            }
            for (address, scope, source_ranges) in routes {
                if !self.claim(key, address, ListenerKind::Service, &mut contribution) {
                    let message = format!(
                        "{address} is claimed by more than one Service port; {} does not get it",
                        service.display_name()
                    );
                    if once(&self.reported, &mut self.seen, message.clone(), Some(key)) {
                        tracing::warn!("{message}");
                    }
                    continue;
                }
                self.routes.insert(
                    address,
                    Arc::new(Route {
                        handle,
                        policy: runtime.clone(),
                        scope,
                        local_sources_use_cluster: service.external_traffic_local,
                        source_ranges,
                        metrics: metrics.clone(),
                    }),
                );
            }
        }
        self.no_local[0] += contribution.no_local[0];
        self.no_local[1] += contribution.no_local[1];
        for ip in &contribution.service_ips {
            *self.service_ips.entry(*ip).or_default() += 1;
        }
        if let Some(port) = health_port {
            // One server per Service, counting one family (IPv4 when it has it), as
            // kube-proxy's single health check server does.
            let count = ready_ips.values().next().map_or(0, BTreeSet::len);
            self.health_counts.insert(key.clone(), count);
            for address in self.node_addresses.clone() {
                let kind = ListenerKind::HealthCheck {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                };
                let address = Listen::tcp(SocketAddr::new(address, port));
                if !self.claim(key, address, kind, &mut contribution) {
                    let message = format!(
                        "healthCheckNodePort {address} of {}/{} is taken by another Service",
                        key.0, key.1
                    );
                    if once(&self.reported, &mut self.seen, message.clone(), Some(key)) {
                        tracing::warn!("{message}");
                    }
                }
            }
        }
        contribution
    }

    /// Takes a listening address for a Service, unless another Service (or another of
    /// its own ports) has it.
    fn claim(
        &mut self,
        key: &ServiceKey,
        address: Listen,
        kind: ListenerKind,
        contribution: &mut Contribution,
    ) -> bool {
        match self.owners.get(&address) {
            // As a fresh start decides (Services in name order, first come first
            // served): a Service before the owner takes the address over, and the owner
            // is applied again to find it lost.
            Some(owner) if key < owner => {
                let owner = owner.clone();
                self.waiting
                    .entry(address)
                    .or_default()
                    .insert(owner.clone());
                self.pending.merge(Changed::Services([owner].into()));
            }
            Some(_) => {
                self.waiting.entry(address).or_default().insert(key.clone());
                return false;
            }
            None => {}
        }
        self.owners.insert(address, key.clone());
        self.wanted.insert(address, kind);
        contribution.addresses.push(address);
        true
    }

    /// The runtime a snapshot's policy name resolves to: `None` when the policy is
    /// unavailable and the failure mode is closed. Also returns the metrics label.
    fn resolve(&mut self, snapshot: &ServicePortSnapshot) -> (Option<Arc<PolicyRuntime>>, String) {
        match self.registry.resolve(&snapshot.policy) {
            Binding::Policy(runtime) => (Some(runtime), snapshot.policy.clone()),
            Binding::Missing(reason) => {
                // Deleting a module is a decision, not a failure: its Services go back to
                // kube-default whatever their failure mode.
                let deleted = self.registry.was_deleted(&snapshot.policy);
                let (runtime, outcome) = match snapshot.failure_mode {
                    _ if deleted => (
                        Some(self.registry.default_runtime()),
                        "falls back to the built-in kube-default",
                    ),
                    FailureMode::Open => (
                        Some(self.registry.default_runtime()),
                        "falls back to the built-in kube-default",
                    ),
                    FailureMode::Closed => (None, "rejects its traffic (failure mode closed)"),
                };
                let message = format!(
                    "{}: {reason}; it {outcome}",
                    snapshot.service.display_name()
                );
                if self.fallback_once(snapshot, message.clone()) {
                    tracing::warn!("{message}");
                }
                (runtime, crate::policy::DEFAULT_POLICY.to_string())
            }
        }
    }

    /// Tells the port's policy its current state, unless it knows it already. Returns the
    /// eligibility serving the port.
    fn push(
        &mut self,
        handle: ServiceHandle,
        snapshot: &ServicePortSnapshot,
        runtime: Option<Arc<PolicyRuntime>>,
        mut input: ServiceInput,
    ) -> Eligibility {
        // In id order, as the runtime keeps it: then it shares this copy.
        input.endpoints.sort_by_key(|e| e.id);
        input.endpoints.dedup_by_key(|e| e.id);
        if let Some(bound) = self.bound.get(&handle) {
            let same_runtime = match (&bound.runtime, &runtime) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same_runtime && *bound.input == input && bound.policy == snapshot.policy {
                return bound.eligibility.clone();
            }
        }
        let proxy = &self.metrics.proxy;
        match self.bound.get(&handle) {
            None => {
                proxy.service_changes.inc();
            }
            Some(bound) => {
                if bound.input.service != input.service {
                    proxy.service_changes.inc();
                }
                if bound.input.endpoints != input.endpoints {
                    proxy.endpoint_changes.inc();
                }
            }
        }
        if let Some(previous) = self.bound.get(&handle).and_then(|b| b.runtime.clone())
            && !runtime.as_ref().is_some_and(|r| Arc::ptr_eq(r, &previous))
        {
            self.retire(previous, handle);
        }
        let input = Arc::new(input);
        let mut failed = None;
        let eligibility = match &runtime {
            Some(runtime) => {
                let answer = runtime.update(handle, input.clone());
                if let Some(error) = answer.failure {
                    failed = Some(self.policy_failed(snapshot, runtime.name(), &error));
                }
                answer.eligibility
            }
            None => Eligibility::reject_all(),
        };
        let before = self.bound.get_mut(&handle).and_then(|b| b.failed.take());
        if let Some(labels) = before.filter(|b| Some(b) != failed.as_ref()) {
            self.metrics.proxy.ports_failed.remove(&labels);
        }
        self.bound.insert(
            handle,
            Bound {
                policy: snapshot.policy.clone(),
                failed,
                runtime,
                input,
                eligibility: eligibility.clone(),
            },
        );
        eligibility
    }

    /// A port's policy failed its update: the port alone follows its failure mode until
    /// its next update. Said once while it lasts, with a `PolicyFallback` Event, and
    /// shown by `weir_policy_service_failed` (the series returned).
    fn policy_failed(
        &mut self,
        snapshot: &ServicePortSnapshot,
        policy: &str,
        error: &crate::policy::CallError,
    ) -> crate::metrics::PortFailureLabels {
        let labels = crate::metrics::PortFailureLabels {
            service: snapshot.service.display_name(),
            policy: policy.to_string(),
            reason: error.kind.into(),
        };
        self.metrics
            .proxy
            .ports_failed
            .get_or_create(&labels)
            .set(1);
        let outcome = match snapshot.failure_mode {
            FailureMode::Open => "falls back to the built-in kube-default",
            FailureMode::Closed => "rejects its traffic (failure mode closed)",
        };
        // The runtime has logged the failure itself.
        let message = format!(
            "{}: policy `{policy}` failed ({error}); it {outcome} until its next change",
            snapshot.service.display_name()
        );
        self.fallback_once(snapshot, message);
        labels
    }

    /// A `PolicyFallback` warning about a port's Service, announced (Kubernetes mode) the
    /// first time it is seen while it lasts. Returns whether it is new.
    fn fallback_once(&mut self, snapshot: &ServicePortSnapshot, message: String) -> bool {
        let key = (snapshot.key.namespace.clone(), snapshot.key.name.clone());
        let new = once(&self.reported, &mut self.seen, message.clone(), Some(&key));
        if new && let Some(kube) = self.source.kubernetes() {
            kube.announce(Announcement {
                subject: kube.service_subject(&key),
                warning: true,
                reason: "PolicyFallback",
                action: "Route",
                note: message,
            });
        }
        new
    }

    fn forget(&mut self, handle: ServiceHandle) {
        if let Some(bound) = self.bound.remove(&handle) {
            if let Some(labels) = &bound.failed {
                self.metrics.proxy.ports_failed.remove(labels);
            }
            self.metrics.proxy.service_changes.inc();
            if let Some(runtime) = bound.runtime {
                self.retire(runtime, handle);
            }
        }
    }
}

/// What one Service puts into the data plane, kept to take it out at its next change.
#[derive(Default)]
struct Contribution {
    /// Its proxied ports and their handles.
    ports: Vec<(ServicePortKey, ServiceHandle)>,
    /// The listening addresses it owns (service and health check).
    addresses: Vec<Listen>,
    /// Its addresses: ClusterIPs, externalIPs, LoadBalancer IPs.
    service_ips: BTreeSet<IpAddr>,
    /// Its ports with a Local traffic policy and no local endpoints: internal, external.
    no_local: [i64; 2],
    metrics: HashMap<(String, String), Arc<RouteMetrics>>,
}

/// Whether a scope needs its listeners: something to forward to, or connections to drop.
/// With nothing eligible and `reject`, no listener is better: the kernel refuses the
/// connection, as kube-proxy's REJECT rule does.
fn serves(eligibility: &Eligibility, scope: Scope) -> bool {
    let set = eligibility.for_scope(scope);
    !set.endpoints.is_empty() || set.when_empty == EmptyAction::Drop
}

/// Whether a warning is new since the last sync; notes it as seen in this one.
fn once(
    reported: &Reported,
    seen: &mut Reported,
    message: String,
    service: Option<&ServiceKey>,
) -> bool {
    let new = !reported.contains_key(&message) && !seen.contains_key(&message);
    seen.insert(message, service.cloned());
    new
}

/// Warnings logged, each with the Service it is about (if one).
type Reported = HashMap<String, Option<ServiceKey>>;

fn policy_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn log_diagnostic(diagnostic: &Diagnostic) {
    match diagnostic.severity {
        Severity::Error => tracing::error!("{diagnostic}"),
        Severity::Warning => tracing::warn!("{diagnostic}"),
    }
}
