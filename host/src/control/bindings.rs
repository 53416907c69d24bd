//! Which policy serves each service port: what it was last told and answered, pushing
//! changes to it, its failure announcements, and retiring a port from a policy it left.

use super::*;

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

impl ControlPlane {
    /// Removes a service port from a policy it left, after [`retire_after`].
    /// A port that left the same policy before (and came back meanwhile) is due only
    /// from now: the earlier entry would remove it while the latest routes still name it.
    pub(super) fn retire(&mut self, runtime: Arc<PolicyRuntime>, handle: ServiceHandle) {
        let due = Instant::now() + retire_after(&self.config);
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

    /// The runtime a snapshot's policy name resolves to: `None` when the policy is
    /// unavailable and the failure mode is closed. Also returns the metrics label.
    pub(super) fn resolve(
        &mut self,
        snapshot: &ServicePortSnapshot,
    ) -> (Option<Arc<PolicyRuntime>>, String) {
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
    pub(super) fn push(
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
    pub(super) fn policy_failed(
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
    pub(super) fn fallback_once(
        &mut self,
        snapshot: &ServicePortSnapshot,
        message: String,
    ) -> bool {
        let key = (snapshot.key.namespace.clone(), snapshot.key.name.clone());
        let new = self.warnings.once(message.clone(), Some(&key));
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

    pub(super) fn forget(&mut self, handle: ServiceHandle) {
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
