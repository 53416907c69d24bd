//! Transparent source towards this node's endpoints (`proxy.transparent`): for external
//! traffic that externalTrafficPolicy Local keeps on this node, weir connects to the pod
//! from the client's own address (`IP_TRANSPARENT`), so the pod sees what kube-proxy
//! would show it. Internal traffic is left alone: its clients are pods, and one on the
//! same bridge as the endpoint would get the endpoint's replies directly, around weir.
//!
//! The pod's replies are addressed to the client, not to weir; the node must hand them
//! to weir's socket instead of routing them on. That is the policy routing transparent
//! proxies use, which weir sets up at start and removes at exit:
//!
//! - an nftables table `inet weir_transparent` marks packets that belong to a local
//!   transparent socket (`socket transparent 1`) with [`MARK`];
//! - `ip rule fwmark MARK lookup TABLE` and `local default dev lo` in [`TABLE`] deliver
//!   them locally.
//!
//! Where the kernel or weir's capabilities do not allow it, weir says so once and
//! connects from its own address, as before.

use std::io::Write;
use std::process::{Command, Stdio};

/// The firewall mark of replies to transparent connections (a bit no common CNI or
/// kube-proxy uses).
pub const MARK: u32 = 0x0020_0000;
/// The routing table that delivers them locally.
pub const TABLE: u32 = 2597;
/// The rule's priority: after `local` (0), before `main` (32766).
const PRIORITY: u32 = 2597;
const NFT_TABLE: &str = "weir_transparent";

/// The policy routing, installed; removed when dropped.
#[derive(Debug)]
pub struct Transparent {
    ipv6: bool,
}

impl Transparent {
    /// Installs the policy routing (replacing what a previous run left). IPv6 is set up
    /// where the node has it.
    pub fn install() -> Result<Transparent, String> {
        remove();
        let ruleset = format!(
            "table inet {NFT_TABLE} {{\n  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n    \
             socket transparent 1 meta mark set meta mark or {MARK:#x}\n  }}\n}}\n"
        );
        nft(&ruleset).map_err(|e| format!("cannot add the nftables table {NFT_TABLE}: {e}"))?;
        let routing = |family: &str| -> Result<(), String> {
            ip(&[
                family,
                "rule",
                "add",
                "fwmark",
                &format!("{MARK:#x}/{MARK:#x}"),
                "lookup",
                &TABLE.to_string(),
                "priority",
                &PRIORITY.to_string(),
            ])?;
            ip(&[
                family,
                "route",
                "replace",
                "local",
                "default",
                "dev",
                "lo",
                "table",
                &TABLE.to_string(),
            ])
        };
        if let Err(error) = routing("-4") {
            remove();
            return Err(format!("cannot add the policy routing: {error}"));
        }
        let ipv6 = routing("-6").is_ok();
        Ok(Transparent { ipv6 })
    }

    pub fn ipv6(&self) -> bool {
        self.ipv6
    }
}

impl Drop for Transparent {
    fn drop(&mut self) {
        remove();
    }
}

/// Removes what weir installs, whatever of it is there.
pub fn remove() {
    let _ = nft(&format!("delete table inet {NFT_TABLE}\n"));
    for family in ["-4", "-6"] {
        while ip(&[family, "rule", "del", "priority", &PRIORITY.to_string()]).is_ok() {}
        let _ = ip(&[family, "route", "flush", "table", &TABLE.to_string()]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn nft(ruleset: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `nft` (install nftables): {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(ruleset.as_bytes())
        .map_err(|e| e.to_string())?;
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

/// Connects to `target` from `client`'s address (its port when free, else another),
/// with `IP_TRANSPARENT`.
pub async fn connect(
    client: std::net::SocketAddr,
    target: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    let raw = socket2::SockRef::from(&socket);
    if target.is_ipv4() {
        raw.set_ip_transparent_v4(true)?;
    } else {
        raw.set_ip_transparent_v6(true)?;
    }
    socket.set_reuseaddr(true)?;
    if let Err(error) = socket.bind(client) {
        if error.kind() != std::io::ErrorKind::AddrInUse {
            return Err(error);
        }
        socket.bind(std::net::SocketAddr::new(client.ip(), 0))?;
    }
    socket.connect(target).await
}
