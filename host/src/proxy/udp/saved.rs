//! UDP flows across a restart. kube-proxy's flows are conntrack entries, which outlive
//! kube-proxy; weir's live in its memory. On shutdown every listener hands its flows here
//! and weir writes them to `proxy.state_dir`; the next weir reads them at start, and a
//! client's first datagram to the same Service address goes back to its endpoint, if the
//! policy still lets that endpoint serve it, without asking the policy again. Entries
//! not claimed within the stream timeout are forgotten.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::locks::lock;
use crate::proxy::{Listen, Transport};

/// The file in `proxy.state_dir`.
pub const FILE: &str = "udp-flows.json";

/// One flow as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedFlow {
    /// The Service address it was sent to.
    pub service: SocketAddr,
    pub client: SocketAddr,
    pub endpoint: SocketAddr,
}

/// Flows handed over by the listeners as they stop, and flows read at start until
/// claimed.
#[derive(Default)]
pub struct Saved {
    /// Set when weir shuts down: listeners that stop from then on hand over their flows.
    saving: AtomicBool,
    stopped: Mutex<Vec<SavedFlow>>,
    restored: Mutex<HashMap<(SocketAddr, SocketAddr), SocketAddr>>,
    restored_until: Mutex<Option<Instant>>,
}

impl Saved {
    /// weir is shutting down: what listeners stop with from now on is kept.
    pub fn start_saving(&self) {
        self.saving.store(true, Ordering::Relaxed);
    }

    /// A listener that stops hands over its flows; kept only when weir is shutting down
    /// (a listener closed because its Service went away has nothing to pass on).
    pub fn keep(&self, flows: impl IntoIterator<Item = SavedFlow>) {
        if self.saving.load(Ordering::Relaxed) {
            lock(&self.stopped).extend(flows);
        }
    }

    /// The endpoint a client's flow to `listen` had before the restart, once.
    pub fn claim(&self, listen: &Listen, client: SocketAddr) -> Option<SocketAddr> {
        if listen.transport != Transport::Udp {
            return None;
        }
        let mut restored = lock(&self.restored);
        if restored.is_empty() {
            return None;
        }
        if lock(&self.restored_until).is_some_and(|until| Instant::now() >= until) {
            restored.clear();
            return None;
        }
        restored.remove(&(listen.address, client))
    }

    /// Reads the flows a previous weir wrote in `dir`, to claim for `keep_for`; the file
    /// is removed, so that a crash later does not restore stale flows. Returns how many.
    pub fn restore(&self, dir: &Path, keep_for: Duration) -> usize {
        let path = dir.join(FILE);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return 0;
        };
        let _ = std::fs::remove_file(&path);
        let flows: Vec<SavedFlow> = match serde_json::from_str(&text) {
            Ok(flows) => flows,
            Err(error) => {
                tracing::warn!(path = %path.display(), "ignoring the saved UDP flows: {error}");
                return 0;
            }
        };
        let mut restored = lock(&self.restored);
        for flow in flows {
            restored.insert((flow.service, flow.client), flow.endpoint);
        }
        *lock(&self.restored_until) = Some(Instant::now() + keep_for);
        restored.len()
    }

    /// Writes the flows the listeners handed over into `dir`. Returns the file and how
    /// many were written.
    pub fn write(&self, dir: &Path) -> std::io::Result<(PathBuf, usize)> {
        let flows = std::mem::take(&mut *lock(&self.stopped));
        let path = dir.join(FILE);
        let temporary = dir.join(format!("{FILE}.new"));
        std::fs::create_dir_all(dir)?;
        std::fs::write(&temporary, serde_json::to_vec(&flows)?)?;
        std::fs::rename(&temporary, &path)?;
        Ok((path, flows.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn flows_written_at_stop_are_claimed_once_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let before = Saved::default();
        before.keep([SavedFlow {
            service: address("198.18.0.10:53"),
            client: address("198.18.9.9:1"),
            endpoint: address("198.18.1.2:8053"),
        }]);
        before.start_saving();
        let flow = SavedFlow {
            service: address("198.18.0.10:53"),
            client: address("198.18.9.9:40000"),
            endpoint: address("198.18.1.2:8053"),
        };
        before.keep([flow.clone()]);
        assert_eq!(before.write(dir.path()).unwrap().1, 1);

        let after = Saved::default();
        assert_eq!(after.restore(dir.path(), Duration::from_secs(60)), 1);
        assert!(!dir.path().join(FILE).exists(), "read once");
        let udp = Listen {
            address: flow.service,
            transport: Transport::Udp,
        };
        let tcp = Listen::tcp(flow.service);
        assert_eq!(after.claim(&tcp, flow.client), None, "UDP flows only");
        assert_eq!(after.claim(&udp, address("198.18.9.9:40001")), None);
        assert_eq!(after.claim(&udp, flow.client), Some(flow.endpoint));
        assert_eq!(after.claim(&udp, flow.client), None, "claimed once");
    }

    #[test]
    fn unclaimed_flows_expire_and_a_bad_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let saved = Saved::default();
        saved.start_saving();
        saved.keep([SavedFlow {
            service: address("198.18.0.10:53"),
            client: address("198.18.9.9:40000"),
            endpoint: address("198.18.1.2:8053"),
        }]);
        saved.write(dir.path()).unwrap();
        let after = Saved::default();
        after.restore(dir.path(), Duration::ZERO);
        let udp = Listen {
            address: address("198.18.0.10:53"),
            transport: Transport::Udp,
        };
        assert_eq!(after.claim(&udp, address("198.18.9.9:40000")), None);

        std::fs::write(dir.path().join(FILE), "not json").unwrap();
        assert_eq!(
            Saved::default().restore(dir.path(), Duration::from_secs(1)),
            0
        );
    }
}
