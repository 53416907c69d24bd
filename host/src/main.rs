//! The `weir` command: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use weir::discovery::files::load_paths;
use weir::metrics::PolicyMetrics;
use weir::policy::{Limits, PolicyEngine, Registry};

/// A Kubernetes service proxy whose routing policies are WebAssembly components.
#[derive(Parser)]
#[command(name = "weir", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: watch objects and policies, listen on every Service address.
    Run {
        /// weir's settings (TOML); see README.md, section "Configuration".
        #[arg(long, default_value = "weir.toml")]
        config: PathBuf,
    },
    /// Show what every Service port would do on a node, from YAML/JSON objects.
    Explain {
        /// Files or directories of Services, EndpointSlices and Nodes (YAML or JSON,
        /// multi-document and `kind: List` as `kubectl get -o yaml` prints them).
        #[arg(long = "objects", required = true, num_args = 1..)]
        objects: Vec<PathBuf>,
        /// The node to answer for (locality, externalTrafficPolicy Local, zone hints).
        #[arg(long)]
        node: String,
        /// Directory of policy modules (`NAME.wasm`), for Services annotated `weir.dev/policy: NAME`.
        #[arg(long)]
        policies: Option<PathBuf>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Work with policy modules.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Write a new policy crate that builds to a component with one command.
    New {
        /// The policy's name: crate name and `weir.dev/policy` value (lowercase, dashes).
        name: String,
        /// Start from `minimal` or from a library policy (random, maglev, locality, ...).
        #[arg(long = "from", default_value = "minimal")]
        template: String,
        /// Where to create it (default: ./NAME). Inside a weir checkout's policies/ it
        /// becomes a workspace member.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The weir SDK to depend on outside a weir checkout (default: the one this weir
        /// carries, written into the new crate as weir-sdk/).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Run a module offline against objects and synthetic clients; show where connections
    /// went, decision latency, and misbehaviour (non-zero exit if any).
    Test {
        #[command(flatten)]
        options: weir::cli::policy_test::Options,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Load a module, check its world and version, run configure, update and select.
    Check {
        file: PathBuf,
        /// Configuration text passed to `configure`.
        #[arg(long, default_value = "")]
        config: String,
    },
    /// Print the contract, `weir:policy` (wit/policy.wit), for a policy written with any
    /// component-model toolchain.
    Wit,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Json,
    Table,
}

/// mimalloc: the data plane allocates and frees small objects per request (headers,
/// frames, tasks) from several threads; glibc's allocator spent about a tenth of an HTTP
/// worker's time on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The child `weir run` compiles policy modules in, under a budget; not a user command.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(weir::policy::compile::SUBCOMMAND) {
        return weir::policy::compile::child_main(&args[2..]);
    }
    let cli = Cli::parse();
    // The proxy reports what it does; the tools only what goes wrong.
    let level = match cli.command {
        Command::Run { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
                // kube-client logs every failed request of an outage at ERROR; weir says
                // once that the API server is away, and once that it is back.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(format!(
                        "{level},kube_client=off,kube_runtime=off"
                    ))
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Explain {
            objects,
            node,
            policies,
            output,
        } => explain(&objects, &node, policies.as_deref(), output),
        Command::Policy {
            command:
                PolicyCommand::New {
                    name,
                    template,
                    dir,
                    sdk,
                },
        } => {
            let new = weir::cli::scaffold::NewPolicy {
                dir: dir.unwrap_or_else(|| PathBuf::from(&name)),
                name,
                template,
                sdk,
            };
            match weir::cli::scaffold::create(&new) {
                Ok(files) => {
                    for file in files {
                        println!("wrote {}", file.display());
                    }
                    println!(
                        "next: cd {} && cargo test && cargo build --target wasm32-wasip2 --release",
                        new.dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("error: {message}");
                    ExitCode::from(64)
                }
            }
        }
        Command::Policy {
            command: PolicyCommand::Test { options, output },
        } => match weir::cli::policy_test::run(&options) {
            weir::cli::policy_test::Outcome::BadInput(message) => {
                eprintln!("error: {message}");
                ExitCode::from(65)
            }
            weir::cli::policy_test::Outcome::Report(report) => {
                match output {
                    Format::Json => println!(
                        "{}",
                        serde_json::to_string_pretty(&report).expect("the report serializes")
                    ),
                    Format::Table => print!("{}", weir::cli::policy_test::table(&report)),
                }
                if report.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
        },
        Command::Policy {
            command: PolicyCommand::Check { file, config },
        } => match weir::cli::check::check(&file, &config) {
            Ok(report) => {
                print!("{}", report.text);
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(reason) => {
                eprintln!("error: {reason}");
                ExitCode::FAILURE
            }
        },
        Command::Policy {
            command: PolicyCommand::Wit,
        } => {
            print!("{}", weir::cli::sdk::wit_text());
            ExitCode::SUCCESS
        }
    }
}

fn explain(
    objects: &[PathBuf],
    node: &str,
    policies: Option<&std::path::Path>,
    output: Format,
) -> ExitCode {
    let (objects, diagnostics) = load_paths(objects);
    let mut failed = false;
    for diagnostic in &diagnostics {
        eprintln!("{diagnostic}");
        failed |= diagnostic.is_error();
    }
    if failed {
        eprintln!("error: the objects above could not be read; fix them and run again");
        return ExitCode::from(65);
    }
    let engine = match PolicyEngine::new(
        Limits::default(),
        weir::app::environment().cache_dir.as_deref(),
        Arc::new(PolicyMetrics::default()),
    ) {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("error: cannot start the policy engine: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut registry = Registry::new(engine);
    if let Some(dir) = policies {
        match registry.load_dir(dir) {
            Ok(refused) => {
                for error in refused {
                    eprintln!("error: {error}");
                }
            }
            Err(e) => {
                eprintln!(
                    "error: {}: cannot read the policies directory: {e}",
                    dir.display()
                );
                return ExitCode::from(66);
            }
        }
    }
    let model = weir::model::build(&objects, node);
    for diagnostic in &model.diagnostics {
        eprintln!("{diagnostic}");
    }
    let report = weir::cli::explain::report(&model, &registry);
    match output {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report serializes")
        ),
        Format::Table => print!("{}", weir::cli::explain::table(&report)),
    }
    ExitCode::SUCCESS
}

/// `weir run`: the proxy, until SIGTERM or SIGINT (a second one exits at once).
fn run(path: &std::path::Path) -> ExitCode {
    let mut config = match weir::config::Config::load_in(path, weir::app::environment()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(weir::config::EXIT_CONFIG);
        }
    };
    // Policy modules are compiled by this same binary, in a child under a budget.
    config.compiler = std::env::current_exe().ok();
    raise_open_files();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.proxy.worker_count())
        .thread_name("weir-worker")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let app = match weir::app::App::start(config) {
            Ok(app) => app,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(admin = %app.admin_address(), "weir is running; SIGTERM or Ctrl-C stops it gracefully");
        weir::app::serve_until_signal(app).await;
        ExitCode::SUCCESS
    })
}

/// Every connection and UDP flow holds a file descriptor: the soft limit (often 1,024) goes
/// up to the hard one, as Envoy and HAProxy operators set it.
fn raise_open_files() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(from = ?limit.current, to = ?limit.maximum, "open files limit raised")
            }
            Err(error) => tracing::warn!(
                "cannot raise the open files limit from {:?}: {error}",
                limit.current
            ),
        }
    }
}
