//! Wiring: starts the admin server, the policy engine, the control plane and the data
//! plane from a [`Config`], and shuts them down gracefully. Used by `weir run` and, in
//! process, by the tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState, HealthChecks, Readiness};
use crate::config::{Config, SourceKind};
use crate::control::{ControlPlane, Signal};
use crate::discovery::Source;
use crate::discovery::kubernetes::{self, KubeSource};
use crate::discovery::watch::FileSource;
use crate::health::ProxyHealth;
use crate::metrics::Metrics;
use crate::policy::{PolicyEngine, Registry};
use crate::proxy::{
    Bound, Listen, ListenerKind, Listeners, Settings, Shared, TcpSettings, UdpSettings, tcp, udp,
};

/// A running weir.
pub struct App {
    admin_address: SocketAddr,
    metrics_address: Option<SocketAddr>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    health_checks: Arc<HealthChecks>,
    readiness: Arc<Readiness>,
    stop_control: Option<Sender<Signal>>,
    control: Option<std::thread::JoinHandle<()>>,
    stop_admin: CancellationToken,
    /// Parent of every listener's token: stops accepting at once, whatever the control
    /// thread is doing.
    stop_listeners: CancellationToken,
    grace: Duration,
    /// Where UDP flows are written at shutdown, for the next weir.
    state_dir: Option<std::path::PathBuf>,
    /// The policy routing of `proxy.transparent`, removed when weir stops.
    _transparent: Option<crate::transparent::Transparent>,
}

/// How a shutdown went.
#[derive(Debug)]
pub struct Drained {
    /// Connections still open when the grace period ran out, closed by force.
    pub forced: bool,
}

impl App {
    /// Starts weir on the current tokio runtime. Returns once the admin port listens and
    /// the policy engine is up; the first sync of objects and policies follows (`/readyz`
    /// says when it is done).
    pub fn start(config: Config) -> anyhow::Result<App> {
        let runtime = tokio::runtime::Handle::current();
        let metrics = Arc::new(Metrics::new());
        metrics.proxy.set_linger(config.admin.metrics_linger.0);
        let health = Arc::new(ProxyHealth::new(config.admin.health_timeout.0));
        let mut pending = vec![match config.source.kind {
            SourceKind::Files => format!(
                "objects: first read of {}",
                config
                    .source
                    .paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            SourceKind::Kubernetes => "objects: connecting to the Kubernetes API".to_string(),
        }];
        if let Some(dir) = &config.policies.dir {
            pending.push(format!("policies: first load of {}", dir.display()));
        }
        let readiness = Arc::new(Readiness::new(pending));
        let health_checks: Arc<HealthChecks> = Arc::default();
        let state = Arc::new(AdminState {
            health: health.clone(),
            readiness: readiness.clone(),
            metrics: metrics.clone(),
            health_checks: health_checks.clone(),
        });

        let admin_listener = admin::bind(config.admin.address).with_context(|| {
            format!(
                "cannot listen on admin.address {}: set another address in [admin]",
                config.admin.address
            )
        })?;
        let admin_address = admin_listener.local_addr()?;
        let metrics_listener = match config.admin.metrics_address {
            None => None,
            Some(address) => Some(admin::bind(address).with_context(|| {
                format!(
                    "cannot listen on admin.metrics_address {address}: set another address in [admin]"
                )
            })?),
        };
        let metrics_address = match &metrics_listener {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        };
        let stop_admin = CancellationToken::new();
        {
            let _guard = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(admin_listener)?;
            let admin_state = state.clone();
            tokio::spawn(admin::serve(listener, stop_admin.clone(), move |request| {
                admin::admin(&admin_state, request, metrics_address)
            }));
            if let Some(listener) = metrics_listener {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let state = state.clone();
                tokio::spawn(admin::serve(listener, stop_admin.clone(), move |request| {
                    admin::admin(&state, request, None)
                }));
            }
        }

        let workers = config.proxy.worker_count();
        let (limits, cache_dir) = (config.limits.limits(), config.cache_dir());
        let engine = match &config.compiler {
            Some(exe) => PolicyEngine::new_isolated(
                limits,
                cache_dir.as_deref(),
                metrics.policy.clone(),
                exe.clone(),
            ),
            None => PolicyEngine::new(limits, cache_dir.as_deref(), metrics.policy.clone()),
        }
        .context("cannot start the policy engine")?;
        let registry = Registry::new(engine);

        let shared = Arc::new(
            Shared::new(Settings {
                workers,
                connect_timeout: config.proxy.connect_timeout.0,
                connect_attempts: config.proxy.connect_attempts,
                drop_timeout: config.proxy.drop_timeout.0,
                udp: UdpSettings {
                    timeout: config.proxy.udp_timeout.0,
                    stream_timeout: config.proxy.udp_stream_timeout.0,
                    max_flows: config.proxy.max_udp_flows,
                    max_flows_per_service: config.proxy.max_udp_flows_per_service,
                },
                tcp: TcpSettings {
                    max_connections: config.proxy.connection_cap(),
                    max_per_service: config.proxy.connection_cap_per_service(),
                    idle_timeout: config.proxy.idle_timeout.map(|t| t.0),
                    half_close_timeout: config.proxy.half_close_timeout.0,
                },
            })
            .context("cannot start the worker threads")?,
        );
        let transparent = if config.proxy.transparent {
            match crate::transparent::Transparent::install() {
                Ok(installed) => {
                    shared
                        .transparent
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        ipv6 = installed.ipv6(),
                        "proxy.transparent: local endpoints see client addresses"
                    );
                    Some(installed)
                }
                Err(error) => {
                    tracing::warn!(
                        "proxy.transparent: {error}; endpoints see weir's address instead"
                    );
                    None
                }
            }
        } else {
            None
        };
        let spawn = {
            let shared = shared.clone();
            let state = state.clone();
            Box::new(
                move |bound: Bound, listen: Listen, kind: ListenerKind, stop: CancellationToken| {
                    match (bound, kind) {
                        (Bound::Tcp(listener), ListenerKind::Service) => {
                            tokio::spawn(tcp::serve(
                                listener,
                                listen.address,
                                shared.clone(),
                                stop,
                            ));
                        }
                        (Bound::Udp(socket), ListenerKind::Service) => {
                            (shared.udp_listeners).spawn(udp::serve(
                                socket,
                                listen.address,
                                shared.clone(),
                                stop,
                            ));
                        }
                        (Bound::Tcp(listener), ListenerKind::HealthCheck { namespace, name }) => {
                            let state = state.clone();
                            tokio::spawn(admin::serve(listener, stop, move |_| {
                                admin::health_check(&state, &namespace, &name)
                            }));
                        }
                        (Bound::Udp(_), ListenerKind::HealthCheck { namespace, name }) => {
                            tracing::error!(
                                "the health check of {namespace}/{name} was given a UDP socket; it listens on TCP only"
                            );
                        }
                    }
                },
            )
        };
        if let Some(dir) = &config.proxy.state_dir {
            let restored = (shared.udp_saved).restore(dir, config.proxy.udp_stream_timeout.0);
            if restored > 0 {
                tracing::info!(
                    restored,
                    "UDP flows of the previous weir resume on their endpoints"
                );
            }
        }
        let state_dir = config.proxy.state_dir.clone();
        let stop_listeners = CancellationToken::new();
        let listeners = Listeners::new(
            runtime,
            spawn,
            metrics.proxy.clone(),
            stop_listeners.clone(),
        );
        let grace = config.proxy.shutdown_grace_period.0;
        let (signal, signals) = std::sync::mpsc::channel();
        let source = match config.source.kind {
            SourceKind::Files => Source::Files(FileSource::new(config.source.paths.clone())),
            SourceKind::Kubernetes => {
                let (wake, health) = (signal.clone(), health.clone());
                // As kube-proxy's event handlers do: a change is queued when it is seen,
                // so `/healthz` fails if the control plane stops applying them.
                let wake = Arc::new(move || {
                    health.queued();
                    let _ = wake.send(Signal::Wake);
                });
                Source::Kubernetes(Box::new(KubeSource::start(
                    kubernetes::Settings::from_config(&config),
                    wake,
                )?))
            }
        };
        let control = ControlPlane::new(
            config,
            source,
            registry,
            listeners,
            shared.clone(),
            health_checks.clone(),
            health,
            readiness.clone(),
            metrics.clone(),
        );
        let control = std::thread::Builder::new()
            .name("weir-control".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| control.run(signals));
                if std::panic::catch_unwind(run).is_err() {
                    // A proxy that stops applying changes must not stay up looking alive:
                    // the kubelet restarts a process that exits.
                    tracing::error!(
                        "the control plane stopped on a panic (its message is above): weir exits to be restarted"
                    );
                    std::process::exit(70);
                }
            })?;
        Ok(App {
            admin_address,
            metrics_address,
            shared,
            metrics,
            health_checks,
            readiness,
            stop_control: Some(signal),
            control: Some(control),
            stop_admin,
            stop_listeners,
            grace,
            state_dir,
            _transparent: transparent,
        })
    }

    /// Where `/healthz`, `/livez`, `/readyz` and `/metrics` are served.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    /// Where `/metrics` is served when `admin.metrics_address` moves it.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// What `/readyz` is waiting for (empty: ready).
    pub fn pending(&self) -> Vec<String> {
        self.readiness.pending()
    }

    /// The routing table now: every listening address with the scope it serves and its
    /// service port (`namespace/name:port`), sorted.
    pub fn routes(&self) -> Vec<(SocketAddr, weir_sdk::Scope, String)> {
        let mut routes: Vec<_> = self
            .shared
            .routes
            .load()
            .by_listen
            .iter()
            .map(|(listen, route)| {
                (
                    listen.address,
                    route.scope,
                    route.metrics.service().to_string(),
                )
            })
            .collect();
        routes.sort_by_key(|(address, _, _)| *address);
        routes
    }

    /// The local endpoint count each healthCheckNodePort reports now.
    pub fn health_counts(&self) -> std::collections::BTreeMap<(String, String), usize> {
        self.health_checks
            .load()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.connections.len()
    }

    /// Stops accepting, lets established connections finish for up to the grace period,
    /// then closes those left.
    pub async fn shutdown(mut self) -> Drained {
        self.readiness
            .set_shutting_down("shutting down: not accepting connections".to_string());
        self.shared.udp_saved.start_saving();
        self.stop_listeners.cancel();
        self.stop_control_plane().await;
        self.shared.udp_listeners.close();
        self.shared.udp_listeners.wait().await;
        if let Some(dir) = &self.state_dir {
            match self.shared.udp_saved.write(dir) {
                Ok((path, flows)) => {
                    tracing::info!(flows, path = %path.display(), "UDP flows saved for the next weir");
                }
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), "cannot save the UDP flows: {error}")
                }
            }
        }
        let connections = &self.shared.connections;
        connections.close();
        let open = connections.len();
        if open > 0 {
            tracing::info!(
                open,
                grace = ?self.grace,
                "listeners closed; waiting for established connections to finish"
            );
        }
        let forced = tokio::time::timeout(self.grace, connections.wait())
            .await
            .is_err();
        if forced {
            tracing::warn!(
                open = connections.len(),
                "shutdown grace period over: closing the connections left"
            );
            self.shared.close.cancel();
            connections.wait().await;
        }
        self.stop_admin.cancel();
        Drained { forced }
    }

    /// Stops the control thread, which closes every listener on its way out.
    async fn stop_control_plane(&mut self) {
        if let Some(stop) = self.stop_control.take() {
            let _ = stop.send(Signal::Stop);
        }
        if let Some(control) = self.control.take() {
            let _ = tokio::task::spawn_blocking(move || control.join()).await;
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        // Without a graceful shutdown: stop everything now.
        if let Some(stop) = self.stop_control.take() {
            let _ = stop.send(Signal::Stop);
        }
        self.shared.close.cancel();
        self.stop_admin.cancel();
    }
}

/// SIGTERM and SIGINT, listened for from the start, so that a second signal arriving
/// while the first is being handled is not lost.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next signal and names it.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs `app` until SIGTERM or SIGINT, then drains it; a second signal exits at once.
pub async fn serve_until_signal(app: App) {
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!("cannot listen for signals: {e}");
            std::future::pending::<()>().await;
            return;
        }
    };
    let first = signals.next().await;
    tracing::info!("{first}: draining (a second signal exits at once)");
    tokio::spawn(async move {
        let second = signals.next().await;
        eprintln!("{second} again: exiting now");
        std::process::exit(130);
    });
    let drained = app.shutdown().await;
    if drained.forced {
        tracing::warn!("stopped; some connections were closed at the end of the grace period");
    } else {
        tracing::info!("stopped; every connection finished");
    }
}

/// What weir takes from its environment, read once here (the only place besides `main`
/// that reads it).
pub fn environment() -> crate::config::Environment {
    use std::path::PathBuf;
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let cache_dir = match std::env::var_os("WEIR_CACHE_DIR") {
        Some(dir) if dir.is_empty() => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
            .map(|base| base.join("weir/components")),
    };
    crate::config::Environment {
        node_name: var("NODE_NAME"),
        pod_namespace: var("POD_NAMESPACE"),
        pod_name: var("POD_NAME"),
        cache_dir,
    }
}
