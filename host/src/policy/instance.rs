//! One live instance of a policy: its own `Store`, every call under an epoch deadline,
//! and each failure classified. After any failure the instance is poisoned and must be
//! replaced (wasmtime leaves a trapped store unusable).

use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Store, Trap, UpdateDeadline};

use super::bindings::exports::weir::{policy0_1_0::policy, policy0_2_0::requests};
use super::bindings::types as wit;
use super::engine::{CompiledPolicy, PolicyEngine};
use super::imports::StoreState;
use super::metrics::PolicyMetrics;
use super::request::{self, RequestHead};

/// What went wrong in a call, for metrics labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The guest trapped (panic, unreachable, out-of-bounds access...).
    Trap,
    /// The call ran past its deadline and was interrupted.
    Timeout,
    /// The guest tried to grow memory past the cap (and then trapped).
    Memory,
    /// The guest answered with an endpoint id the host did not give, or not eligible.
    InvalidAnswer,
    /// `configure` returned an error.
    Refused,
    /// The instance could not be created (no free slot in the pool, for example).
    Instantiate,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::InvalidAnswer => "invalid_answer",
            FailureKind::Refused => "refused",
            FailureKind::Instantiate => "instantiate",
        }
    }
}

/// A failed call, with a message for the operator.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct CallError {
    pub kind: FailureKind,
    pub message: String,
}

impl CallError {
    pub fn invalid(message: String) -> Self {
        CallError {
            kind: FailureKind::InvalidAnswer,
            message,
        }
    }
}

/// Which deadline a call gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    Configure,
    Update,
    Remove,
    Select,
    Observe,
    SelectRequest,
    ObserveRequest,
}

impl CallKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Configure => "configure",
            CallKind::Update => "update",
            CallKind::Remove => "remove",
            CallKind::Select => "select",
            CallKind::Observe => "observe",
            CallKind::SelectRequest => "select-request",
            CallKind::ObserveRequest => "observe-request",
        }
    }
}

/// An instance's exports: 0.1.0's always, `requests` on a 0.2.0 component.
struct Exports {
    policy: policy::Guest,
    requests: Option<requests::Guest>,
}

pub struct PolicyInstance {
    store: Store<StoreState>,
    exports: Exports,
    pub(crate) capabilities: wit::Capabilities,
    policy: Arc<CompiledPolicy>,
    metrics: Arc<PolicyMetrics>,
    select_ticks: u64,
    update_ticks: u64,
    select_deadline: Duration,
    update_deadline: Duration,
}

impl PolicyInstance {
    /// Instantiates the policy with `memory_budget` bytes of linear memory (all its
    /// memories together) and runs `configure`.
    pub fn new(
        engine: &PolicyEngine,
        policy: &Arc<CompiledPolicy>,
        config: &str,
        memory_budget: usize,
    ) -> Result<Self, CallError> {
        let limits = &engine.limits;
        let mut store = Store::new(
            &engine.engine,
            StoreState::new(
                &policy.name,
                limits,
                engine.clock.clone(),
                engine.instance_seed(),
                memory_budget,
            ),
        );
        store.limiter(|state| state);
        let update_ticks = limits.ticks(limits.update_deadline);
        store.set_epoch_deadline(update_ticks);
        store.epoch_deadline_callback(|mut context| overrun(context.data_mut()));
        let exports = instantiate(&mut store, policy)
            .map_err(|e| classify(&store, e, CallKind::Configure))
            .map_err(|mut e| {
                if e.kind == FailureKind::Trap {
                    e.kind = FailureKind::Instantiate;
                }
                e
            })?;
        let mut instance = PolicyInstance {
            store,
            exports,
            capabilities: wit::Capabilities {
                observe_outcomes: false,
            },
            policy: policy.clone(),
            metrics: engine.metrics.clone(),
            select_ticks: limits.ticks(limits.select_deadline),
            update_ticks,
            select_deadline: limits.select_deadline,
            update_deadline: limits.update_deadline,
        };
        let answer = instance.call(CallKind::Configure, |exports, store| {
            exports.policy.call_configure(store, config)
        })?;
        instance.capabilities = answer.map_err(|reason| CallError {
            kind: FailureKind::Refused,
            message: format!("configure refused the configuration: {reason}"),
        })?;
        Ok(instance)
    }

    pub fn update(
        &mut self,
        handle: u32,
        service: &wit::Service,
        node: &wit::Node,
        endpoints: &[wit::Endpoint],
    ) -> Result<wit::Eligibility, CallError> {
        self.call(CallKind::Update, |exports, store| {
            (exports.policy).call_update(store, handle, service, node, endpoints)
        })
    }

    pub fn select(
        &mut self,
        handle: u32,
        connection: wit::Connection,
    ) -> Result<wit::Decision, CallError> {
        self.call(CallKind::Select, |exports, store| {
            exports.policy.call_select(store, handle, connection)
        })
    }

    /// Whether the component decides requests itself (contract 0.2.0).
    pub fn decides_requests(&self) -> bool {
        self.exports.requests.is_some()
    }

    /// The decision for one request: `select-request` on a 0.2.0 component, lent the
    /// request for the call; `select` on a 0.1.0 one.
    pub fn select_request(
        &mut self,
        handle: u32,
        connection: wit::Connection,
        request: &Arc<RequestHead>,
    ) -> Result<wit::Decision, CallError> {
        if !self.decides_requests() {
            return self.select(handle, connection);
        }
        self.store.data_mut().request = Some(request.clone());
        let answer = self.call(CallKind::SelectRequest, |exports, store| {
            let requests = exports.requests.as_ref().expect("checked above");
            requests.call_select_request(store, handle, connection, request::handle())
        });
        self.store.data_mut().request = None;
        answer
    }

    pub fn observe(&mut self, handle: u32, outcome: wit::Outcome) -> Result<(), CallError> {
        self.call(CallKind::Observe, |exports, store| {
            exports.policy.call_observe(store, handle, outcome)
        })
    }

    /// What happened to a request: `observe-request` on a 0.2.0 component, `observe`
    /// with the request's connection outcome on a 0.1.0 one.
    pub fn observe_request(
        &mut self,
        handle: u32,
        outcome: &weir_sdk::RequestOutcome,
    ) -> Result<(), CallError> {
        if !self.decides_requests() {
            let outcome = super::convert::outcome(&outcome.as_connection_outcome());
            return self.observe(handle, outcome);
        }
        let outcome = super::convert::request_outcome(outcome);
        self.call(CallKind::ObserveRequest, |exports, store| {
            let requests = exports.requests.as_ref().expect("checked above");
            requests.call_observe_request(store, handle, outcome)
        })
    }

    fn call<R>(
        &mut self,
        kind: CallKind,
        f: impl FnOnce(&Exports, &mut Store<StoreState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let (ticks, deadline) = match kind {
            CallKind::Select
            | CallKind::Observe
            | CallKind::SelectRequest
            | CallKind::ObserveRequest => (self.select_ticks, self.select_deadline),
            _ => (self.update_ticks, self.update_deadline),
        };
        let state = self.store.data_mut();
        state.deadline = deadline;
        state.deadline_ticks = ticks;
        state.cpu_at_deadline = None;
        state.extensions = 0;
        self.store.set_epoch_deadline(ticks);
        self.store.data_mut().memory_denied = false;
        let result = f(&self.exports, &mut self.store).map_err(|e| classify(&self.store, e, kind));
        // Resets the log budget for the next call, and reports what this one dropped.
        let dropped = self.store.data().log.start_call();
        if dropped > 0 {
            self.metrics.log_dropped(&self.policy.name, dropped);
            tracing::warn!(policy = %self.policy.name, call = kind.as_str(), bytes = dropped, "policy log output over the per-call cap was dropped");
        }
        result
    }
}

/// Instantiates the component and finds its exports.
fn instantiate(
    store: &mut Store<StoreState>,
    policy: &CompiledPolicy,
) -> wasmtime::Result<Exports> {
    let instance = policy.pre.instantiate(&mut *store)?;
    let requests = match &policy.requests_export {
        Some(indices) => Some(indices.load(&mut *store, &instance)?),
        None => None,
    };
    Ok(Exports {
        policy: policy.policy_export.load(&mut *store, &instance)?,
        requests,
    })
}

/// Most extensions a call gets while its thread is kept off the CPU.
const MAX_EXTENSIONS: u32 = 100;

/// A call's deadline passed. Deadlines are epoch ticks, wall-clock time, and a thread
/// that the machine keeps off the CPU (a busy node, a noisy neighbour) would miss them
/// through no fault of the policy. So the first time, the call gets another deadline's
/// worth and this thread's CPU time is noted; at the next expiry it is stopped if the
/// thread did run for at least half of that time (the policy is slow or loops), and
/// extended again if not, up to [`MAX_EXTENSIONS`] times. A loop is stopped after at
/// most about twice its deadline; reading the thread's CPU clock (a system call) happens
/// only when a deadline passes, never on a normal call.
fn overrun(state: &mut StoreState) -> wasmtime::Result<UpdateDeadline> {
    let now = thread_cpu_time();
    let ran = state
        .cpu_at_deadline
        .map(|before| now.saturating_sub(before));
    match ran {
        Some(ran) if ran >= state.deadline / 2 || state.extensions >= MAX_EXTENSIONS => {
            Err(Trap::Interrupt.into())
        }
        _ => {
            state.cpu_at_deadline = Some(now);
            state.extensions += 1;
            Ok(UpdateDeadline::Continue(state.deadline_ticks))
        }
    }
}

fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn classify(store: &Store<StoreState>, error: wasmtime::Error, kind: CallKind) -> CallError {
    let call = kind.as_str();
    if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return CallError {
            kind: FailureKind::Timeout,
            message: format!("{call} ran past its deadline and was stopped"),
        };
    }
    if store.data().memory_denied {
        return CallError {
            kind: FailureKind::Memory,
            message: format!(
                "{call} tried to grow memory past the service port's budget of {} and trapped",
                mib(store.data().memory_budget)
            ),
        };
    }
    CallError {
        kind: FailureKind::Trap,
        message: format!("{call} trapped: {}", error.root_cause()),
    }
}

/// A byte count as operators write budgets: `16 MiB`, or `1536 KiB` when not whole.
pub(crate) fn mib(bytes: usize) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Limits;

    fn state(deadline: Duration) -> StoreState {
        let limits = Limits::default();
        let mut state = StoreState::new("test", &limits, Arc::default(), Some(1), 1 << 20);
        state.deadline = deadline;
        state.deadline_ticks = 2;
        state
    }

    #[test]
    fn a_thread_kept_off_the_cpu_is_given_more_time() {
        let mut state = state(Duration::from_millis(5));
        assert!(matches!(
            overrun(&mut state),
            Ok(UpdateDeadline::Continue(2))
        ));
        // Asleep, as a descheduled thread would be: no CPU used, so not the policy's fault.
        std::thread::sleep(Duration::from_millis(20));
        assert!(matches!(
            overrun(&mut state),
            Ok(UpdateDeadline::Continue(2))
        ));
        assert_eq!(state.extensions, 2);
    }

    #[test]
    fn a_thread_that_keeps_running_is_stopped() {
        let mut state = state(Duration::from_millis(5));
        assert!(
            overrun(&mut state).is_ok(),
            "the first expiry only takes note"
        );
        let started = thread_cpu_time();
        while thread_cpu_time() - started < Duration::from_millis(5) {
            std::hint::black_box(0u64);
        }
        let Err(error) = overrun(&mut state) else {
            panic!("a thread that ran through its extension is stopped");
        };
        assert_eq!(error.downcast_ref::<Trap>(), Some(&Trap::Interrupt));
    }

    #[test]
    fn extensions_are_bounded() {
        let mut state = state(Duration::from_secs(1));
        for _ in 0..MAX_EXTENSIONS {
            assert!(overrun(&mut state).is_ok());
        }
        assert!(overrun(&mut state).is_err());
    }
}
