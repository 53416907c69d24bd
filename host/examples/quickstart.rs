//! The quickstart: starts a small backend for every endpoint of the example objects, then
//! runs weir with `examples/quickstart/weir.toml` (file mode, loopback) until Ctrl-C.
//!
//!     cargo run -p weir --example quickstart
//!
//! Each backend answers HTTP with its own name, so `curl` shows which endpoint served.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use weir::test_helpers::Backend;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let quickstart = root.join("examples/quickstart");
    install_policies(&root.join("target/policies"), &quickstart.join("policies"))?;

    let config = weir::config::Config::load(&quickstart.join("weir.toml"))?;
    let (objects, _) = weir::discovery::load_paths(&config.source.paths);
    let mut endpoints = BTreeSet::new();
    for slice in &objects.endpoint_slices {
        let slice = &slice.object;
        let ports: Vec<u16> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.port.map(|p| p as u16))
            .collect();
        for endpoint in &slice.endpoints {
            for address in &endpoint.addresses {
                for port in &ports {
                    if let Ok(ip) = address.parse() {
                        endpoints.insert((
                            SocketAddr::new(ip, *port),
                            endpoint.node_name.clone().unwrap_or_default(),
                        ));
                    }
                }
            }
        }
    }
    let mut backends = Vec::new();
    for (address, node) in endpoints {
        let name = format!("backend {address} on {node}");
        match Backend::start(address, &name).await {
            Ok(backend) => backends.push(backend),
            Err(e) => eprintln!("cannot start the backend at {address}: {e}"),
        }
    }
    eprintln!("started {} backends", backends.len());

    let admin = config.admin.address;
    let app = weir::app::App::start(config)?;
    eprintln!(
        "\nweir is running. In another terminal:\n\
         \x20 for i in 1 2 3 4 5 6; do curl -s 127.0.0.10:8080; done   # web's clusterIP: round-robin over 3 ready endpoints\n\
         \x20 curl -s 127.0.0.1:30080                                   # web's nodePort (from this node: all ready endpoints)\n\
         \x20 curl -s --interface 127.0.0.2 127.0.0.20:8080             # web's LoadBalancer IP from \"outside\": node-a's endpoints only\n\
         \x20 curl -si 127.0.0.1:30256                                  # web's healthCheckNodePort\n\
         \x20 curl -s 127.0.0.11:8080; curl -s 127.0.0.12:8080          # api (iTP Local, affinity), shop (maglev)\n\
         \x20 curl -s http://{admin}/metrics | grep weir_connections_opened\n\
         Edit examples/quickstart/objects/*.yaml or drop a .wasm into examples/quickstart/policies: weir applies it live.\n"
    );
    weir::app::serve_until_signal(app).await;
    drop(backends);
    Ok(())
}

/// Copies the library's components (built by host/build.rs into target/policies) into the
/// quickstart's policies directory, where weir watches for them.
fn install_policies(library: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let modules: Vec<PathBuf> = std::fs::read_dir(library)
        .map_err(|e| anyhow::anyhow!("{}: {e} (build weir first)", library.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    for module in modules {
        let target = dir.join(module.file_name().expect("a file"));
        if std::fs::read(&target).ok() != std::fs::read(&module).ok() {
            std::fs::copy(&module, &target)?;
        }
    }
    Ok(())
}
