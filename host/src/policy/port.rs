//! One service port of a policy, as the runtime (`runtime.rs`) keeps it: what it was
//! last told, what serves it now, its instance, and its failure state.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube_default::KubeDefault;
use weir_sdk::ids::IdMap;
use weir_sdk::{Driver, Eligibility, Scope};

use super::instance::{CallError, PolicyInstance};
use super::service::{ServiceInput, UpdateAnswer};

/// A port's backoff after data-plane failures: one failure (a descheduled call can miss
/// a 1 ms deadline) costs a moment on the failure mode; repeated failures back off to
/// [`MAX_QUARANTINE`], so a policy that always fails costs a rebuild now and then, not one
/// per connection.
#[derive(Clone, Copy, Debug)]
pub(super) struct Quarantine {
    pub(super) until: Instant,
    pub(super) strikes: u32,
}

/// The longest a service waits before its policy is tried again.
pub(super) const MAX_QUARANTINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
pub(super) struct Target {
    pub(super) address: SocketAddr,
    internal: bool,
    external: bool,
}

impl Target {
    pub(super) fn allows(&self, scope: Scope) -> bool {
        match scope {
            Scope::Internal => self.internal,
            Scope::External => self.external,
        }
    }
}

/// One service port of a policy.
pub(super) struct Port {
    pub(super) state: Mutex<PortState>,
}

pub(super) struct PortState {
    /// What the port was last told: replayed into a rebuilt instance.
    pub(super) input: Arc<ServiceInput>,
    /// kube-default in process, told every update: the policy itself on the native
    /// backend, the `open` failure mode's answer on a Wasm one.
    pub(super) native: Driver<KubeDefault>,
    /// What serves the port now.
    pub(super) eligibility: Eligibility,
    /// Every endpoint by id, with the scopes it is eligible for: checks and resolves a
    /// Wasm `select` answer in one lookup, whatever the number of endpoints. Empty on the
    /// native backend, whose answers need no check.
    pub(super) targets: IdMap<Target>,
    /// Set when the port's last update failed: its traffic follows the failure mode until
    /// its next successful update.
    pub(super) failure: Option<CallError>,
    /// Set when a `select` or `observe` failed: its traffic follows the failure mode until
    /// then, and the policy is tried again after.
    pub(super) quarantine: Option<Quarantine>,
    /// The port's instance (Wasm backend). `None` after a failure, until the control
    /// plane rebuilds it.
    pub(super) instance: Option<PolicyInstance>,
}

impl PortState {
    pub(super) fn serve(&mut self, eligibility: Eligibility, failure: Option<CallError>) {
        let mut targets = IdMap::default();
        for e in &self.input.endpoints {
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
        self.targets = targets;
        self.eligibility = eligibility;
        self.failure = failure;
    }

    pub(super) fn answer(&self) -> UpdateAnswer {
        UpdateAnswer {
            eligibility: self.eligibility.clone(),
            failure: self.failure.clone(),
        }
    }
}
