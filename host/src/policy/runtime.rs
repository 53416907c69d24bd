//! One policy in service: an instance of its own for every service port, so a port's
//! state, memory budget and failures are its own, and every failure is contained by that
//! port's failure mode.
//!
//! The Service port is what a user reasons about, so it is the unit of isolation. Each
//! port bound to a Wasm policy has one instance (its own `Store`), configured and told only
//! that port's `update`s; every data-plane worker asks the same instance, so memory
//! follows the ports and their tables, never the number of workers, and all of a
//! Service's connections meet the same state (affinity, counters). A trap, a missed
//! deadline or a memory overrun poisons only that port's instance: the port follows its
//! failure mode, nothing is replayed for any other port, and the instance is rebuilt by
//! the control plane (`repair`, or the port's next `update`), never on a data-plane
//! thread.
//!
//! The built-in kube-default is weir's own code and runs natively: a port on it costs no
//! instance at all. Every port also keeps kube-default's answer natively, as its `open`
//! failure mode.
//!
//! Locks, always in this order: the port table (`ports`), one port's mutex. The data
//! plane takes the table for reading and one port's mutex; the control plane takes the
//! table for writing only to add or remove a port.
//!
//! A port whose `update` fails follows its failure mode until its next update gives the
//! policy another chance. A port whose `select` fails is quarantined for a backoff
//! (`Limits::quarantine`, doubling per consecutive failure up to a minute), then tried
//! again: a call descheduled past its deadline costs a moment, and a policy that always
//! fails costs a rebuild now and then, not one per connection.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use weir_sdk::ids::IdMap;
use weir_sdk::{Connection, Decision, Driver, Eligibility, EndpointId, Scope};

use super::bindings::types as wit;
use super::convert;
use super::engine::{CompiledPolicy, PolicyEngine};
use super::instance::{CallError, CallKind, PolicyInstance};
use super::port::{MAX_QUARANTINE, Port, PortState, Quarantine};
use super::request::RequestHead;
use super::service::{FailureMode, HostDecision, ServiceInput, UpdateAnswer};
use crate::locks::{lock, read, write};

/// How a policy's decisions are made.
enum Backend {
    /// weir's own kube-default, in process: the port's native driver is the policy.
    Native,
    /// A component: one instance per port.
    Wasm(Arc<CompiledPolicy>),
}

/// The handle a port's native driver keys it by: each driver holds that one port.
const NATIVE_HANDLE: u32 = 0;

/// A policy serving a set of service ports.
pub struct PolicyRuntime {
    engine: Arc<PolicyEngine>,
    name: String,
    backend: Backend,
    config: String,
    ports: RwLock<IdMap<Arc<Port>>>,
    /// Ports whose instance a data-plane call poisoned, for [`PolicyRuntime::repair`].
    poisoned: Mutex<Vec<u32>>,
    /// The policy asked for outcomes (`configure`'s capabilities): lets the data plane
    /// skip `observe` without taking a lock.
    observes: bool,
}

impl PolicyRuntime {
    /// A Wasm policy. Instantiates and configures it once, to check that it can be and
    /// that it accepts `config`, and to learn what it asks of the host; each port gets an
    /// instance of its own when it is first updated.
    pub fn new(
        engine: Arc<PolicyEngine>,
        policy: Arc<CompiledPolicy>,
        config: &str,
    ) -> Result<Self, CallError> {
        let probe = PolicyInstance::new(&engine, &policy, config, engine.limits.memory_bytes)
            .inspect_err(|e| {
                engine
                    .metrics
                    .failure(&policy.name, CallKind::Configure, e.kind);
            })?;
        Ok(PolicyRuntime {
            observes: probe.capabilities.observe_outcomes,
            name: policy.name.clone(),
            engine,
            backend: Backend::Wasm(policy),
            config: config.to_string(),
            ports: RwLock::default(),
            poisoned: Mutex::default(),
        })
    }

    /// weir's built-in kube-default, run natively.
    pub fn native(engine: Arc<PolicyEngine>) -> Self {
        PolicyRuntime {
            engine,
            name: super::DEFAULT_POLICY.to_string(),
            backend: Backend::Native,
            config: String::new(),
            ports: RwLock::default(),
            poisoned: Mutex::default(),
            observes: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sha256 of the module serving, or `built-in` for weir's own kube-default.
    pub fn sha256(&self) -> &str {
        match &self.backend {
            Backend::Native => "built-in",
            Backend::Wasm(policy) => &policy.sha256,
        }
    }

    /// The compiled module, for a Wasm policy.
    pub fn compiled(&self) -> Option<&Arc<CompiledPolicy>> {
        match &self.backend {
            Backend::Native => None,
            Backend::Wasm(policy) => Some(policy),
        }
    }

    /// Service ports this policy serves.
    pub fn ports(&self) -> usize {
        read(&self.ports).len()
    }

    /// Tells a service port its current state, building its instance first if it has
    /// none. Returns what serves the port now. `input` may be shared with the caller: the
    /// control plane keeps the same copy.
    pub fn update(&self, handle: u32, input: impl Into<Arc<ServiceInput>>) -> UpdateAnswer {
        let mut input = input.into();
        // Lookups by id binary-search this list; ids are the host's and unique. A sorted
        // list (the control plane's) is used as it is, without a copy.
        if !input.endpoints.is_sorted_by(|a, b| a.id < b.id) {
            let owned = Arc::make_mut(&mut input);
            owned.endpoints.sort_by_key(|e| e.id);
            owned.endpoints.dedup_by_key(|e| e.id);
        }
        let existing = read(&self.ports).get(&handle).cloned();
        let port = existing.unwrap_or_else(|| {
            let port = Arc::new(Port {
                state: Mutex::new(PortState {
                    input: input.clone(),
                    native: Driver::configure("").expect("kube-default takes no config"),
                    eligibility: Eligibility::reject_all(),
                    targets: IdMap::default(),
                    failure: None,
                    quarantine: None,
                    instance: None,
                }),
            });
            write(&self.ports).entry(handle).or_insert(port).clone()
        });
        let mut guard = lock(&port.state);
        let state = &mut *guard;
        let native = state.native.update(
            NATIVE_HANDLE,
            input.service.clone(),
            &input.node,
            &input.endpoints,
        );
        state.input = input.clone();
        // A new input gives a port that failed before another chance.
        state.quarantine = None;
        let Backend::Wasm(policy) = &self.backend else {
            state.eligibility = native;
            return state.answer();
        };
        let result = match state.instance.as_mut() {
            Some(instance) => call_update(instance, handle, &input),
            None => self.instantiate(policy, &input).and_then(|mut instance| {
                let answer = call_update(&mut instance, handle, &input);
                state.instance = Some(instance);
                answer
            }),
        };
        match result {
            Ok(eligibility) => state.serve(eligibility, None),
            Err(error) => {
                self.failed(CallKind::Update, &input, &error);
                state.instance = None;
                let eligibility = fallback(&input, &native);
                state.serve(eligibility, Some(error));
            }
        }
        state.answer()
    }

    /// Forgets a service port: its instance, state and memory go with it.
    pub fn remove(&self, handle: u32) {
        write(&self.ports).remove(&handle);
    }

    /// The eligibility currently serving a service port, and why it is the failure
    /// mode's, when it is.
    pub fn eligibility(&self, handle: u32) -> Option<(Eligibility, Option<CallError>)> {
        let port = read(&self.ports).get(&handle).cloned()?;
        let state = lock(&port.state);
        Some((state.eligibility.clone(), state.failure.clone()))
    }

    /// Whether `endpoint`, at `address`, is still eligible for `scope` traffic of a port:
    /// what a long-lived flow asks after a change, to move off an endpoint that left.
    pub fn still_eligible(
        &self,
        handle: u32,
        scope: Scope,
        endpoint: EndpointId,
        address: std::net::SocketAddr,
    ) -> bool {
        let Some(port) = read(&self.ports).get(&handle).cloned() else {
            return false;
        };
        let state = lock(&port.state);
        state
            .eligibility
            .for_scope(scope)
            .endpoints
            .binary_search(&endpoint)
            .is_ok()
            && state.input.address(endpoint) == Some(address)
    }

    /// The endpoint at `address`, if it is eligible for `scope` traffic of a port.
    pub fn eligible_at(
        &self,
        handle: u32,
        scope: Scope,
        address: std::net::SocketAddr,
    ) -> Option<EndpointId> {
        let port = read(&self.ports).get(&handle).cloned()?;
        let state = lock(&port.state);
        let set = &state.eligibility.for_scope(scope).endpoints;
        set.iter()
            .copied()
            .find(|id| state.input.address(*id) == Some(address))
    }

    /// The decision for one new connection.
    pub fn select(&self, handle: u32, connection: &Connection) -> HostDecision {
        self.decide(handle, connection, None)
    }

    /// The decision for one request on an HTTP port: a 0.2.0 policy's `select-request`,
    /// lent the request; a 0.1.0 policy's `select`.
    pub fn select_request(
        &self,
        handle: u32,
        connection: &Connection,
        request: &Arc<RequestHead>,
    ) -> HostDecision {
        self.decide(handle, connection, Some(request))
    }

    fn decide(
        &self,
        handle: u32,
        connection: &Connection,
        request: Option<&Arc<RequestHead>>,
    ) -> HostDecision {
        let ports = read(&self.ports);
        let Some(port) = ports.get(&handle) else {
            return HostDecision::Reject;
        };
        let mut guard = lock(&port.state);
        let state = &mut *guard;
        let set = state.eligibility.for_scope(connection.scope);
        if set.endpoints.is_empty() {
            return host_decision(set.empty_decision(), &state.input);
        }
        if let Backend::Native = self.backend {
            let decision = state.native.select(NATIVE_HANDLE, connection);
            return host_decision(decision, &state.input);
        }
        if state.failure.is_some() || state.quarantine.is_some_and(|q| Instant::now() < q.until) {
            return self.failure_mode(state, connection);
        }
        let Some(instance) = state.instance.as_mut() else {
            return self.failure_mode(state, connection);
        };
        let wit_connection = convert::connection(connection);
        let (call, answer) = match request {
            None => (CallKind::Select, instance.select(handle, wit_connection)),
            Some(request) => (
                CallKind::SelectRequest,
                instance.select_request(handle, wit_connection, request),
            ),
        };
        let error = match answer {
            Ok(wit::Decision::Forward(id)) => match state.targets.get(&id) {
                Some(target) if target.allows(connection.scope) => {
                    let address = target.address;
                    state.quarantine = None;
                    return HostDecision::Forward {
                        endpoint: id,
                        address,
                    };
                }
                Some(_) => CallError::invalid(format!(
                    "{} chose endpoint id {id}, which is not eligible for {:?} traffic to {}",
                    call.as_str(),
                    connection.scope,
                    state.input.service.display_name()
                )),
                None => CallError::invalid(format!(
                    "{} chose endpoint id {id}, which {} does not have",
                    call.as_str(),
                    state.input.service.display_name()
                )),
            },
            Ok(wit::Decision::Reject) => return HostDecision::Reject,
            Ok(wit::Decision::Drop) => return HostDecision::Drop,
            Err(error) => error,
        };
        self.quarantine(state, handle, call, &error);
        self.failure_mode(state, connection)
    }

    /// Another endpoint for a connection whose connect to each of `tried` failed: the
    /// eligible endpoint of `scope` after the last one tried, in id order, skipping those
    /// tried. Used when the policy answers an endpoint already tried (a hashing policy
    /// will, for the same client).
    pub fn alternative(
        &self,
        handle: u32,
        scope: Scope,
        tried: &[EndpointId],
    ) -> Option<HostDecision> {
        let port = read(&self.ports).get(&handle).cloned()?;
        let state = lock(&port.state);
        let set = &state.eligibility.for_scope(scope).endpoints;
        let last = tried.last().copied().unwrap_or(0);
        let start = set.partition_point(|&id| id <= last);
        let id = set[start..]
            .iter()
            .chain(&set[..start])
            .copied()
            .find(|id| !tried.contains(id))?;
        let address = state.input.address(id)?;
        Some(HostDecision::Forward {
            endpoint: id,
            address,
        })
    }

    /// Tells a port's instance what happened to a connection it forwarded, if the policy
    /// asked for outcomes.
    pub fn observe(&self, handle: u32, outcome: &weir_sdk::Outcome) {
        self.tell(handle, |instance| {
            let result = instance.observe(handle, convert::outcome(outcome));
            (CallKind::Observe, result)
        });
    }

    /// Tells a port's instance what happened to a request it forwarded, if the policy
    /// asked for outcomes: `observe-request` (0.2.0), or `observe` with the request's
    /// connection outcome (0.1.0).
    pub fn observe_request(&self, handle: u32, outcome: &weir_sdk::RequestOutcome) {
        self.tell(handle, |instance| {
            let call = if instance.decides_requests() {
                CallKind::ObserveRequest
            } else {
                CallKind::Observe
            };
            (call, instance.observe_request(handle, outcome))
        });
    }

    /// Runs `call` on a port's instance, when the policy asked for outcomes and the port
    /// has one; a failure quarantines the port.
    fn tell(
        &self,
        handle: u32,
        call: impl FnOnce(&mut PolicyInstance) -> (CallKind, Result<(), CallError>),
    ) {
        if !self.observes {
            return;
        }
        let ports = read(&self.ports);
        let Some(port) = ports.get(&handle) else {
            return;
        };
        let mut guard = lock(&port.state);
        let state = &mut *guard;
        let Some(instance) = state.instance.as_mut() else {
            return;
        };
        if let (kind, Err(error)) = call(instance) {
            self.quarantine(state, handle, kind, &error);
        }
    }

    /// Rebuilds the instances that data-plane calls poisoned: instantiate, configure and
    /// replay the port's own `update`, for those ports only. Runs on the control plane
    /// (and in the tools between their calls); the data plane never builds an instance.
    /// Returns the number of ports repaired.
    pub fn repair(&self) -> usize {
        let Backend::Wasm(policy) = &self.backend else {
            return 0;
        };
        let poisoned = std::mem::take(&mut *lock(&self.poisoned));
        let mut repaired = 0;
        for handle in poisoned {
            let Some(port) = read(&self.ports).get(&handle).cloned() else {
                continue;
            };
            let input = lock(&port.state).input.clone();
            // Built without the port's lock: its connections meanwhile get its failure mode.
            let rebuilt = self.instantiate(policy, &input).and_then(|mut instance| {
                call_update(&mut instance, handle, &input).map(|answer| (instance, answer))
            });
            let mut state = lock(&port.state);
            if !Arc::ptr_eq(&state.input, &input) || state.instance.is_some() {
                // An update came first and built what it needed.
                continue;
            }
            self.engine.metrics.replacement(&self.name);
            match rebuilt {
                Ok((instance, eligibility)) => {
                    // A replay is not news: a quarantine stands until it runs out.
                    state.instance = Some(instance);
                    state.serve(eligibility, None);
                    repaired += 1;
                }
                Err(error) => {
                    self.failed(CallKind::Update, &input, &error);
                    let eligibility = fallback(&input, state.native.eligibility(NATIVE_HANDLE));
                    state.serve(eligibility, Some(error));
                }
            }
        }
        repaired
    }

    /// A fresh instance for a port, under the port's memory budget.
    fn instantiate(
        &self,
        policy: &Arc<CompiledPolicy>,
        input: &ServiceInput,
    ) -> Result<PolicyInstance, CallError> {
        let budget = self.engine.limits.memory_budget(input.memory_mib);
        PolicyInstance::new(&self.engine, policy, &self.config, budget).inspect_err(|error| {
            self.failed(CallKind::Configure, input, error);
        })
    }

    /// After a data-plane call failed: counts it, drops the poisoned instance at once (so
    /// nothing else calls into it), puts the port on its failure mode for a backoff and
    /// queues the instance for the control plane to rebuild.
    fn quarantine(&self, state: &mut PortState, handle: u32, call: CallKind, error: &CallError) {
        self.failed(call, &state.input, error);
        state.instance = None;
        let strikes = state.quarantine.map_or(0, |q| q.strikes) + 1;
        let backoff = self
            .engine
            .limits
            .quarantine
            .saturating_mul(1 << (strikes - 1).min(16))
            .min(MAX_QUARANTINE);
        state.quarantine = Some(Quarantine {
            until: Instant::now() + backoff,
            strikes,
        });
        lock(&self.poisoned).push(handle);
    }

    fn failure_mode(&self, state: &mut PortState, connection: &Connection) -> HostDecision {
        let mode = state.input.failure_mode;
        self.engine.metrics.fallback(&self.name, mode);
        match mode {
            FailureMode::Open => {
                let decision = state.native.select(NATIVE_HANDLE, connection);
                host_decision(decision, &state.input)
            }
            FailureMode::Closed => HostDecision::Reject,
        }
    }

    fn failed(&self, call: CallKind, input: &ServiceInput, error: &CallError) {
        self.engine.metrics.failure(&self.name, call, error.kind);
        tracing::warn!(
            policy = %self.name,
            service = %input.service.display_name(),
            call = call.as_str(),
            reason = error.kind.as_str(),
            "{}",
            error.message
        );
    }
}

/// The failure mode's eligibility for a port: kube-default's (`open`) or nothing.
fn fallback<'a>(input: &ServiceInput, native: impl Into<Option<&'a Eligibility>>) -> Eligibility {
    match (input.failure_mode, native.into()) {
        (FailureMode::Open, Some(native)) => native.clone(),
        _ => Eligibility::reject_all(),
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
