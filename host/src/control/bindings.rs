//! Which policy serves each service port: what it was last told and answered, pushing
//! changes to it, its failure announcements, and retiring a port from a policy it left.

use std::time::Duration;

use super::*;
use crate::discovery::kubernetes::KubeSource;

/// What a service port's policy was last told, and answered.
pub(super) struct Bound {
    pub(super) policy: String,
    /// Set while the port is on its failure mode because its policy failed its update:
    /// the series of `weir_policy_service_failed` it holds.
    pub(super) failed: Option<crate::metrics::PortFailureLabels>,
    pub(super) runtime: Option<Arc<PolicyRuntime>>,
    /// Shared with the policy's runtime, which keeps the same copy.
    pub(super) input: Arc<ServiceInput>,
    pub(super) eligibility: Eligibility,
}

/// What binding a port may use besides its own state: the policies, the warnings of the
/// sync, where Events go, the metrics.
pub(super) struct Context<'a> {
    pub(super) registry: &'a Registry,
    pub(super) warnings: &'a mut Warnings,
    pub(super) kube: Option<&'a KubeSource>,
    pub(super) metrics: &'a Metrics,
}

/// A port bound to its policy: the runtime serving it (`None`: rejected, failure mode
/// closed), its metrics label, and its policy's answer.
pub(super) struct Binding {
    pub(super) runtime: Option<Arc<PolicyRuntime>>,
    pub(super) label: String,
    pub(super) eligibility: Eligibility,
}

/// Every service port's policy, and the ports that left a policy, until it can forget
/// them.
pub(super) struct Bindings {
    bound: HashMap<ServiceHandle, Bound>,
    /// Service ports to remove from a policy they left, once no connection can still be
    /// deciding with the routing table that named it.
    retired: Vec<(Instant, Arc<PolicyRuntime>, ServiceHandle)>,
    retire_after: Duration,
}

impl Bindings {
    /// `retire_after`: how long a policy keeps a port after the routes stop naming it.
    pub(super) fn new(retire_after: Duration) -> Self {
        Bindings {
            bound: HashMap::new(),
            retired: Vec::new(),
            retire_after,
        }
    }

    pub(super) fn get(&self, handle: &ServiceHandle) -> Option<&Bound> {
        self.bound.get(handle)
    }

    /// What to replay to a new version of `policy`: its ports and their inputs, in
    /// handle order.
    pub(super) fn replay(&self, policy: &str) -> Vec<(ServiceHandle, Arc<ServiceInput>)> {
        let mut replay: Vec<_> = (self.bound.iter())
            .filter(|(_, b)| b.policy == policy && b.runtime.is_some())
            .map(|(handle, b)| (*handle, b.input.clone()))
            .collect();
        replay.sort_by_key(|(handle, _)| *handle);
        replay
    }

    /// A new version of `policy` answered its ports: they move to it (off a fallback or a
    /// failure mode), and what served them before is retired.
    pub(super) fn swapped(
        &mut self,
        policy: &str,
        runtime: &Arc<PolicyRuntime>,
        answers: Vec<(ServiceHandle, Eligibility)>,
        metrics: &Metrics,
    ) {
        for (handle, eligibility) in answers {
            let Some(bound) = self.bound.get_mut(&handle) else {
                continue;
            };
            let previous = bound.runtime.replace(runtime.clone());
            bound.eligibility = eligibility;
            if let Some(labels) = bound.failed.take() {
                metrics.proxy.ports_failed.remove(&labels);
            }
            // The previous version of this policy goes away as a whole; a fallback
            // keeps serving others.
            if let Some(previous) = previous
                && previous.name() != policy
            {
                self.retire(previous, handle);
            }
        }
    }

    /// Removes a service port from a policy it left, after `retire_after`.
    /// A port that left the same policy before (and came back meanwhile) is due only
    /// from now: the earlier entry would remove it while the latest routes still name it.
    fn retire(&mut self, runtime: Arc<PolicyRuntime>, handle: ServiceHandle) {
        let due = Instant::now() + self.retire_after;
        self.retired
            .retain(|(_, r, h)| !(*h == handle && Arc::ptr_eq(r, &runtime)));
        self.retired.push((due, runtime, handle));
    }

    pub(super) fn remove_retired(&mut self) {
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

    /// Binds a port to its policy and tells the policy its current state, unless it
    /// knows it already.
    pub(super) fn bind(
        &mut self,
        cx: &mut Context,
        handle: ServiceHandle,
        snapshot: &ServicePortSnapshot,
        input: ServiceInput,
    ) -> Binding {
        let (runtime, label) = resolve(cx, snapshot);
        let eligibility = self.push(cx, handle, snapshot, runtime.clone(), input);
        Binding {
            runtime,
            label,
            eligibility,
        }
    }

    /// Tells the port's policy its current state, unless it knows it already. Returns the
    /// eligibility serving the port.
    fn push(
        &mut self,
        cx: &mut Context,
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
        let proxy = &cx.metrics.proxy;
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
                    failed = Some(policy_failed(cx, snapshot, runtime.name(), &error));
                }
                answer.eligibility
            }
            None => Eligibility::reject_all(),
        };
        let before = self.bound.get_mut(&handle).and_then(|b| b.failed.take());
        if let Some(labels) = before.filter(|b| Some(b) != failed.as_ref()) {
            cx.metrics.proxy.ports_failed.remove(&labels);
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

    /// A port that is gone: its policy forgets it once no connection can still ask.
    pub(super) fn forget(&mut self, handle: ServiceHandle, metrics: &Metrics) {
        if let Some(bound) = self.bound.remove(&handle) {
            if let Some(labels) = &bound.failed {
                metrics.proxy.ports_failed.remove(labels);
            }
            metrics.proxy.service_changes.inc();
            if let Some(runtime) = bound.runtime {
                self.retire(runtime, handle);
            }
        }
    }
}

/// The runtime a snapshot's policy name resolves to: `None` when the policy is
/// unavailable and the failure mode is closed. Also returns the metrics label.
fn resolve(
    cx: &mut Context,
    snapshot: &ServicePortSnapshot,
) -> (Option<Arc<PolicyRuntime>>, String) {
    match cx.registry.resolve(&snapshot.policy) {
        crate::policy::Binding::Policy(runtime) => (Some(runtime), snapshot.policy.clone()),
        crate::policy::Binding::Missing(reason) => {
            // Deleting a module is a decision, not a failure: its Services go back to
            // kube-default whatever their failure mode.
            let deleted = cx.registry.was_deleted(&snapshot.policy);
            let (runtime, outcome) = match snapshot.failure_mode {
                _ if deleted => (
                    Some(cx.registry.default_runtime()),
                    "falls back to the built-in kube-default",
                ),
                FailureMode::Open => (
                    Some(cx.registry.default_runtime()),
                    "falls back to the built-in kube-default",
                ),
                FailureMode::Closed => (None, "rejects its traffic (failure mode closed)"),
            };
            let message = format!(
                "{}: {reason}; it {outcome}",
                snapshot.service.display_name()
            );
            if fallback_once(cx, snapshot, message.clone()) {
                tracing::warn!("{message}");
            }
            (runtime, crate::policy::DEFAULT_POLICY.to_string())
        }
    }
}

/// A port's policy failed its update: the port alone follows its failure mode until
/// its next update. Said once while it lasts, with a `PolicyFallback` Event, and
/// shown by `weir_policy_service_failed` (the series returned).
fn policy_failed(
    cx: &mut Context,
    snapshot: &ServicePortSnapshot,
    policy: &str,
    error: &crate::policy::CallError,
) -> crate::metrics::PortFailureLabels {
    let labels = crate::metrics::PortFailureLabels {
        service: snapshot.service.display_name(),
        policy: policy.to_string(),
        reason: error.kind.into(),
    };
    cx.metrics.proxy.ports_failed.get_or_create(&labels).set(1);
    let outcome = match snapshot.failure_mode {
        FailureMode::Open => "falls back to the built-in kube-default",
        FailureMode::Closed => "rejects its traffic (failure mode closed)",
    };
    // The runtime has logged the failure itself.
    let message = format!(
        "{}: policy `{policy}` failed ({error}); it {outcome} until its next change",
        snapshot.service.display_name()
    );
    fallback_once(cx, snapshot, message);
    labels
}

/// A `PolicyFallback` warning about a port's Service, announced (Kubernetes mode) the
/// first time it is seen while it lasts. Returns whether it is new.
fn fallback_once(cx: &mut Context, snapshot: &ServicePortSnapshot, message: String) -> bool {
    let key = (snapshot.key.namespace.clone(), snapshot.key.name.clone());
    let new = cx.warnings.once(message.clone(), Some(&key));
    if new && let Some(kube) = cx.kube {
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
