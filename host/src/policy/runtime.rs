//! One policy in service: an instance per data-plane worker, every `update` pushed to
//! each of them, and every failure contained by the service's failure mode.
//!
//! Locks, always in this order: the service table (`services`), a worker's mutex, the
//! native fallback's mutex. On the normal path the data plane takes only its own worker's
//! mutex, which the control plane holds just long enough to push an update, so workers
//! never contend with each other; a failure also takes the service table (to replay it
//! into a fresh instance) and the fallback (to answer with the failure mode).
//!
//! A service whose `update` fails follows its failure mode on that worker until its next
//! update gives the policy another chance. A service whose `select` fails is quarantined
//! for a backoff (`Limits::quarantine`, doubling per consecutive failure up to a minute),
//! then tried again: a call descheduled past its deadline costs a moment, and a policy
//! that always fails costs a rebuild now and then, not one per connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use kube_default::KubeDefault;
use weir_sdk::ids::IdMap;
use weir_sdk::{
    Connection, Decision, Driver, Eligibility, Endpoint, EndpointId, Node, Scope, Service,
};

use super::bindings::types as wit;
use super::convert;
use super::engine::{CompiledPolicy, PolicyEngine};
use super::instance::{CallError, CallKind, FailureKind, PolicyInstance};
use crate::locks::{lock, read, write};

/// Rebuilding an instance replays every service; a policy that keeps failing during the
/// replay is given up on (all its services on their failure mode) after this many tries,
/// until its next update.
const MAX_REBUILD_ATTEMPTS: usize = 4;

/// What a service gets when its policy fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureMode {
    /// weir's built-in kube-default answer: kube-proxy's eligibility and random selection.
    #[default]
    Open,
    /// Reject all traffic.
    Closed,
}

impl FailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
        }
    }
}

/// Everything a policy is told about one service port, kept to replay into new instances.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceInput {
    pub service: Service,
    pub node: Arc<Node>,
    /// The endpoints with their host-assigned ids, sorted by id.
    pub endpoints: Vec<Endpoint>,
    pub failure_mode: FailureMode,
}

impl ServiceInput {
    /// The `ip:port` of every endpoint in `set`, sorted as strings (how reports show them).
    /// `set` is normalized (sorted); this input's endpoints may be in any order.
    pub fn addresses(&self, set: &weir_sdk::EndpointSet) -> Vec<String> {
        let mut out: Vec<String> = self
            .endpoints
            .iter()
            .filter(|e| set.endpoints.binary_search(&e.id).is_ok())
            .map(|e| e.address.to_string())
            .collect();
        out.sort();
        out
    }

    fn address(&self, id: EndpointId) -> Option<SocketAddr> {
        self.endpoints
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .map(|i| self.endpoints[i].address)
    }
}

/// The host's decision for one connection, with the address to connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostDecision {
    Forward {
        endpoint: EndpointId,
        address: SocketAddr,
    },
    Reject,
    Drop,
}

/// The outcome of pushing one update.
#[derive(Clone, Debug)]
pub struct UpdateAnswer {
    /// What serves the service now: the policy's answer, or the failure mode's.
    pub eligibility: Eligibility,
    /// Why the policy's answer is not in use, when it is not.
    pub failure: Option<CallError>,
}

struct WorkerService {
    input: Arc<ServiceInput>,
    eligibility: Eligibility,
    /// Every endpoint by id, with the scopes it is eligible for: checks and resolves a
    /// `select` answer in one lookup, whatever the number of endpoints.
    targets: IdMap<Target>,
    /// Set when this service's last update failed on this worker: its traffic follows the
    /// failure mode until its next successful update.
    failure: Option<CallError>,
    /// Set when a `select` or `observe` for this service failed: its traffic follows the
    /// failure mode until then, and the policy is tried again after.
    quarantine: Option<Quarantine>,
}

/// A service's backoff after data-plane failures: one failure (a descheduled call can miss
/// a 1 ms deadline) costs a moment on the failure mode; repeated failures back off to
/// [`MAX_QUARANTINE`], so a policy that always fails costs a rebuild now and then, not one
/// per connection.
#[derive(Clone, Copy, Debug)]
struct Quarantine {
    until: Instant,
    strikes: u32,
}

/// The longest a service waits before its policy is tried again.
const MAX_QUARANTINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
struct Target {
    address: SocketAddr,
    internal: bool,
    external: bool,
}

impl Target {
    fn allows(&self, scope: Scope) -> bool {
        match scope {
            Scope::Internal => self.internal,
            Scope::External => self.external,
        }
    }
}

impl WorkerService {
    fn new(input: Arc<ServiceInput>, eligibility: Eligibility, failure: Option<CallError>) -> Self {
        let mut targets = IdMap::default();
        for e in &input.endpoints {
            targets.insert(
                e.id,
                Target {
                    address: e.address,
                    internal: false,
                    external: false,
                },
            );
        }
        for &id in &eligibility.internal.endpoints {
            if let Some(t) = targets.get_mut(&id) {
                t.internal = true;
            }
        }
        for &id in &eligibility.external.endpoints {
            if let Some(t) = targets.get_mut(&id) {
                t.external = true;
            }
        }
        WorkerService {
            input,
            eligibility,
            targets,
            failure,
            quarantine: None,
        }
    }
}

struct Worker {
    instance: Option<PolicyInstance>,
    services: IdMap<WorkerService>,
}

/// A policy serving a set of service ports.
pub struct PolicyRuntime {
    engine: Arc<PolicyEngine>,
    policy: Arc<CompiledPolicy>,
    config: String,
    services: RwLock<BTreeMap<u32, Arc<ServiceInput>>>,
    workers: Vec<Mutex<Worker>>,
    /// Native kube-default, told every update: the `open` failure mode's answer.
    fallback: Mutex<Driver<KubeDefault>>,
    /// The policy asked for outcomes (`configure`'s capabilities): lets the data plane
    /// skip `observe` without taking a lock.
    observes: bool,
}

impl PolicyRuntime {
    /// Instantiates and configures one instance per worker. Fails if the policy cannot be
    /// instantiated or refuses its configuration.
    pub fn new(
        engine: Arc<PolicyEngine>,
        policy: Arc<CompiledPolicy>,
        config: &str,
        workers: usize,
    ) -> Result<Self, CallError> {
        let mut instances = Vec::with_capacity(workers.max(1));
        for _ in 0..workers.max(1) {
            let instance = PolicyInstance::new(&engine, &policy, config).inspect_err(|e| {
                engine
                    .metrics
                    .failure(&policy.name, CallKind::Configure, e.kind);
            })?;
            instances.push(Mutex::new(Worker {
                instance: Some(instance),
                services: IdMap::default(),
            }));
        }
        let observes = instances
            .first()
            .and_then(|w: &Mutex<Worker>| {
                lock(w)
                    .instance
                    .as_ref()
                    .map(|i| i.capabilities.observe_outcomes)
            })
            .unwrap_or(false);
        Ok(PolicyRuntime {
            observes,
            engine,
            policy,
            config: config.to_string(),
            services: RwLock::new(BTreeMap::new()),
            workers: instances,
            fallback: Mutex::new(Driver::configure("").expect("kube-default takes no config")),
        })
    }

    pub fn policy(&self) -> &Arc<CompiledPolicy> {
        &self.policy
    }

    pub fn name(&self) -> &str {
        &self.policy.name
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Pushes a service port's current state to every instance. Returns the first
    /// worker's answer (all instances of a policy are expected to agree).
    /// `input` may be shared with the caller: the control plane keeps the same copy.
    pub fn update(&self, handle: u32, input: impl Into<Arc<ServiceInput>>) -> UpdateAnswer {
        let mut input = input.into();
        // Lookups by id binary-search this list; ids are the host's and unique. A sorted
        // list (the control plane's) is used as it is, without a copy.
        if !input.endpoints.is_sorted_by(|a, b| a.id < b.id) {
            let owned = Arc::make_mut(&mut input);
            owned.endpoints.sort_by_key(|e| e.id);
            owned.endpoints.dedup_by_key(|e| e.id);
        }
        let mut services = write(&self.services);
        let fallback =
            self.fallback()
                .update(handle, input.service.clone(), &input.node, &input.endpoints);
        services.insert(handle, input.clone());
        let mut first = None;
        for worker in &self.workers {
            let mut worker = lock(worker);
            let answer = self.update_worker(&mut worker, &services, handle, &input, &fallback);
            first.get_or_insert(answer);
        }
        first.expect("at least one worker")
    }

    /// Forgets a service port on every instance.
    pub fn remove(&self, handle: u32) {
        let mut services = write(&self.services);
        self.fallback().remove(handle);
        services.remove(&handle);
        for worker in &self.workers {
            let mut worker = lock(worker);
            worker.services.remove(&handle);
            if let Some(instance) = worker.instance.as_mut()
                && let Err(error) = instance.remove(handle)
            {
                self.failed(CallKind::Remove, &error);
                self.rebuild(&mut worker, &services);
            }
        }
    }

    /// The eligibility currently serving a service port (worker 0's view).
    pub fn eligibility(&self, handle: u32) -> Option<(Eligibility, Option<CallError>)> {
        let worker = lock(&self.workers[0]);
        worker
            .services
            .get(&handle)
            .map(|s| (s.eligibility.clone(), s.failure.clone()))
    }

    /// The decision for one new connection, on data-plane worker `worker`.
    pub fn select(&self, worker: usize, handle: u32, connection: &Connection) -> HostDecision {
        let slot = &self.workers[worker % self.workers.len()];
        let failed = {
            let mut guard = lock(slot);
            let w = &mut *guard;
            let Some(service) = w.services.get(&handle) else {
                return HostDecision::Reject;
            };
            let set = service.eligibility.for_scope(connection.scope);
            if set.endpoints.is_empty() {
                return host_decision(set.empty_decision(), &service.input);
            }
            if service.failure.is_some()
                || service.quarantine.is_some_and(|q| Instant::now() < q.until)
            {
                return self.failure_mode(handle, &service.input, connection);
            }
            let Some(instance) = w.instance.as_mut() else {
                return self.failure_mode(handle, &service.input, connection);
            };
            let answer = instance.select(handle, convert::connection(connection));
            let error = match answer {
                Ok(wit::Decision::Forward(id)) => match service.targets.get(&id) {
                    Some(target) if target.allows(connection.scope) => {
                        let address = target.address;
                        if service.quarantine.is_some() {
                            w.services.get_mut(&handle).expect("present").quarantine = None;
                        }
                        return HostDecision::Forward {
                            endpoint: id,
                            address,
                        };
                    }
                    Some(_) => CallError::invalid(format!(
                        "select chose endpoint id {id}, which is not eligible for {:?} traffic to {}",
                        connection.scope,
                        service.input.service.display_name()
                    )),
                    None => CallError::invalid(format!(
                        "select chose endpoint id {id}, which {} does not have",
                        service.input.service.display_name()
                    )),
                },
                Ok(wit::Decision::Reject) => return HostDecision::Reject,
                Ok(wit::Decision::Drop) => return HostDecision::Drop,
                Err(error) => error,
            };
            self.quarantine(w, handle, CallKind::Select, &error);
            let input = w.services[&handle].input.clone();
            (input, error)
        };
        self.replace_poisoned(slot);
        self.failure_mode(handle, &failed.0, connection)
    }

    /// Another endpoint for a connection whose connect to each of `tried` failed: the
    /// eligible endpoint of `scope` after the last one tried, in id order, skipping those
    /// tried. Used when the policy answers an endpoint already tried (a hashing policy
    /// will, for the same client).
    pub fn alternative(
        &self,
        worker: usize,
        handle: u32,
        scope: Scope,
        tried: &[EndpointId],
    ) -> Option<HostDecision> {
        let slot = &self.workers[worker % self.workers.len()];
        let guard = lock(slot);
        let service = guard.services.get(&handle)?;
        let set = &service.eligibility.for_scope(scope).endpoints;
        let last = tried.last().copied().unwrap_or(0);
        let start = set.partition_point(|&id| id <= last);
        let id = set[start..]
            .iter()
            .chain(&set[..start])
            .copied()
            .find(|id| !tried.contains(id))?;
        let address = service.targets.get(&id)?.address;
        Some(HostDecision::Forward {
            endpoint: id,
            address,
        })
    }

    /// Tells the instance of `worker` what happened to a connection it forwarded, if the
    /// policy asked for outcomes.
    pub fn observe(&self, worker: usize, handle: u32, outcome: &weir_sdk::Outcome) {
        if !self.observes {
            return;
        }
        let slot = &self.workers[worker % self.workers.len()];
        {
            let mut guard = lock(slot);
            let w = &mut *guard;
            let Some(instance) = w.instance.as_mut() else {
                return;
            };
            if !instance.capabilities.observe_outcomes {
                return;
            }
            match instance.observe(handle, convert::outcome(outcome)) {
                Ok(()) => return,
                Err(error) => self.quarantine(w, handle, CallKind::Observe, &error),
            }
        }
        self.replace_poisoned(slot);
    }

    /// After a data-plane call failed: counts it, drops the poisoned instance at once (so
    /// nothing else calls into it) and puts the service on its failure mode on this worker.
    fn quarantine(&self, worker: &mut Worker, handle: u32, call: CallKind, error: &CallError) {
        self.failed(call, error);
        worker.instance = None;
        if let Some(service) = worker.services.get_mut(&handle) {
            let strikes = service.quarantine.map_or(0, |q| q.strikes) + 1;
            let backoff = self
                .engine
                .limits
                .quarantine
                .saturating_mul(1 << (strikes - 1).min(16))
                .min(MAX_QUARANTINE);
            service.quarantine = Some(Quarantine {
                until: Instant::now() + backoff,
                strikes,
            });
        }
    }

    /// Builds a fresh instance for a worker whose instance was dropped, unless another
    /// thread already did (service table first, then the worker, as everywhere).
    fn replace_poisoned(&self, slot: &Mutex<Worker>) {
        let services = read(&self.services);
        let mut guard = lock(slot);
        if guard.instance.is_none() {
            self.rebuild(&mut guard, &services);
        }
    }

    fn update_worker(
        &self,
        worker: &mut Worker,
        services: &BTreeMap<u32, Arc<ServiceInput>>,
        handle: u32,
        input: &Arc<ServiceInput>,
        fallback: &Eligibility,
    ) -> UpdateAnswer {
        // A new input gives a service that failed before another chance.
        worker.services.remove(&handle);
        if worker.instance.is_none() {
            // The rebuild replays `services`, which already holds this input.
            self.rebuild(worker, services);
            if let Some(service) = worker.services.get(&handle) {
                return UpdateAnswer {
                    eligibility: service.eligibility.clone(),
                    failure: service.failure.clone(),
                };
            }
        }
        let result = match worker.instance.as_mut() {
            Some(instance) => call_update(instance, handle, input),
            None => Err(CallError {
                kind: FailureKind::Instantiate,
                message: "no live instance of the policy".to_string(),
            }),
        };
        match result {
            Ok(eligibility) => {
                worker.services.insert(
                    handle,
                    WorkerService::new(input.clone(), eligibility.clone(), None),
                );
                UpdateAnswer {
                    eligibility,
                    failure: None,
                }
            }
            Err(error) => {
                self.failed(CallKind::Update, &error);
                let eligibility = self.degrade(worker, handle, input, fallback, &error);
                if worker.instance.is_some() && error.kind != FailureKind::Instantiate {
                    self.rebuild(worker, services);
                }
                UpdateAnswer {
                    eligibility,
                    failure: Some(error),
                }
            }
        }
    }

    /// Puts a service on its failure mode on this worker and returns its eligibility.
    fn degrade(
        &self,
        worker: &mut Worker,
        handle: u32,
        input: &Arc<ServiceInput>,
        fallback: &Eligibility,
        error: &CallError,
    ) -> Eligibility {
        let eligibility = match input.failure_mode {
            FailureMode::Open => fallback.clone(),
            FailureMode::Closed => Eligibility::reject_all(),
        };
        worker.services.insert(
            handle,
            WorkerService::new(input.clone(), eligibility.clone(), Some(error.clone())),
        );
        eligibility
    }

    /// Replaces a worker's instance: instantiate, configure, replay every service that is
    /// not already on its failure mode. A service that fails during the replay goes onto
    /// its failure mode and the replay starts over on a fresh instance.
    fn rebuild(&self, worker: &mut Worker, services: &BTreeMap<u32, Arc<ServiceInput>>) {
        self.engine.metrics.replacement(&self.policy.name);
        worker.instance = None;
        for _ in 0..MAX_REBUILD_ATTEMPTS {
            let mut instance = match PolicyInstance::new(&self.engine, &self.policy, &self.config) {
                Ok(instance) => instance,
                Err(error) => {
                    self.failed(CallKind::Configure, &error);
                    self.degrade_all(worker, services, &error);
                    return;
                }
            };
            let mut replay_failed = false;
            for (&handle, input) in services {
                if worker
                    .services
                    .get(&handle)
                    .is_some_and(|s| s.failure.is_some())
                {
                    continue;
                }
                match call_update(&mut instance, handle, input) {
                    Ok(eligibility) => {
                        // A replay is not news: a quarantine stands until it runs out.
                        let quarantine = worker.services.get(&handle).and_then(|s| s.quarantine);
                        let mut service = WorkerService::new(input.clone(), eligibility, None);
                        service.quarantine = quarantine;
                        worker.services.insert(handle, service);
                    }
                    Err(error) => {
                        self.failed(CallKind::Update, &error);
                        let fallback = self.fallback_eligibility(handle);
                        self.degrade(worker, handle, input, &fallback, &error);
                        replay_failed = true;
                        break;
                    }
                }
            }
            if !replay_failed {
                worker.instance = Some(instance);
                return;
            }
        }
        let error = CallError {
            kind: FailureKind::Trap,
            message: format!(
                "policy kept failing while its services were replayed ({MAX_REBUILD_ATTEMPTS} fresh instances)"
            ),
        };
        self.degrade_all(worker, services, &error);
    }

    fn degrade_all(
        &self,
        worker: &mut Worker,
        services: &BTreeMap<u32, Arc<ServiceInput>>,
        error: &CallError,
    ) {
        worker.instance = None;
        for (&handle, input) in services {
            if worker
                .services
                .get(&handle)
                .is_some_and(|s| s.failure.is_some())
            {
                continue;
            }
            let fallback = self.fallback_eligibility(handle);
            self.degrade(worker, handle, input, &fallback, error);
        }
    }

    fn fallback_eligibility(&self, handle: u32) -> Eligibility {
        self.fallback()
            .eligibility(handle)
            .cloned()
            .unwrap_or_else(Eligibility::reject_all)
    }

    fn failure_mode(
        &self,
        handle: u32,
        input: &ServiceInput,
        connection: &Connection,
    ) -> HostDecision {
        self.engine
            .metrics
            .fallback(&self.policy.name, input.failure_mode);
        match input.failure_mode {
            FailureMode::Open => {
                let decision = self.fallback().select(handle, connection);
                host_decision(decision, input)
            }
            FailureMode::Closed => HostDecision::Reject,
        }
    }

    fn failed(&self, call: CallKind, error: &CallError) {
        self.engine
            .metrics
            .failure(&self.policy.name, call, error.kind);
        tracing::warn!(
            policy = %self.policy.name,
            call = call.as_str(),
            reason = error.kind.as_str(),
            "{}",
            error.message
        );
    }

    fn fallback(&self) -> MutexGuard<'_, Driver<KubeDefault>> {
        lock(&self.fallback)
    }
}

/// Calls `update` and checks that every id in the answer was given.
fn call_update(
    instance: &mut PolicyInstance,
    handle: u32,
    input: &ServiceInput,
) -> Result<Eligibility, CallError> {
    let service = convert::service(&input.service);
    let node = convert::node(&input.node);
    let endpoints: Vec<wit::Endpoint> = input.endpoints.iter().map(convert::endpoint).collect();
    let answer = instance.update(handle, &service, &node, &endpoints)?;
    let mut eligibility = convert::eligibility(answer);
    eligibility.normalize();
    for id in eligibility
        .internal
        .endpoints
        .iter()
        .chain(&eligibility.external.endpoints)
    {
        if input.address(*id).is_none() {
            return Err(CallError::invalid(format!(
                "update for {} named endpoint id {id}, which is not one of its {} endpoints",
                input.service.display_name(),
                input.endpoints.len()
            )));
        }
    }
    Ok(eligibility)
}

fn host_decision(decision: Decision, input: &ServiceInput) -> HostDecision {
    match decision {
        Decision::Forward(id) => match input.address(id) {
            Some(address) => HostDecision::Forward {
                endpoint: id,
                address,
            },
            None => HostDecision::Reject,
        },
        Decision::Reject => HostDecision::Reject,
        Decision::Drop => HostDecision::Drop,
    }
}
