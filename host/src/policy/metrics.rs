//! The policy runtime's own metrics: failures, instance rebuilds, fallbacks and dropped
//! log bytes, per policy, with bounded labels.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{CallKind, FailureKind, FailureMode};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Call {
    configure,
    update,
    remove,
    select,
    observe,
    select_request,
    observe_request,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reason {
    trap,
    timeout,
    memory,
    invalid_answer,
    refused,
    instantiate,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Mode {
    open,
    closed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub policy: String,
    pub call: Call,
    pub reason: Reason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub policy: String,
    pub mode: Mode,
}

/// Counters of the policy runtime. Label `policy` is bounded by the policies loaded.
#[derive(Debug, Default)]
pub struct PolicyMetrics {
    pub failures: Family<FailureLabels, Counter>,
    pub replacements: Family<PolicyLabels, Counter>,
    pub fallbacks: Family<FallbackLabels, Counter>,
    pub log_dropped_bytes: Family<PolicyLabels, Counter>,
}

impl PolicyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weir_policy_failures",
            "Policy calls that trapped, timed out, hit the memory cap or answered invalidly",
            self.failures.clone(),
        );
        registry.register(
            "weir_policy_instance_replacements",
            "Policy instances thrown away and rebuilt after a failure",
            self.replacements.clone(),
        );
        registry.register(
            "weir_policy_fallbacks",
            "Connections decided by a service's failure mode instead of its policy",
            self.fallbacks.clone(),
        );
        registry.register(
            "weir_policy_log_dropped_bytes",
            "Policy log output dropped for exceeding the per-call cap",
            self.log_dropped_bytes.clone(),
        );
    }

    pub(crate) fn failure(&self, policy: &str, call: CallKind, kind: FailureKind) {
        self.failures
            .get_or_create(&FailureLabels {
                policy: policy.to_string(),
                call: call.into(),
                reason: kind.into(),
            })
            .inc();
    }

    pub fn failures_total(&self, policy: &str) -> u64 {
        let mut total = 0;
        for call in [
            Call::configure,
            Call::update,
            Call::remove,
            Call::select,
            Call::observe,
        ] {
            for reason in [
                Reason::trap,
                Reason::timeout,
                Reason::memory,
                Reason::invalid_answer,
                Reason::refused,
                Reason::instantiate,
            ] {
                total += self
                    .failures
                    .get_or_create(&FailureLabels {
                        policy: policy.to_string(),
                        call: call.clone(),
                        reason,
                    })
                    .get();
            }
        }
        total
    }

    pub fn failures_of(&self, policy: &str, call: Call, reason: Reason) -> u64 {
        self.failures
            .get_or_create(&FailureLabels {
                policy: policy.to_string(),
                call,
                reason,
            })
            .get()
    }

    pub(crate) fn replacement(&self, policy: &str) {
        self.replacements
            .get_or_create(&PolicyLabels {
                policy: policy.to_string(),
            })
            .inc();
    }

    pub fn replacements(&self, policy: &str) -> u64 {
        self.replacements
            .get_or_create(&PolicyLabels {
                policy: policy.to_string(),
            })
            .get()
    }

    pub(crate) fn fallback(&self, policy: &str, mode: FailureMode) {
        self.fallbacks
            .get_or_create(&FallbackLabels {
                policy: policy.to_string(),
                mode: match mode {
                    FailureMode::Open => Mode::open,
                    FailureMode::Closed => Mode::closed,
                },
            })
            .inc();
    }

    pub fn fallbacks_of(&self, policy: &str, mode: Mode) -> u64 {
        self.fallbacks
            .get_or_create(&FallbackLabels {
                policy: policy.to_string(),
                mode,
            })
            .get()
    }

    pub(crate) fn log_dropped(&self, policy: &str, bytes: u64) {
        self.log_dropped_bytes
            .get_or_create(&PolicyLabels {
                policy: policy.to_string(),
            })
            .inc_by(bytes);
    }

    pub fn log_dropped_of(&self, policy: &str) -> u64 {
        self.log_dropped_bytes
            .get_or_create(&PolicyLabels {
                policy: policy.to_string(),
            })
            .get()
    }
}

impl From<FailureKind> for Reason {
    fn from(kind: FailureKind) -> Self {
        match kind {
            FailureKind::Trap => Reason::trap,
            FailureKind::Timeout => Reason::timeout,
            FailureKind::Memory => Reason::memory,
            FailureKind::InvalidAnswer => Reason::invalid_answer,
            FailureKind::Refused => Reason::refused,
            FailureKind::Instantiate => Reason::instantiate,
        }
    }
}

impl From<CallKind> for Call {
    fn from(kind: CallKind) -> Self {
        match kind {
            CallKind::Configure => Call::configure,
            CallKind::Update => Call::update,
            CallKind::Remove => Call::remove,
            CallKind::Select => Call::select,
            CallKind::Observe => Call::observe,
            CallKind::SelectRequest => Call::select_request,
            CallKind::ObserveRequest => Call::observe_request,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_metrics_encode_in_prometheus_text_format() {
        let metrics = PolicyMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.failure("hostile", CallKind::Select, FailureKind::Timeout);
        metrics.fallback("hostile", FailureMode::Closed);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"weir_policy_failures_total{policy="hostile",call="select",reason="timeout"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"weir_policy_fallbacks_total{policy="hostile",mode="closed"} 1"#),
            "{text}"
        );
    }
}
