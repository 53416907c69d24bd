//! `weir policy test`: one module, offline, in the real host runtime, against Services and
//! EndpointSlices from files and synthetic clients: where connections went and why, how
//! fast the decisions were, whether the module misbehaved, and, with a script of changes,
//! how many clients moved at each step.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weir_sdk::{Connection, EndpointSet, OutcomeKind, Scope};

use crate::discovery::files::load_paths;
use crate::metrics::PolicyMetrics;
use crate::model::{self, ServicePortKey};
use crate::objects::Objects;
use crate::policy::{HostDecision, Limits, PolicyEngine, PolicyRuntime, ServiceInput};
use crate::state::Identities;

/// Where synthetic clients come from.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientSpec {
    /// Random addresses of the service's family (198.18.0.0/15, or fd00::/64).
    Random,
    /// These addresses, in turn.
    Fixed(Vec<IpAddr>),
    /// Random addresses in this network.
    Cidr(IpAddr, u8),
}

impl FromStr for ClientSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "random" {
            return Ok(ClientSpec::Random);
        }
        if let Some((ip, bits)) = text.split_once('/') {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("`{text}`: `{ip}` is not an IP address"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("`{text}`: prefix length must be 0..={max}"))?;
            return Ok(ClientSpec::Cidr(ip, bits));
        }
        let list = text.strip_prefix("fixed:").unwrap_or(text);
        let ips: Result<Vec<IpAddr>, String> = list
            .split(',')
            .map(|ip| {
                ip.trim()
                    .parse()
                    .map_err(|_| format!("`{ip}` is not an IP address"))
            })
            .collect();
        let ips = ips.map_err(|e| format!("--clients: {e}; use `random`, a CIDR like 198.19.0.0/24, or a list like 198.19.0.1,198.19.0.2"))?;
        Ok(ClientSpec::Fixed(ips))
    }
}

/// What `weir policy test` was asked (also its command-line arguments).
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// The policy component to test.
    pub module: PathBuf,
    /// Files or directories of Services, EndpointSlices and Nodes.
    #[arg(long = "objects", required = true, num_args = 1..)]
    pub objects: Vec<PathBuf>,
    /// The node to answer for.
    #[arg(long)]
    pub node: String,
    /// The policy's configuration (JSON), passed to `configure`.
    #[arg(long, default_value = "")]
    pub config: String,
    /// Connections per service port and traffic scope.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Client addresses: `random`, a CIDR (198.19.0.0/24) or a list (198.19.0.1,198.19.0.2).
    #[arg(long, default_value = "random")]
    pub clients: ClientSpec,
    /// YAML steps applied in order (add, remove, terminating, zone, wait); after each, the
    /// same clients connect again and the clients that moved are counted.
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// Seeds the clients and the policy's randomness, so runs repeat.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Decides each connection as an HTTP request instead, as on a port whose appProtocol
    /// is http, kubernetes.io/h2c or grpc (the policy's select-request; a 0.1.0 policy's
    /// select).
    #[arg(long)]
    pub requests: bool,
    /// A header on every request (with --requests): `NAME: VALUE`. `{n}` in the value
    /// becomes a number below --values, drawn per request, so that hashing on the header
    /// can be seen to stick.
    #[arg(long = "header", requires = "requests")]
    pub headers: Vec<HeaderSpec>,
    /// How many numbers `{n}` takes.
    #[arg(long, default_value_t = 100)]
    pub values: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub module: String,
    pub policy: String,
    /// The contract version the module targets (0.1.0, 0.2.0).
    pub contract: &'static str,
    pub node: String,
    pub connections: usize,
    /// Each connection was decided as an HTTP request (--requests).
    pub requests: bool,
    pub services: Vec<PortReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepReport>,
    /// Failed policy calls by reason (trap, timeout, memory, invalid_answer...).
    pub failures: BTreeMap<String, u64>,
    /// No failures: the module behaved.
    pub ok: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortReport {
    pub service: String,
    pub port: String,
    pub protocol: &'static str,
    pub ip_family: &'static str,
    pub internal: ScopeReport,
    pub external: Option<ScopeReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_failure: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScopeReport {
    /// `forward` when something is eligible, else `reject` or `drop`.
    pub action: &'static str,
    pub eligible: Vec<String>,
    pub forwarded: usize,
    pub rejected: usize,
    pub dropped: usize,
    /// Where the forwarded connections went, by endpoint.
    pub endpoints: Vec<EndpointShare>,
    pub latency_nanos: Latency,
    /// Policy calls that failed while these connections were decided (their answers came
    /// from the service's failure mode, not the policy).
    pub failures: u64,
    /// With --requests: whether each distinct set of header values stuck to one endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_values: Option<KeyReport>,
}

#[derive(Debug, Serialize)]
pub struct EndpointShare {
    pub endpoint: String,
    pub connections: usize,
    pub share: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    pub step: usize,
    pub change: String,
    /// Clients whose endpoint changed, over every port and scope.
    pub moved: usize,
    pub clients: usize,
    pub ports: Vec<PortMoves>,
}

#[derive(Debug, Serialize)]
pub struct PortMoves {
    pub service: String,
    pub port: String,
    pub scope: &'static str,
    pub moved: usize,
    pub clients: usize,
}

/// One change of a script.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Change {
    /// An endpoint joins the Service (added to its first slice of the address's family).
    Add(EndpointChange),
    /// An endpoint leaves the Service.
    Remove(EndpointChange),
    /// An endpoint starts terminating (not ready, still serving).
    Terminating(EndpointChange),
    /// This node's `topology.kubernetes.io/zone` label changes.
    Zone(String),
    /// Time passes for the policy (`30s`, `500ms`, `2m`).
    Wait(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointChange {
    /// `namespace/name`.
    pub service: String,
    pub address: String,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Script {
    steps: Vec<Change>,
}

/// The outcome of one run: the report, and whether the input was usable at all.
pub enum Outcome {
    Report(Report),
    /// The objects, script or module could not be used; nothing was measured.
    BadInput(BadInput),
}

/// What could not be used, each message naming the file (or step) and the fix.
#[derive(Debug, thiserror::Error)]
pub enum BadInput {
    #[error("{}", .0.join("\n"))]
    Objects(Vec<String>),
    #[error("{0}")]
    Script(String),
    #[error("cannot start the policy engine: {0}")]
    Engine(String),
    #[error("{0}")]
    Module(String),
    #[error("step {step} of the script: {message}")]
    Step { step: usize, message: String },
}

/// Runs the test.
pub fn run(options: &Options) -> Outcome {
    match run_inner(options) {
        Ok(report) => Outcome::Report(report),
        Err(error) => Outcome::BadInput(error),
    }
}

fn run_inner(options: &Options) -> Result<Report, BadInput> {
    let (mut objects, diagnostics) = load_paths(&options.objects);
    let errors: Vec<String> = diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(ToString::to_string)
        .collect();
    if !errors.is_empty() {
        return Err(BadInput::Objects(errors));
    }
    let script = match &options.script {
        Some(path) => read_script(path).map_err(BadInput::Script)?,
        None => Vec::new(),
    };
    let metrics = Arc::new(PolicyMetrics::default());
    // Relaxed deadlines: a busy CI machine must not fail a good module. The report's
    // latency percentiles are what to hold against the production 1 ms.
    let engine = PolicyEngine::new_seeded(Limits::relaxed(), None, metrics.clone(), options.seed)
        .map_err(|e| BadInput::Engine(format!("{e:#}")))?;
    let compiled = engine
        .load_file(&options.module)
        .map_err(|e| BadInput::Module(e.to_string()))?;
    let policy = compiled.name.clone();
    let contract = compiled.contract();
    let runtime = PolicyRuntime::new(engine.clone(), compiled, &options.config)
        .map_err(|e| BadInput::Module(format!("{}: {e}", options.module.display())))?;

    let mut world = World {
        runtime,
        metrics: metrics.clone(),
        identities: Identities::default(),
        node: options.node.clone(),
        clients: Clients::new(options),
        requests: Requests::new(options),
    };
    let mut ports = world.apply(&objects);
    let baseline = world.send_all(&ports);
    let services = ports
        .iter()
        .zip(&baseline)
        .map(|(port, runs)| port.report(runs))
        .collect();

    let mut steps = Vec::new();
    let mut previous = (
        ports.iter().map(|p| p.key.clone()).collect::<Vec<_>>(),
        baseline,
    );
    for (index, change) in script.iter().enumerate() {
        let description =
            apply_change(&mut objects, change, &options.node, &engine).map_err(|message| {
                BadInput::Step {
                    step: index + 1,
                    message,
                }
            })?;
        ports = world.apply(&objects);
        let now = world.send_all(&ports);
        steps.push(moves(
            index + 1,
            description,
            &previous.0,
            &previous.1,
            &ports,
            &now,
        ));
        previous = (ports.iter().map(|p| p.key.clone()).collect(), now);
    }

    let failures: BTreeMap<String, u64> = failure_counts(&metrics, &policy);
    let ok = failures.values().all(|n| *n == 0);
    Ok(Report {
        module: options.module.display().to_string(),
        policy,
        contract,
        node: options.node.clone(),
        connections: options.connections,
        requests: options.requests,
        services,
        steps,
        failures,
        ok,
    })
}

/// The runtime and the identities that persist across steps.
struct World {
    runtime: PolicyRuntime,
    metrics: Arc<PolicyMetrics>,
    identities: Identities,
    node: String,
    clients: Clients,
    requests: Option<Requests>,
}

/// One service port as tested.
struct Port {
    key: ServicePortKey,
    handle: u32,
    input: ServiceInput,
    eligibility: weir_sdk::Eligibility,
    failure: Option<String>,
    externally_accessible: bool,
}

/// The endpoint each client reached (`None`: rejected or dropped), per scope.
struct Runs {
    internal: Vec<Result<SocketAddr, HostDecision>>,
    external: Option<Vec<Result<SocketAddr, HostDecision>>>,
    internal_latency: Vec<u64>,
    external_latency: Vec<u64>,
    internal_failures: u64,
    external_failures: u64,
    /// With --requests: request `i`'s header values.
    keys: Option<Vec<String>>,
}

impl World {
    /// Updates the runtime with the model of `objects`; removes ports that are gone.
    fn apply(&mut self, objects: &Objects) -> Vec<Port> {
        let model = model::build(objects, &self.node);
        let keys: Vec<&ServicePortKey> = model.ports.iter().map(|p| &p.key).collect();
        for handle in self.identities.retain(&keys) {
            self.runtime.remove(handle);
        }
        model
            .ports
            .iter()
            .map(|snapshot| {
                let (handle, endpoints) = self.identities.assign(snapshot);
                let input = snapshot.input(model.node.clone(), endpoints);
                let answer = self.runtime.update(handle, input.clone());
                Port {
                    key: snapshot.key.clone(),
                    handle,
                    externally_accessible: input.service.externally_accessible(),
                    input,
                    eligibility: answer.eligibility,
                    failure: answer.failure.map(|e| e.to_string()),
                }
            })
            .collect()
    }

    fn send_all(&mut self, ports: &[Port]) -> Vec<Runs> {
        ports.iter().map(|port| self.send(port)).collect()
    }

    fn send(&mut self, port: &Port) -> Runs {
        let family_v6 = port.input.service.cluster_ip.is_ipv6();
        let clients = self.clients.for_family(family_v6);
        let policy = self.runtime.name().to_string();
        let failures = |metrics: &PolicyMetrics| metrics.failures_total(&policy);
        let internal_destination =
            SocketAddr::new(port.input.service.cluster_ip, port.input.service.port);
        let before = failures(&self.metrics);
        let (internal, internal_latency) =
            self.connect_all(port, &clients, Scope::Internal, internal_destination);
        let internal_failures = failures(&self.metrics) - before;
        let before = failures(&self.metrics);
        let (external, external_latency) = if port.externally_accessible {
            let s = &port.input.service;
            let destination = match (s.load_balancer_ips.first(), s.external_ips.first()) {
                (Some(ip), _) | (None, Some(ip)) => SocketAddr::new(*ip, s.port),
                (None, None) => {
                    let unspecified: IpAddr = if family_v6 {
                        Ipv6Addr::UNSPECIFIED.into()
                    } else {
                        Ipv4Addr::UNSPECIFIED.into()
                    };
                    SocketAddr::new(unspecified, s.node_port)
                }
            };
            let (runs, latency) = self.connect_all(port, &clients, Scope::External, destination);
            (Some(runs), latency)
        } else {
            (None, Vec::new())
        };
        Runs {
            internal,
            external,
            internal_latency,
            external_latency,
            internal_failures,
            external_failures: failures(&self.metrics) - before,
            keys: (self.requests.as_ref())
                .map(|requests| (0..clients.len()).map(|i| requests.head(i).1).collect()),
        }
    }

    #[allow(clippy::type_complexity)]
    fn connect_all(
        &self,
        port: &Port,
        clients: &[SocketAddr],
        scope: Scope,
        destination: SocketAddr,
    ) -> (Vec<Result<SocketAddr, HostDecision>>, Vec<u64>) {
        let mut results = Vec::with_capacity(clients.len());
        let mut latency = Vec::with_capacity(clients.len());
        for (i, &client) in clients.iter().enumerate() {
            let connection = Connection {
                client,
                destination,
                scope,
            };
            let head = self.requests.as_ref().map(|r| r.head(i).0);
            // As the control plane does between connections: rebuild what failed.
            self.runtime.repair();
            let started = Instant::now();
            let decision = match &head {
                None => self.runtime.select(port.handle, &connection),
                Some(head) => self.runtime.select_request(port.handle, &connection, head),
            };
            latency.push(started.elapsed().as_nanos() as u64);
            results.push(match decision {
                HostDecision::Forward { address, endpoint } if head.is_some() => {
                    // A 200 after 1 ms, its body at once.
                    for (event, micros) in [
                        (weir_sdk::RequestEvent::Response(200), 1000),
                        (weir_sdk::RequestEvent::Finished, 1000),
                    ] {
                        let outcome = weir_sdk::RequestOutcome {
                            endpoint,
                            event,
                            micros,
                        };
                        self.runtime.observe_request(port.handle, &outcome);
                    }
                    Ok(address)
                }
                HostDecision::Forward { address, endpoint } => {
                    // Policies that learn from outcomes hear of a 1 ms connect and an
                    // immediate close: short, healthy connections.
                    for (kind, micros) in [(OutcomeKind::Connected, 1000), (OutcomeKind::Closed, 0)]
                    {
                        let outcome = weir_sdk::Outcome {
                            endpoint,
                            kind,
                            micros,
                        };
                        self.runtime.observe(port.handle, &outcome);
                    }
                    Ok(address)
                }
                other => Err(other),
            });
        }
        (results, latency)
    }
}

fn failure_counts(metrics: &PolicyMetrics, policy: &str) -> BTreeMap<String, u64> {
    use crate::metrics::{Call, Reason};
    let mut out = BTreeMap::new();
    for (name, reason) in [
        ("trap", Reason::trap),
        ("timeout", Reason::timeout),
        ("memory", Reason::memory),
        ("invalid_answer", Reason::invalid_answer),
        ("refused", Reason::refused),
        ("instantiate", Reason::instantiate),
    ] {
        let total: u64 = [
            Call::configure,
            Call::update,
            Call::remove,
            Call::select,
            Call::observe,
            Call::select_request,
            Call::observe_request,
        ]
        .into_iter()
        .map(|call| metrics.failures_of(policy, call, reason.clone()))
        .sum();
        out.insert(name.to_string(), total);
    }
    out
}

mod clients;
mod report;
mod requests;
mod script;
mod table;

use clients::*;
pub use requests::{HeaderSpec, KeyReport};
use requests::{Requests, key_report};
use script::*;
pub use table::table;

#[cfg(test)]
mod tests;
