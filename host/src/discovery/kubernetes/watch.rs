//! The kube-rs client and one watch per kind, feeding the store and waking the
//! control plane.

use super::*;

pub(super) async fn client_config(settings: &Settings) -> anyhow::Result<kube::Config> {
    match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                anyhow::anyhow!("source.kubeconfig: cannot use {}: {e}", path.display())
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| {
                    anyhow::anyhow!("source.kubeconfig: cannot use {}: {e}", path.display())
                })
        }
        None => kube::Config::infer().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot find the Kubernetes API server: {e}; run in a Pod with a service account, set KUBECONFIG, or set source.kubeconfig"
            )
        }),
    }
}

/// Follows one kind: every event goes through `apply` on the store, then wakes the
/// control plane. After an error the watch is retried on weir's own [`Backoff`] (capped
/// at [`Backoff::CAP`], so routing catches up within seconds of the API server's return),
/// at once after `410 Expired` (a relist, not one more step of backoff); an outage is
/// logged once for all kinds, and so is the recovery.
pub(super) async fn follow<K, F>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    store: Arc<Mutex<Store>>,
    wake: Arc<dyn Fn() + Send + Sync>,
    mut apply: F,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
    F: FnMut(&mut Store, watcher::Event<K>) + Send,
{
    let start =
        || watcher(api.clone(), config.clone()).modify(|object: &mut K| slim(object.meta_mut()));
    let mut stream = Box::pin(start());
    let mut backoff = Backoff::default();
    loop {
        let Some(item) = stream.next().await else {
            stream = Box::pin(start());
            continue;
        };
        match item {
            Ok(event) => {
                backoff.reset();
                let wakes = !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_));
                {
                    let mut store = lock(&store);
                    store.table_state(kind).1.take();
                    if let Some(line) = store.outage.recovered(kind) {
                        tracing::info!("{line}");
                    }
                    apply(&mut store, event);
                    store.changed |= wakes;
                }
                if wakes {
                    wake();
                }
            }
            Err(error) => {
                let expired = is_expired(&error);
                {
                    let mut store = lock(&store);
                    *store.table_state(kind).1 = Some(error.to_string());
                    if let Some(line) = store.outage.failed(kind, &error.to_string()) {
                        tracing::warn!("{line}");
                    }
                }
                if expired && let watcher::Error::WatchStartFailed(_) = error {
                    // Refused before the stream began: the watcher would retry the same
                    // resourceVersion, so start over with a list.
                    stream = Box::pin(start());
                }
                tokio::time::sleep(backoff.next(expired)).await;
            }
        }
    }
}

/// Whether the API server said the watch's resourceVersion is too old (`410 Gone`, as
/// after a restart that compacted the history): the cure is a relist, now.
fn is_expired(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// How long to wait before the next try of a failed watch: from 200 ms, doubling up to
/// [`Backoff::CAP`], each wait jittered down by up to half so that every node of a
/// cluster does not call the returning API server in the same instant. An expiry is
/// retried at once, unless the try before was one too.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    failures: u32,
    expired: bool,
}

impl Backoff {
    pub(super) const FIRST: std::time::Duration = std::time::Duration::from_millis(200);
    pub(super) const CAP: std::time::Duration = std::time::Duration::from_secs(2);

    pub(super) fn reset(&mut self) {
        self.failures = 0;
        self.expired = false;
    }

    pub(super) fn next(&mut self, expired: bool) -> std::time::Duration {
        if expired && !self.expired {
            self.expired = true;
            return std::time::Duration::ZERO;
        }
        self.expired = expired;
        let full = Self::FIRST
            .saturating_mul(1 << self.failures.min(16))
            .min(Self::CAP);
        self.failures += 1;
        // The standard library's randomly keyed hasher: jitter, not cryptography.
        use std::hash::BuildHasher;
        let fraction =
            (std::collections::hash_map::RandomState::new().hash_one(self.failures) % 1000) as u32;
        full / 2 + full / 2 * fraction / 1000
    }
}

/// Whether the API server is away, seen across every kind's watch: one line when the
/// first watch fails, one when the last recovers.
#[derive(Debug, Default)]
pub(super) struct Outage {
    since: Option<std::time::Instant>,
    failing: BTreeSet<String>,
}

impl Outage {
    /// A watch failed; the line to log, if this starts an outage.
    pub(super) fn failed(&mut self, kind: Kind, error: &str) -> Option<String> {
        self.failing.insert(format!("{kind:?}"));
        if self.since.is_some() {
            return None;
        }
        self.since = Some(std::time::Instant::now());
        Some(format!(
            "lost the API server ({kind:?} watch: {error}); current routing keeps serving, retrying every {:?} at most",
            Backoff::CAP
        ))
    }

    /// A watch delivered; the line to log, if that ends the outage.
    pub(super) fn recovered(&mut self, kind: Kind) -> Option<String> {
        self.failing.remove(&format!("{kind:?}"));
        if !self.failing.is_empty() {
            return None;
        }
        let since = self.since.take()?;
        Some(format!(
            "the API server is back after {:.1} s; every watch resumed",
            since.elapsed().as_secs_f64()
        ))
    }
}
