//! Node capture: the Service addresses weir listens on (ClusterIPs, externalIPs,
//! LoadBalancer ingress IPs) are put on a dummy interface, as kube-proxy's IPVS mode does
//! with `kube-ipvs0`, which makes them local addresses of the node: packets to them are
//! delivered to weir's listeners. NodePorts need nothing: they listen on the node's own
//! addresses.
//!
//! The interface holds exactly the addresses weir wants: at start-up, what a previous run
//! left is read back and the stale ones are removed. Changes go through one `ip -batch`
//! per sync, and only when the set differs.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// Why the Service addresses could not be put on the capture interface. Each message
/// says what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "node.capture_interface: {interface} is {what}, not an interface weir may own: weir removes every address on it that it did not add; name one of weir's own, e.g. \"weir0\""
    )]
    NotOurs { interface: String, what: String },
    #[error("cannot create the dummy interface {interface}: {reason}")]
    Create { interface: String, reason: String },
    #[error("cannot bring {interface} up: {reason}")]
    BringUp { interface: String, reason: String },
    #[error(
        "cannot run `ip` (iproute2): {reason}; install iproute2, or set node.capture_interface = \"\" if the Service addresses are local already"
    )]
    NoIp { reason: String },
    /// `ip` ran and refused (`command`, what it said).
    #[error("`{command}` failed: {said}")]
    Ip { command: String, said: String },
    #[error("cannot read `ip -j address show`: {reason}")]
    Unreadable { reason: String },
    /// The same, on the interface named.
    #[error("{interface}: {error}")]
    On {
        interface: String,
        error: Box<CaptureError>,
    },
}

#[derive(Debug)]
pub struct Capture {
    interface: String,
    /// What the interface holds, as far as weir knows; `None` until it has been set up.
    present: Option<BTreeSet<IpAddr>>,
}

impl Capture {
    pub fn new(interface: String) -> Capture {
        Capture {
            interface,
            present: None,
        }
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Adds what is missing of `wanted`; with `remove`, also removes every other address.
    /// Call it without `remove` before listeners are opened, and with it once they are.
    pub fn reconcile(
        &mut self,
        wanted: &BTreeSet<IpAddr>,
        remove: bool,
    ) -> Result<(), CaptureError> {
        let present = match self.present.take() {
            Some(present) => present,
            None => {
                self.set_up()?;
                self.read()?
            }
        };
        let mut batch = String::new();
        for ip in wanted.difference(&present) {
            batch.push_str(&self.command("add", ip));
        }
        if remove {
            for ip in present.difference(wanted) {
                batch.push_str(&self.command("del", ip));
            }
        }
        if batch.is_empty() {
            self.present = Some(present);
            return Ok(());
        }
        let result = ip_batch(&batch);
        // Whatever happened, what is there now is what the kernel says.
        self.present = match (&result, remove) {
            (Ok(()), true) => Some(wanted.clone()),
            (Ok(()), false) => Some(present.union(wanted).copied().collect()),
            (Err(_), _) => self.read().ok(),
        };
        result.map_err(|error| CaptureError::On {
            interface: self.interface.clone(),
            error: Box::new(error),
        })
    }

    fn command(&self, verb: &str, ip: &IpAddr) -> String {
        match ip {
            IpAddr::V4(_) => format!("address {verb} {ip}/32 dev {}\n", self.interface),
            // No duplicate address detection: the address must be usable at once.
            IpAddr::V6(_) => format!("address {verb} {ip}/128 dev {} nodad\n", self.interface),
        }
    }

    /// Creates the interface if it is missing, and brings it up. One that exists must be
    /// of the kind weir creates: weir removes every address on it that it did not put
    /// there, which on `lo`, `eth0` or a bridge with ports would cut the node off.
    fn set_up(&self) -> Result<(), CaptureError> {
        let name = &self.interface;
        if let Ok(output) = ip(&["-d", "-j", "link", "show", "dev", name]) {
            let links: serde_json::Value = serde_json::from_str(&output).unwrap_or_default();
            let kind = links[0]["linkinfo"]["info_kind"].as_str().unwrap_or("");
            let ports = ip(&["-j", "link", "show", "master", name])
                .ok()
                .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
                .and_then(|v| v.as_array().map(Vec::len))
                .unwrap_or(0);
            if !(kind == "dummy" || (kind == "bridge" && ports == 0)) {
                let what = match kind {
                    "" => "a physical or loopback interface".to_string(),
                    "bridge" => "a bridge with ports".to_string(),
                    other => format!("a {other} interface"),
                };
                return Err(CaptureError::NotOurs {
                    interface: name.clone(),
                    what,
                });
            }
        } else {
            if let Err(error) = ip(&["link", "add", name, "type", "dummy"]) {
                // Some kernels are built without the dummy driver: a bridge without ports
                // holds addresses just as well.
                ip(&["link", "add", name, "type", "bridge"]).map_err(|_| CaptureError::Create {
                    interface: name.clone(),
                    reason: error.to_string(),
                })?;
                tracing::warn!(
                    interface = %name,
                    "this kernel has no dummy interfaces ({error}); using a bridge without ports instead"
                );
            }
            tracing::info!(interface = %name, "created the capture interface");
        }
        ip(&["link", "set", name, "up"])
            .map(|_| ())
            .map_err(|e| CaptureError::BringUp {
                interface: name.clone(),
                reason: e.to_string(),
            })
    }

    /// The addresses the interface holds now (link-local ones excepted).
    fn read(&self) -> Result<BTreeSet<IpAddr>, CaptureError> {
        let output = ip(&["-j", "address", "show", "dev", &self.interface])?;
        let links: serde_json::Value =
            serde_json::from_str(&output).map_err(|e| CaptureError::Unreadable {
                reason: e.to_string(),
            })?;
        let mut present = BTreeSet::new();
        for link in links.as_array().into_iter().flatten() {
            for info in link["addr_info"].as_array().into_iter().flatten() {
                if let Some(ip) = info["local"]
                    .as_str()
                    .and_then(|s| s.parse::<IpAddr>().ok())
                    && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
                {
                    present.insert(ip);
                }
            }
        }
        Ok(present)
    }
}

/// Runs `ip` with `args`; returns its output, or what it said on failure.
fn ip(args: &[&str]) -> Result<String, CaptureError> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(not_found)?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(CaptureError::Ip {
            command: format!("ip {}", args.join(" ")),
            said: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Runs `ip -force -batch -` on `commands` (one per line; -force goes on past a failure).
fn ip_batch(commands: &str) -> Result<(), CaptureError> {
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(not_found)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(commands.as_bytes())
            .map_err(|e| batch_failed(e.to_string()))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| batch_failed(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(batch_failed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ))
    }
}

fn batch_failed(said: String) -> CaptureError {
    CaptureError::Ip {
        command: "ip -batch".to_string(),
        said,
    }
}

fn not_found(error: std::io::Error) -> CaptureError {
    CaptureError::NoIp {
        reason: error.to_string(),
    }
}
