//! Listeners and the capture interface: what is wanted opened, what is not closed, the
//! Service addresses on weir0 before listeners need them and after they are gone.

use super::*;

/// The capture interface, and the problem it last had.
pub(super) struct Interface {
    capture: Option<Capture>,
    error: Option<crate::capture::CaptureError>,
    /// When to try again after a failure.
    retry: Option<Instant>,
}

impl Interface {
    pub(super) fn new(capture: Option<Capture>) -> Self {
        Interface {
            capture,
            error: None,
            retry: None,
        }
    }

    /// Whether a failure is due to be tried again.
    pub(super) fn retry_due(&self) -> bool {
        self.retry.is_some_and(|at| Instant::now() >= at)
    }
}

impl ControlPlane {
    /// Opens and closes listeners for what is wanted. With a capture interface, the
    /// Service addresses are put on it first and the stale ones taken off after.
    pub(super) fn reconcile_listeners(&mut self) {
        let virtual_ips: Option<BTreeSet<IpAddr>> = self.capture.capture.is_some().then(|| {
            self.service_ips
                .keys()
                .filter(|ip| !self.node_addresses.contains(ip) && !ip.is_unspecified())
                .copied()
                .collect()
        });
        let Some(ips) = virtual_ips else {
            for error in self.listeners.reconcile(self.addresses.wanted()) {
                tracing::warn!("{error}; retrying");
            }
            return;
        };
        let capture = self.capture.capture.as_mut().expect("checked above");
        let added = capture.reconcile(&ips, false);
        for error in self.listeners.reconcile(self.addresses.wanted()) {
            tracing::warn!("{error}; retrying");
        }
        // Stale addresses are taken off only once everything wanted is there.
        let result = added.and_then(|()| capture.reconcile(&ips, true));
        self.report_capture(result);
    }

    /// One report per reconcile: logged when the problem changes, and `/readyz` lists it
    /// while it lasts (the node cannot take its Services' traffic).
    pub(super) fn report_capture(&mut self, result: Result<(), crate::capture::CaptureError>) {
        match result {
            Ok(()) => {
                self.capture.retry = None;
                if self.capture.error.take().is_some() {
                    tracing::info!("the capture interface holds every Service address again");
                    self.readiness.set_capture(None);
                }
            }
            Err(error) => {
                if self.capture.error.as_ref() != Some(&error) {
                    tracing::error!(
                        "cannot put Service addresses on the capture interface: {error}; retrying"
                    );
                    self.readiness
                        .set_capture(Some(format!("capture interface: {error}")));
                }
                self.capture.error = Some(error);
                self.capture.retry = Some(Instant::now() + std::time::Duration::from_secs(2));
            }
        }
    }
}
