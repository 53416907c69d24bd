//! What the types of `weir.toml` cannot say: values in range, and paths that can be read.

use std::path::Path;

use super::{Config, SourceKind};

impl Config {
    /// Checks what the types cannot: returns the dotted key at fault and the message.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        let fail = |key, message: &str| Err((key, format!("{key}: {message}")));
        if self.node.name.trim().is_empty() {
            return fail(
                "node.name",
                "is empty: set it to the name of the Node weir runs on, e.g. name = \"node-a\", or set the NODE_NAME environment variable",
            );
        }
        match self.source.kind {
            SourceKind::Files if self.source.paths.is_empty() => {
                return fail(
                    "source.paths",
                    "is empty: with kind = \"files\", list the files or directories of objects, e.g. paths = [\"objects\"]",
                );
            }
            SourceKind::Kubernetes if !self.source.paths.is_empty() => {
                return fail(
                    "source.paths",
                    "is for kind = \"files\": with kind = \"kubernetes\" objects come from the API server; remove it",
                );
            }
            SourceKind::Kubernetes if self.policies.dir.is_some() => {
                return fail(
                    "policies.dir",
                    "is for kind = \"files\": with kind = \"kubernetes\" policies come from a ConfigMap; use policies.configmap or policies.selector",
                );
            }
            SourceKind::Kubernetes
                if self.policies.configmap.is_some() && self.policies.selector.is_some() =>
            {
                return fail(
                    "policies.selector",
                    "is set with policies.configmap: name one ConfigMap, or select several by label, not both",
                );
            }
            SourceKind::Files => {
                for (key, set) in [
                    ("source.kubeconfig", self.source.kubeconfig.is_some()),
                    ("source.namespace", self.source.namespace.is_some()),
                    (
                        "source.service_proxy_name",
                        self.source.service_proxy_name.is_some(),
                    ),
                    ("policies.configmap", self.policies.configmap.is_some()),
                    ("policies.selector", self.policies.selector.is_some()),
                ] {
                    if set {
                        return fail(
                            key,
                            "is for kind = \"kubernetes\": remove it, or set source.kind = \"kubernetes\"",
                        );
                    }
                }
            }
            SourceKind::Kubernetes => {}
        }
        if self
            .source
            .service_proxy_name
            .as_ref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return fail(
                "source.service_proxy_name",
                "is empty: remove it to proxy every Service without the service.kubernetes.io/service-proxy-name label, or give the label's value, e.g. \"weir\"",
            );
        }
        if self.node.addresses.as_ref().is_some_and(Vec::is_empty) {
            return fail(
                "node.addresses",
                "is empty: list the addresses NodePorts listen on, e.g. addresses = [\"127.0.0.1\"]",
            );
        }
        if self.proxy.connect_timeout.0.is_zero() {
            return fail(
                "proxy.connect_timeout",
                "is 0: give connects time, e.g. \"2s\"",
            );
        }
        if self.proxy.udp_timeout.0.is_zero() || self.proxy.udp_stream_timeout.0.is_zero() {
            return fail(
                "proxy.udp_timeout",
                "is 0: UDP flows need an idle timeout, e.g. \"30s\" (and udp_stream_timeout \"120s\")",
            );
        }
        if self.proxy.half_close_timeout.0.is_zero()
            || self.proxy.idle_timeout.is_some_and(|t| t.0.is_zero())
        {
            return fail(
                "proxy.half_close_timeout",
                "is 0: give half-closed (and idle) connections time, e.g. \"60s\"; leave idle_timeout out for none",
            );
        }
        if self.proxy.max_udp_flows == 0 || self.proxy.max_udp_flows_per_service == 0 {
            return fail(
                "proxy.max_udp_flows",
                "is 0: UDP Services need flows; give a cap such as 16384 (and max_udp_flows_per_service 4096)",
            );
        }
        if self.proxy.connect_attempts == 0 {
            return fail("proxy.connect_attempts", "is 0: it must be at least 1");
        }
        // A connection may try for connect_timeout × connect_attempts; routes and policy
        // ports are kept that long after they go. More than an hour is a mistake, and past
        // what a Duration holds it would stop the control plane.
        let trying = (self.proxy.connect_timeout.0)
            .checked_mul(self.proxy.connect_attempts)
            .filter(|total| *total <= std::time::Duration::from_secs(3600));
        if trying.is_none() {
            let message = format!(
                "× proxy.connect_attempts ({}) is over an hour: a connection would try that long; use seconds, e.g. \"2s\"",
                self.proxy.connect_attempts
            );
            return fail("proxy.connect_timeout", &message);
        }
        // Past a year a duration is a typo, and near what a Duration holds, adding it to
        // the clock overflows.
        let durations = [
            ("source.poll_interval", Some(self.source.poll_interval)),
            ("policies.poll_interval", Some(self.policies.poll_interval)),
            ("admin.metrics_linger", Some(self.admin.metrics_linger)),
            ("admin.health_timeout", Some(self.admin.health_timeout)),
            ("proxy.connect_timeout", Some(self.proxy.connect_timeout)),
            ("proxy.drop_timeout", Some(self.proxy.drop_timeout)),
            (
                "proxy.shutdown_grace_period",
                Some(self.proxy.shutdown_grace_period),
            ),
            ("proxy.udp_timeout", Some(self.proxy.udp_timeout)),
            (
                "proxy.udp_stream_timeout",
                Some(self.proxy.udp_stream_timeout),
            ),
            ("proxy.idle_timeout", self.proxy.idle_timeout),
            (
                "proxy.half_close_timeout",
                Some(self.proxy.half_close_timeout),
            ),
            ("limits.select_deadline", self.limits.select_deadline),
            ("limits.update_deadline", self.limits.update_deadline),
            ("limits.quarantine", self.limits.quarantine),
            ("limits.compile_timeout", self.limits.compile_timeout),
        ];
        for (key, duration) in durations {
            if duration.is_some_and(|d| d.0 > crate::units::MAX_DURATION) {
                return fail(
                    key,
                    "is over a year: write it in seconds, minutes or hours, e.g. \"30s\"",
                );
            }
        }
        if self.limits.memory_mib == Some(0) {
            return fail(
                "limits.memory_mib",
                "is 0: give policy instances at least 1 MiB",
            );
        }
        if self.limits.compile_timeout.is_some_and(|d| d.0.is_zero()) {
            return fail(
                "limits.compile_timeout",
                "is 0: give the compiler time, e.g. \"10s\"",
            );
        }
        if self.limits.compile_memory_mib.is_some_and(|mib| mib < 64) {
            return fail(
                "limits.compile_memory_mib",
                "is under 64: the compiler needs at least 64 MiB",
            );
        }
        if self.limits.max_module_kib == Some(0) {
            return fail("limits.max_module_kib", "is 0: modules need some room");
        }
        let ceiling = self.limits.max_memory_mib.unwrap_or(256);
        if ceiling == 0 || ceiling > 4096 {
            return fail(
                "limits.max_memory_mib",
                "must be between 1 and 4096 (a policy's memory is 32-bit)",
            );
        }
        if let Some(mib) = self.limits.memory_mib
            && mib > ceiling
        {
            return fail(
                "limits.memory_mib",
                &format!(
                    "is above limits.max_memory_mib ({ceiling}): raise the ceiling or lower the budget"
                ),
            );
        }
        if self.source.poll_interval.0.is_zero() {
            return fail(
                "source.poll_interval",
                "is 0: use a duration such as \"250ms\"",
            );
        }
        if self.policies.poll_interval.0.is_zero() {
            return fail(
                "policies.poll_interval",
                "is 0: use a duration such as \"250ms\"",
            );
        }
        Ok(())
    }

    /// Checks that every path the config names can be read now.
    pub fn check_paths(&self) -> Result<(), String> {
        for path in &self.source.paths {
            readable(path).map_err(|e| {
                format!(
                    "source.paths: cannot read {}: {e}; fix the path or its permissions",
                    path.display()
                )
            })?;
        }
        if let Some(path) = &self.source.kubeconfig {
            readable(path).map_err(|e| {
                format!(
                    "source.kubeconfig: cannot read {}: {e}; fix the path, or remove the key to use KUBECONFIG or the in-cluster service account",
                    path.display()
                )
            })?;
        }
        if let Some(dir) = &self.policies.dir {
            let metadata = std::fs::metadata(dir).map_err(|e| {
                format!(
                    "policies.dir: cannot read {}: {e}; create it, fix the path, or remove the key to run with the built-in kube-default only",
                    dir.display()
                )
            })?;
            if !metadata.is_dir() {
                return Err(format!(
                    "policies.dir: {} is not a directory: name a directory of NAME.wasm modules",
                    dir.display()
                ));
            }
            std::fs::read_dir(dir)
                .map_err(|e| format!("policies.dir: cannot read {}: {e}", dir.display()))?;
        }
        Ok(())
    }
}

fn readable(path: &Path) -> std::io::Result<()> {
    if std::fs::metadata(path)?.is_dir() {
        std::fs::read_dir(path).map(drop)
    } else {
        std::fs::File::open(path).map(drop)
    }
}
