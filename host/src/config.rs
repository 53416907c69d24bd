//! `weir.toml`: weir's own settings. Unknown keys and bad values are errors that name the
//! key, its line and what would be accepted; `weir run` exits 64 (EX_USAGE) on them.
//!
//! Relative paths are resolved against the directory of the config file, as kubeconfig
//! paths are, so a config works from any working directory.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::net::Cidr;
use crate::policy::{FailureMode, Limits};
pub use crate::units::Humantime;
use crate::units::line_of;

/// Exit status for a bad config (sysexits.h EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub source: SourceConfig,
    #[serde(default)]
    pub policies: PoliciesConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The `weir` executable that compiles policy modules in a child process under the
    /// compile budget (`weir run` sets it to itself); `None` compiles in this process.
    #[serde(skip)]
    pub compiler: Option<PathBuf>,
    /// What the process's environment supplies where the file is silent.
    #[serde(skip)]
    pub environment: Environment,
}

/// What weir takes from its environment (read once, by `app::environment`): defaults
/// for what weir.toml leaves unset. Empty in tests unless they set it.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    /// `NODE_NAME`: `node.name`'s default (the DaemonSet sets it from `spec.nodeName`).
    pub node_name: Option<String>,
    /// `POD_NAMESPACE`: weir's namespace in Kubernetes mode, unless `source.namespace`.
    pub pod_namespace: Option<String>,
    /// `POD_NAME`: the instance named in the Events weir posts.
    pub pod_name: Option<String>,
    /// `WEIR_CACHE_DIR`, else the user's cache directory: `policies.cache_dir`'s default
    /// (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The Node weir runs on: locality, topology hints and externalTrafficPolicy Local.
    /// Default: the `NODE_NAME` environment variable (the DaemonSet sets it from
    /// `spec.nodeName`).
    #[serde(default)]
    pub name: String,
    /// Where NodePorts and healthCheckNodePorts listen. Default: with `kind = "files"`,
    /// 127.0.0.1; with `kind = "kubernetes"`, the Node's InternalIP and ExternalIP
    /// addresses from its status.
    #[serde(default)]
    pub addresses: Option<Vec<IpAddr>>,
    /// Sources that count as this node or its pods. External traffic from them gets the
    /// Service's internal (Cluster) endpoints, as kube-proxy does for
    /// externalTrafficPolicy Local. Default: `addresses`, each as a single host.
    #[serde(default)]
    pub local_cidrs: Option<Vec<Cidr>>,
    /// The interface that holds ClusterIPs, externalIPs and LoadBalancer IPs so they can
    /// be listened on (a dummy interface, created if missing; addresses weir did not put
    /// there are removed). Default: `weir0` with `kind = "kubernetes"`, none with
    /// `kind = "files"`; `""` for none (the addresses must then be local already).
    #[serde(default)]
    pub capture_interface: Option<String>,
    /// When set, only externalIPs and LoadBalancer IPs inside these ranges go onto the
    /// capture interface (and are served); others are refused with a warning, a metric
    /// and an Event on their Service.
    #[serde(default)]
    pub capture_allowed_cidrs: Option<Vec<Cidr>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Files,
    Kubernetes,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// Files or directories of Services, EndpointSlices and Nodes (`kind = "files"`).
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// How often the files are checked for changes.
    #[serde(default = "default_poll")]
    pub poll_interval: Humantime,
    /// `kind = "kubernetes"`: the kubeconfig to use. Default: `KUBECONFIG`, then
    /// `~/.kube/config`, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// `kind = "kubernetes"`: weir's own namespace, where its policies ConfigMap lives.
    /// Default: `POD_NAMESPACE`, then the service account's namespace.
    pub namespace: Option<String>,
    /// `kind = "kubernetes"`: unset, weir proxies every Service without the
    /// `service.kubernetes.io/service-proxy-name` label (it replaces kube-proxy); set,
    /// only the Services with that label and this value (beside kube-proxy).
    pub service_proxy_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesConfig {
    /// Directory of `NAME.wasm` modules, watched; the file stem is the policy's name.
    pub dir: Option<PathBuf>,
    /// How often the directory is checked for changes.
    #[serde(default = "default_poll")]
    pub poll_interval: Humantime,
    /// What a Service gets when its policy fails and it has no `weir.dev/failure-mode`.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// The policy of every Service without a `weir.dev/policy` annotation, as Cilium's
    /// `loadBalancer.algorithm` (default: the built-in kube-default). A Service opts out
    /// with `weir.dev/policy: kube-default`. In Kubernetes mode `policies.toml` may set it
    /// too, and wins.
    pub default: Option<String>,
    /// The configuration those Services give the default policy, as their
    /// `weir.dev/policy-config` annotation would (which, when present, wins).
    pub default_config: Option<String>,
    /// Where compiled modules are cached (default: `$XDG_CACHE_HOME/weir` or
    /// `~/.cache/weir`); `""` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// `kind = "kubernetes"`: the ConfigMap in weir's namespace holding the modules
    /// (`binaryData` `NAME.wasm`) and their settings (`data` `policies.toml`).
    /// Default: `weir-policies`.
    pub configmap: Option<String>,
    /// `kind = "kubernetes"`: instead of `configmap`, every ConfigMap in weir's namespace
    /// matching this label selector, e.g. "weir.dev/policies=true".
    pub selector: Option<String>,
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        PoliciesConfig {
            dir: None,
            poll_interval: default_poll(),
            failure_mode: FailureMode::Open,
            default: None,
            default_config: None,
            cache_dir: None,
            configmap: None,
            selector: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `/healthz`, `/livez`, `/readyz` and `/metrics` (kube-proxy's healthz port).
    #[serde(default = "default_admin")]
    pub address: SocketAddr,
    /// Where `/metrics` is served instead, when set (kube-proxy's metrics port, e.g.
    /// `127.0.0.1:10249`): the probes stay reachable while every Service's and endpoint's
    /// address stays off the network. It answers the probes too.
    #[serde(default)]
    pub metrics_address: Option<SocketAddr>,
    /// How long the series of an endpoint or service port that left stay exported, so
    /// that a scrape sees their last values.
    #[serde(default = "default_metrics_linger")]
    pub metrics_linger: Humantime,
    /// `/healthz` and `/livez` fail when a change has waited this long to be applied
    /// (kube-proxy: twice its sync period).
    #[serde(default = "default_health_timeout")]
    pub health_timeout: Humantime,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: default_admin(),
            metrics_address: None,
            metrics_linger: default_metrics_linger(),
            health_timeout: default_health_timeout(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Data-plane threads, each with its own instance of every policy (0: one per CPU).
    #[serde(default)]
    pub workers: usize,
    /// How long a connect to one endpoint may take before another is tried.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Humantime,
    /// Endpoints tried for one connection before it is given up on (at least 1).
    #[serde(default = "default_connect_attempts")]
    pub connect_attempts: u32,
    /// A dropped connection is closed without a reply after the client's first bytes or
    /// after this long, whichever comes first.
    #[serde(default = "default_drop_timeout")]
    pub drop_timeout: Humantime,
    /// On SIGTERM, how long established connections may continue before they are closed.
    #[serde(default = "default_grace")]
    pub shutdown_grace_period: Humantime,
    /// How long a UDP flow that has not seen traffic both ways more than once may be idle
    /// before it ends: the kernel's `nf_conntrack_udp_timeout`, which kube-proxy leaves
    /// in place. A Service may set its own with `weir.dev/udp-timeout`.
    #[serde(default = "default_udp_timeout")]
    pub udp_timeout: Humantime,
    /// The same for a flow that has (a "stream": DNS over one socket, QUIC, VPN...): the
    /// kernel's `nf_conntrack_udp_timeout_stream`.
    #[serde(default = "default_udp_stream_timeout")]
    pub udp_stream_timeout: Humantime,
    /// UDP flows open at once on this node; a datagram that would open one more is dropped
    /// and counted (`weir_udp_dropped_total{reason="node_flow_cap"}`). Each flow holds a
    /// socket, so keep it under the file descriptor limit.
    #[serde(default = "default_max_udp_flows")]
    pub max_udp_flows: usize,
    /// UDP flows open at once for one Service port.
    #[serde(default = "default_max_udp_flows_per_service")]
    pub max_udp_flows_per_service: usize,
    /// TCP connections proxied at once on this node; past it listeners stop accepting
    /// (clients wait in the kernel's backlog) until one closes. 0: derived from the open
    /// files limit (each connection holds two descriptors), keeping room for the rest.
    #[serde(default)]
    pub max_connections: usize,
    /// TCP connections proxied at once for one Service port. 0: three quarters of the
    /// node's cap, so that one Service (a slow or silent endpoint, a flood) cannot take
    /// every connection the node has.
    #[serde(default)]
    pub max_connections_per_service: usize,
    /// A TCP connection with no bytes either way for this long is closed (a Service may
    /// set its own with `weir.dev/idle-timeout`). None: never, as kube-proxy.
    #[serde(default)]
    pub idle_timeout: Option<Humantime>,
    /// A TCP connection that one side has closed (half-closed) ends when no bytes move
    /// for this long: the peer that never closes its side cannot hold two descriptors
    /// for good (HAProxy's `timeout client-fin`/`server-fin`).
    #[serde(default = "default_half_close_timeout")]
    pub half_close_timeout: Humantime,
    /// Connect to this node's endpoints from the client's own address when
    /// externalTrafficPolicy Local keeps the traffic here, so pods see who connected (as
    /// with kube-proxy). Needs CAP_NET_ADMIN, nftables and policy routing, which weir sets up
    /// and removes; where it cannot, it says so once and carries on without.
    #[serde(default)]
    pub transparent: bool,
    /// Where weir writes its UDP flows at shutdown and reads them back at start, so that
    /// a restart does not move them (a directory that outlives the process: a hostPath
    /// under /run in a cluster). None: flows end with the process.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            workers: 0,
            connect_timeout: default_connect_timeout(),
            connect_attempts: default_connect_attempts(),
            drop_timeout: default_drop_timeout(),
            shutdown_grace_period: default_grace(),
            udp_timeout: default_udp_timeout(),
            udp_stream_timeout: default_udp_stream_timeout(),
            max_udp_flows: default_max_udp_flows(),
            max_udp_flows_per_service: default_max_udp_flows_per_service(),
            transparent: false,
            max_connections: 0,
            max_connections_per_service: 0,
            idle_timeout: None,
            half_close_timeout: default_half_close_timeout(),
            state_dir: None,
        }
    }
}

impl ProxyConfig {
    /// `max_connections`, or what the open files limit allows when it is 0: two
    /// descriptors a connection, with 1024 kept for listeners, UDP flows' sockets being
    /// counted apart, the admin port and the policy engine.
    pub fn connection_cap(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(1 << 20) as usize;
        (limit.saturating_sub(1024 + self.max_udp_flows) / 2).max(64)
    }

    /// `max_connections_per_service`, or three quarters of [`connection_cap`] when it is 0.
    pub fn connection_cap_per_service(&self) -> usize {
        match self.max_connections_per_service {
            0 => (self.connection_cap() * 3 / 4).max(1),
            cap => cap,
        }
    }

    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Deadline of `select` and `observe` (per connection).
    pub select_deadline: Option<Humantime>,
    /// Deadline of `configure`, `update` and `remove`.
    pub update_deadline: Option<Humantime>,
    /// Each service port's memory budget for its policy, in MiB, unless its policy
    /// (`policies.toml`) or its Service (`weir.dev/policy-memory-mib`) sets another.
    pub memory_mib: Option<u32>,
    /// The most a policy or Service may set a port's budget to, in MiB.
    pub max_memory_mib: Option<u32>,
    /// How long a service follows its failure mode after a failed `select`.
    pub quarantine: Option<Humantime>,
    /// How long compiling one policy module may take, and the memory the compiler may
    /// use (MiB); a module past either is refused (`compile_budget`).
    pub compile_timeout: Option<Humantime>,
    pub compile_memory_mib: Option<u32>,
    /// The largest policy module accepted, in KiB.
    pub max_module_kib: Option<u32>,
}

impl LimitsConfig {
    pub fn limits(&self) -> Limits {
        let mut limits = Limits::default();
        if let Some(d) = self.select_deadline {
            limits.select_deadline = d.0;
        }
        if let Some(d) = self.update_deadline {
            limits.update_deadline = d.0;
        }
        if let Some(mib) = self.max_memory_mib {
            limits.memory_ceiling_bytes = (mib as usize) << 20;
        }
        if let Some(mib) = self.memory_mib {
            limits.memory_bytes = (mib as usize) << 20;
        }
        if let Some(d) = self.quarantine {
            limits.quarantine = d.0;
        }
        if let Some(d) = self.compile_timeout {
            limits.compile_timeout = d.0;
        }
        if let Some(mib) = self.compile_memory_mib {
            limits.compile_memory_bytes = u64::from(mib) << 20;
        }
        if let Some(kib) = self.max_module_kib {
            limits.max_module_bytes = (kib as usize) << 10;
        }
        limits
    }
}

fn default_poll() -> Humantime {
    Humantime(Duration::from_millis(250))
}
fn default_metrics_linger() -> Humantime {
    Humantime(crate::metrics::DEFAULT_LINGER)
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10256))
}
fn default_health_timeout() -> Humantime {
    Humantime(Duration::from_secs(60))
}
fn default_connect_timeout() -> Humantime {
    Humantime(Duration::from_secs(2))
}
fn default_connect_attempts() -> u32 {
    3
}
fn default_drop_timeout() -> Humantime {
    Humantime(Duration::from_secs(5))
}
fn default_udp_timeout() -> Humantime {
    Humantime(Duration::from_secs(30))
}
fn default_udp_stream_timeout() -> Humantime {
    Humantime(Duration::from_secs(120))
}
fn default_max_udp_flows() -> usize {
    16_384
}
fn default_half_close_timeout() -> Humantime {
    Humantime(Duration::from_secs(60))
}
fn default_max_udp_flows_per_service() -> usize {
    4_096
}
fn default_grace() -> Humantime {
    Humantime(Duration::from_secs(30))
}

/// A config that cannot be used, with what is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

impl Config {
    /// Reads and checks a config file, with nothing from the environment; relative paths
    /// become relative to its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_in(path, Environment::default())
    }

    /// As [`Config::load`], with `environment` filling what the file leaves unset.
    pub fn load_in(path: &Path, environment: Environment) -> Result<Config, ConfigError> {
        let error = |message: String| ConfigError {
            file: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| error(format!("cannot read the config file: {e}")))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let config = Config::parse_in(&text, base, environment).map_err(error)?;
        config.check_paths().map_err(error)?;
        Ok(config)
    }

    /// Parses config text, with nothing from the environment; relative paths are joined
    /// to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, String> {
        Config::parse_in(text, base, Environment::default())
    }

    /// As [`Config::parse`], with `environment` filling what the text leaves unset.
    pub fn parse_in(text: &str, base: &Path, environment: Environment) -> Result<Config, String> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            format!(
                "{}\nThe keys and their meaning are listed in README.md, section \"Configuration\".",
                e.to_string().trim_end()
            )
        })?;
        if config.node.name.is_empty() {
            config.node.name = environment.node_name.clone().unwrap_or_default();
        }
        config.environment = environment;
        config
            .check()
            .map_err(|(key, message)| match line_of(text, key) {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            })?;
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        config.source.paths.iter_mut().for_each(resolve);
        if let Some(dir) = config.policies.dir.as_mut() {
            resolve(dir);
        }
        if let Some(dir) = config.policies.cache_dir.as_mut() {
            resolve(dir);
        }
        if let Some(dir) = config.proxy.state_dir.as_mut() {
            resolve(dir);
        }
        if let Some(path) = config.source.kubeconfig.as_mut() {
            resolve(path);
        }
        Ok(config)
    }

    /// `node.addresses` as configured; with `kind = "files"`, 127.0.0.1 by default.
    /// `None`: they come from the Node object.
    pub fn node_addresses(&self) -> Option<Vec<IpAddr>> {
        match (&self.node.addresses, self.source.kind) {
            (Some(addresses), _) => Some(addresses.clone()),
            (None, SourceKind::Files) => Some(vec![IpAddr::from([127, 0, 0, 1])]),
            (None, SourceKind::Kubernetes) => None,
        }
    }

    /// The interface to put Service addresses on, if any.
    pub fn capture_interface(&self) -> Option<String> {
        match (&self.node.capture_interface, self.source.kind) {
            (Some(name), _) if name.is_empty() => None,
            (Some(name), _) => Some(name.clone()),
            (None, SourceKind::Kubernetes) => Some("weir0".to_string()),
            (None, SourceKind::Files) => None,
        }
    }

    /// `node.local_cidrs`, or each configured node address as a single host.
    pub fn local_cidrs(&self) -> Vec<Cidr> {
        self.node.local_cidrs.clone().unwrap_or_else(|| {
            self.node_addresses()
                .unwrap_or_default()
                .into_iter()
                .map(Cidr::host)
                .collect()
        })
    }

    /// The compiled-module cache: `policies.cache_dir`, or the user's cache directory.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        match &self.policies.cache_dir {
            Some(dir) if dir.as_os_str().is_empty() => None,
            Some(dir) => Some(dir.clone()),
            None => self.environment.cache_dir.clone(),
        }
    }
}

mod check;
#[cfg(test)]
mod tests;
