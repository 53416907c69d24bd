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
/// control plane. Errors are logged once per outage; the watcher's backoff retries.
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
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|object: &mut K| slim(object.meta_mut()));
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                let wakes = !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_));
                {
                    let mut store = lock(&store);
                    if let Some(error) = store.table_state(kind).1.take() {
                        tracing::info!(?kind, "watch recovered after: {error}");
                    }
                    apply(&mut store, event);
                    store.changed |= wakes;
                }
                if wakes {
                    wake();
                }
            }
            Err(error) => {
                let mut store = lock(&store);
                let (_, slot) = store.table_state(kind);
                if slot.is_none() {
                    tracing::warn!(
                        ?kind,
                        "watch failed: {error}; relisting with backoff, current routing keeps serving"
                    );
                }
                *slot = Some(error.to_string());
            }
        }
    }
}
