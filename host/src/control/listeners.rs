//! Listeners and the capture interface: what is wanted opened, what is not closed, the
//! Service addresses on weir0 before listeners need them and after they are gone.

use super::*;
use crate::capture::Capture;

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

    /// Whether Service addresses go on a capture interface.
    pub(super) fn enabled(&self) -> bool {
        self.capture.is_some()
    }

    /// Whether a failure is due to be tried again.
    pub(super) fn retry_due(&self) -> bool {
        self.retry.is_some_and(|at| Instant::now() >= at)
    }
}

impl Interface {
    /// Opens and closes listeners for what `published` wants. With a capture interface,
    /// the Service addresses are put on it first and the stale ones taken off after.
    pub(super) fn reconcile(
        &mut self,
        listeners: &mut Listeners,
        published: &Published,
        node_addresses: &[IpAddr],
        readiness: &Readiness,
    ) {
        let wanted = published.addresses.wanted();
        let Some(capture) = self.capture.as_mut() else {
            for error in listeners.reconcile(wanted) {
                tracing::warn!("{error}; retrying");
            }
            return;
        };
        let ips: BTreeSet<IpAddr> = (published.service_ips.keys())
            .filter(|ip| !node_addresses.contains(ip) && !ip.is_unspecified())
            .copied()
            .collect();
        let added = capture.reconcile(&ips, false);
        for error in listeners.reconcile(wanted) {
            tracing::warn!("{error}; retrying");
        }
        // Stale addresses are taken off only once everything wanted is there.
        let result = added.and_then(|()| capture.reconcile(&ips, true));
        self.report(result, readiness);
    }

    /// One report per reconcile: logged when the problem changes, and `/readyz` lists it
    /// while it lasts (the node cannot take its Services' traffic).
    fn report(&mut self, result: Result<(), crate::capture::CaptureError>, readiness: &Readiness) {
        match result {
            Ok(()) => {
                self.retry = None;
                if self.error.take().is_some() {
                    tracing::info!("the capture interface holds every Service address again");
                    readiness.set_capture(None);
                }
            }
            Err(error) => {
                if self.error.as_ref() != Some(&error) {
                    tracing::error!(
                        "cannot put Service addresses on the capture interface: {error}; retrying"
                    );
                    readiness.set_capture(Some(format!("capture interface: {error}")));
                }
                self.error = Some(error);
                self.retry = Some(Instant::now() + std::time::Duration::from_secs(2));
            }
        }
    }
}
