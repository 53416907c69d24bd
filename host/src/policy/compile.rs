//! Compiling policy modules outside weir's process: a child `weir` under a time and
//! memory budget, in the background, so a module built to be expensive to compile costs
//! a refused module, not a stalled control loop or an out-of-memory proxy.
//!
//! The control plane asks for a module; the first ask starts a child and answers
//! "pending", and the control loop goes on applying object changes. A later ask (the
//! next look at the policies) gets the compiled artifact, which the parent loads as it
//! loads its own cache, or the reason it was refused.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy};

use super::limits::Limits;
use crate::locks::lock;

/// The hidden `weir` subcommand that compiles one module from stdin.
pub const SUBCOMMAND: &str = "compile-policy";

/// What a compile in the background came to.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// `Component::serialize` output, from an engine configured as the parent's.
    Compiled(Arc<Vec<u8>>),
    /// wasmtime refused the module (it is not valid WebAssembly, for example).
    Invalid(String),
    /// The compile ran past its time or memory budget and was stopped.
    OverBudget(String),
}

enum Job {
    Running,
    Done(Outcome),
}

/// Compiles modules in child processes, one job per module digest.
pub struct Compiler {
    /// The `weir` executable to run as the child.
    exe: PathBuf,
    timeout: Duration,
    memory_bytes: u64,
    /// The parent engine's memory reservation: the child's engine must match it.
    reservation: usize,
    jobs: Arc<Mutex<HashMap<String, Job>>>,
}

impl Compiler {
    pub fn new(exe: PathBuf, limits: &Limits) -> Self {
        Compiler {
            exe,
            timeout: limits.compile_timeout,
            memory_bytes: limits.compile_memory_bytes,
            reservation: limits.memory_bytes,
            jobs: Arc::default(),
        }
    }

    /// The module's compile outcome when there is one (taken: a module is compiled again
    /// if asked again after that); `None` while it is compiling, after starting the
    /// compile if it was not.
    pub fn take(&self, sha256: &str, bytes: &[u8]) -> Option<Outcome> {
        let mut jobs = lock(&self.jobs);
        match jobs.remove(sha256) {
            Some(Job::Done(outcome)) => return Some(outcome),
            Some(Job::Running) => {
                jobs.insert(sha256.to_string(), Job::Running);
                return None;
            }
            None => {}
        }
        jobs.insert(sha256.to_string(), Job::Running);
        drop(jobs);
        let (jobs, sha256, bytes) = (self.jobs.clone(), sha256.to_string(), bytes.to_vec());
        let (exe, timeout, memory, reservation) = (
            self.exe.clone(),
            self.timeout,
            self.memory_bytes,
            self.reservation,
        );
        let spawned = std::thread::Builder::new()
            .name("weir-compile".into())
            .spawn(move || {
                let outcome = compile_in_child(&exe, &bytes, timeout, memory, reservation);
                lock(&jobs).insert(sha256, Job::Done(outcome));
            });
        if let Err(error) = spawned {
            return Some(Outcome::OverBudget(format!(
                "could not start a compile: {error}"
            )));
        }
        None
    }

    /// Whether any module is compiling now.
    pub fn busy(&self) -> bool {
        lock(&self.jobs).values().any(|j| matches!(j, Job::Running))
    }
}

fn compile_in_child(
    exe: &std::path::Path,
    bytes: &[u8],
    timeout: Duration,
    memory_bytes: u64,
    reservation: usize,
) -> Outcome {
    let mut child = match Command::new(exe)
        .arg(SUBCOMMAND)
        .arg(memory_bytes.to_string())
        .arg(reservation.to_string())
        .arg(timeout.as_secs().max(1).to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // weir's allocator (mimalloc) maps its arenas 1 GiB at a time, writable, and the
        // child's data limit counts that: small arenas, committed as used, keep the
        // budget about what the compiler uses.
        .env("MIMALLOC_ARENA_RESERVE", "16MiB")
        .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
        .env_remove("WEIR_LOG")
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            return Outcome::OverBudget(format!(
                "could not start the compiler ({}): {error}",
                exe.display()
            ));
        }
    };
    // The child reads all of the module before it compiles; the pipes are drained on
    // threads of their own so a large artifact cannot block it.
    let mut stdin = child.stdin.take().expect("piped");
    let module = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&module);
    });
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut artifact = Vec::new();
        let _ = stdout.read_to_end(&mut artifact);
        artifact
    });
    let mut stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = (&mut stderr).take(4096).read_to_end(&mut text);
        String::from_utf8_lossy(&text).trim().to_string()
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let _ = writer.join();
    let artifact = reader.join().unwrap_or_default();
    let message = errors.join().unwrap_or_default();
    let budget = format!("{:.0?} and {} MiB", timeout, memory_bytes >> 20);
    match status {
        None => Outcome::OverBudget(format!(
            "compiling took longer than its budget ({budget}) and was stopped"
        )),
        Some(status) if status.success() && !artifact.is_empty() => {
            Outcome::Compiled(Arc::new(artifact))
        }
        // Exit status 2: wasmtime refused the module; anything else (an abort when an
        // allocation was refused, SIGXCPU) is the budget.
        Some(status) if status.code() == Some(2) => Outcome::Invalid(message),
        Some(status) => {
            use std::os::unix::process::ExitStatusExt;
            let how = match status.signal() {
                Some(6) => "its memory".to_string(),
                Some(24) => "its CPU time".to_string(),
                _ if message.is_empty() => format!("its budget ({status})"),
                _ => format!(
                    "its budget ({status}: {})",
                    message.lines().last().unwrap_or_default()
                ),
            };
            Outcome::OverBudget(format!(
                "compiling ran out of {how} (budget {budget}) and was stopped"
            ))
        }
    }
}

/// The child's side: `weir compile-policy MEMORY_BYTES RESERVATION SECONDS`, the module on
/// stdin, the artifact on stdout. Caps its own data segment and CPU time first.
pub fn child_main(args: &[String]) -> ExitCode {
    let number = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok());
    let (Some(memory), Some(reservation), Some(seconds)) = (number(0), number(1), number(2)) else {
        eprintln!("usage: weir {SUBCOMMAND} MEMORY_BYTES RESERVATION SECONDS (internal)");
        return ExitCode::from(64);
    };
    use rustix::process::{Resource, Rlimit, setrlimit};
    let limit = |value: u64| Rlimit {
        current: Some(value),
        maximum: Some(value),
    };
    if setrlimit(Resource::Data, limit(memory)).is_err()
        || setrlimit(Resource::Cpu, limit(seconds + 1)).is_err()
    {
        eprintln!("cannot limit the compiler's memory and time");
        return ExitCode::from(1);
    }
    let mut module = Vec::new();
    if let Err(error) = std::io::stdin().read_to_end(&mut module) {
        eprintln!("cannot read the module: {error}");
        return ExitCode::from(1);
    }
    let limits = Limits {
        memory_bytes: reservation as usize,
        ..Limits::default()
    };
    // One core: a compile must not take the node's cores from the data plane.
    let mut config = engine_config(&limits);
    config.parallel_compilation(false);
    let engine = match Engine::new(&config) {
        Ok(engine) => engine,
        Err(error) => {
            eprintln!("cannot start the engine: {error:#}");
            return ExitCode::from(1);
        }
    };
    let serialized = Component::new(&engine, &module).and_then(|c| c.serialize());
    match serialized {
        Ok(artifact) => match std::io::stdout().write_all(&artifact) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        },
        Err(error) => {
            eprintln!("{error:#}");
            ExitCode::from(2)
        }
    }
}

/// How every policy is compiled and run. Instances are allocated on demand, not from a
/// pool: there is one per service port, so their number follows the Services, and a
/// pool would have to be sized (and its address space reserved) for the most there could
/// ever be. A memory reserves only its port's budget of address space, so ten thousand
/// ports fit in any address space; what they use is what they touch.
pub(crate) fn engine_config(limits: &Limits) -> Config {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::OnDemand)
        .memory_reservation(limits.memory_bytes as u64)
        .memory_reservation_for_growth(0)
        .memory_guard_size(64 << 10)
        .memory_may_move(true);
    config
}

/// Loads an artifact a child compiled with this engine's configuration.
pub(crate) fn load(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `deserialize` trusts its input to be wasmtime's own output for a compatible
    // engine. The artifact comes straight from the pipe of a child `weir` that this
    // process started with the same binary and the same engine configuration (the same
    // trust as the compiled-module cache); wasmtime still checks its header, version and
    // compatibility hash.
    #[allow(unsafe_code)]
    unsafe {
        Component::deserialize(engine, artifact)
    }
}
