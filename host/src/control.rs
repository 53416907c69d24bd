//! The control plane: watches objects and policy modules, keeps every policy told about
//! the service ports it serves, and publishes the routing table and listeners that
//! follow from their answers. It runs on its own thread: a policy's `update` may take up
//! to its deadline, and must never hold up a data-plane thread.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use weir_sdk::{Eligibility, ServiceHandle};

use crate::admin::{HealthChecks, Readiness};
use crate::capture::Capture;
use crate::config::Config;
use crate::discovery::Source;
use crate::discovery::kubernetes::{Announcement, POLICY_SETTINGS_KEY, PolicyMap, Subject};
use crate::discovery::watch::Changed;
use crate::health::ProxyHealth;
use crate::metrics::{Metrics, RejectionLabels, ReloadResult, TrafficPolicyLabels};
use crate::model::{self, FamilyKey, Model, ServiceKey, ServicePortKey, ServicePortSnapshot};
use crate::objects::{Diagnostic, Objects, Severity};
use crate::policy::{FailureMode, PolicyRuntime, PolicySettings, Registry, ServiceInput, settings};
use crate::proxy::{
    Listen, ListenerKind, Listeners, Route, RouteMap, RouteMetrics, Routes, Shared,
};
use crate::state::Identities;

mod bindings;
mod listeners;
mod policies;
mod routes;
mod services;
mod warnings;

use bindings::{Bindings, Context};
use listeners::Interface;
use policies::Modules;
use services::Published;
use warnings::Warnings;

/// What the control thread is told.
#[derive(Debug)]
pub enum Signal {
    /// Objects changed: look now rather than at the next poll.
    Wake,
    /// Close every listener and return.
    Stop,
}

pub struct ControlPlane {
    pub(crate) config: Config,
    pub(crate) source: Source,
    pub(crate) registry: Registry,
    /// Policy modules from the policies directory and ConfigMaps, and their settings.
    modules: Modules,
    /// Where NodePorts and health checks listen.
    node_addresses: Vec<IpAddr>,
    /// The capture interface that holds Service addresses, when configured.
    capture: Interface,
    /// Which policy serves each service port.
    bindings: Bindings,
    /// Each warning is logged once while it lasts, and again if it comes back.
    warnings: Warnings,
    pub(crate) listeners: Listeners,
    pub(crate) shared: Arc<Shared>,
    pub(crate) health_checks: Arc<HealthChecks>,
    pub(crate) health: Arc<ProxyHealth>,
    pub(crate) readiness: Arc<Readiness>,
    pub(crate) metrics: Arc<Metrics>,
    /// Objects changed and not applied yet.
    pending: Changed,
    /// Each Service's part of what is published, and the published state itself.
    published: Published,
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
            modules: Modules::new(&config),
            bindings: Bindings::new(retire_after(&config)),
            source,
            capture: Interface::new(config.capture_interface().map(Capture::new)),
            node_addresses: config.node_addresses().unwrap_or_default(),
            config,
            registry,
            warnings: Warnings::default(),
            listeners,
            shared,
            health_checks,
            health,
            readiness,
            metrics,
            pending: Changed::Nothing,
            published: Published::default(),
        }
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
                let capture_due = self.capture.retry_due();
                if self.listeners.has_failed() || capture_due {
                    // Only what failed is tried again; nothing else has changed.
                    self.reconcile_listeners();
                }
            }
            self.bindings.remove_retired();
            self.metrics.proxy.sweep();
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

    /// Applies what changed: rebuilds the ports of the Services touched (every Service
    /// for `Everything`), tells their policies, and publishes the routes, health check
    /// counts and listeners. The work is in proportion to what changed. The stages:
    /// objects → model (`model::build`, with the node's defaults) → each Service's part
    /// (`services.rs`: bindings to policies, then routes) → listeners.
    fn sync(&mut self, changed: Changed) {
        let started = Instant::now();
        let objects = match &changed {
            Changed::Nothing => return,
            Changed::Services(keys) => self.source.objects_for(keys),
            Changed::Everything => self.source.objects(),
        };
        let model = self.model(&objects);
        let mut cx = Context {
            registry: &self.registry,
            warnings: &mut self.warnings,
            kube: self.source.kubernetes(),
            metrics: &self.metrics,
        };
        let published = &mut self.published;
        let capture = routes::CaptureRules {
            enabled: self.capture.enabled(),
            allowed: self.config.node.capture_allowed_cidrs.as_deref(),
        };
        let node_addresses = &self.node_addresses;
        published.rebuild(
            &mut self.bindings,
            &mut cx,
            &changed,
            model,
            node_addresses,
            capture,
        );
        let reapply = std::mem::take(&mut published.reapply);
        if !reapply.is_empty() {
            self.pending.merge(Changed::Services(reapply));
        }
        // The routes of addresses going away are kept (retired) before the new table is
        // published, so that a connection their closing listeners accept in between
        // always finds its route. The control thread is the only writer.
        let previous = self.shared.routes.load_full();
        published.retire_routes(&previous, retire_after(&self.config), &self.shared);
        self.shared.routes.store(Arc::new(Routes {
            by_listen: published.routes.clone(),
        }));
        let only = match &changed {
            Changed::Services(keys) => Some(keys),
            _ => None,
        };
        self.warnings.synced(only);
        self.health_checks
            .store(Arc::new(published.health_counts.clone()));
        self.reconcile_listeners();
        let proxy = &self.metrics.proxy;
        for (i, policy) in ["internal", "external"].into_iter().enumerate() {
            proxy
                .no_local_endpoints
                .get_or_create(&TrafficPolicyLabels {
                    traffic_policy: policy,
                })
                .set(self.published.no_local[i]);
        }
        let refused: i64 = (self.published.services.values()).map(|c| c.refused).sum();
        proxy.refused_addresses.set(refused);
        proxy.sync_seconds.observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            services = only.map_or(self.published.services.len(), BTreeSet::len),
            took = ?started.elapsed(),
            "synced"
        );
        proxy.last_sync.set(unix_now());
        self.health.updated();
    }

    /// The model of `objects` for this node, with the node's defaults (policy, failure
    /// mode, memory budget) on the ports that name none, and what the node itself says:
    /// its addresses, local sources and eligibility.
    fn model(&mut self, objects: &Objects) -> Model {
        let node_name = self.config.node.name.clone();
        let mut model = model::build(objects, &node_name);
        let default_mode = self.config.policies.failure_mode;
        // The node's default policy, for Services that name none.
        let default = match &self.modules.shipped_default {
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
            let settings = self.modules.policy_settings.get(&port.policy);
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
            .unwrap_or_else(|| model::node_addresses(objects, &node_name));
        if self.node_addresses.is_empty()
            && self.warnings.once(
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
                cidrs.extend(model::node_pod_cidrs(objects, &node_name));
                cidrs
            }
        };
        if **self.shared.local_sources.load() != local_sources {
            self.shared.local_sources.store(Arc::new(local_sources));
        }
        self.health
            .set_node_eligible(model::node_eligible(objects, &node_name));
        for diagnostic in &model.diagnostics {
            if self.warnings.once(diagnostic.to_string(), None) {
                log_diagnostic(diagnostic);
            }
        }
        model
    }

    /// Opens and closes listeners, and the capture interface, for what is published.
    fn reconcile_listeners(&mut self) {
        let published = &self.published;
        (self.capture).reconcile(
            &mut self.listeners,
            published,
            &self.node_addresses,
            &self.readiness,
        );
    }
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
