//! Per-policy settings shipped beside the modules: the `policies.toml` key of a policies
//! ConfigMap. Each table is named after a policy:
//!
//! ```toml
//! [maglev]
//! sha256 = "9f2c…"          # a module under this name with another digest is refused
//! failure_mode = "closed"   # for its Services without a weir.dev/failure-mode annotation
//! config = '{"table_size": 65537}'  # the policy's own configuration (JSON)
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use super::FailureMode;
use crate::config::FailureModeConfig;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// The only module accepted under this name, by its sha256 (hex).
    pub sha256: Option<String>,
    /// The failure mode of the Services using it, unless annotated.
    pub failure_mode: Option<FailureModeConfig>,
    /// The policy's configuration, passed to its `configure`.
    pub config: Option<String>,
}

impl PolicySettings {
    pub fn failure_mode(&self) -> Option<FailureMode> {
        self.failure_mode.map(FailureMode::from)
    }
}

/// Parses a `policies.toml`. Errors name the line, the key and what is accepted.
pub fn parse(text: &str) -> Result<BTreeMap<String, PolicySettings>, String> {
    let settings: BTreeMap<String, PolicySettings> = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start].matches('\n').count() + 1);
        let message = e.message().to_string();
        match line {
            Some(line) => format!("line {line}: {message}"),
            None => message,
        }
    })?;
    for (name, policy) in &settings {
        if let Some(pin) = &policy.sha256
            && (pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!(
                "[{name}] sha256 = \"{pin}\" is not a sha256: give the 64 hex digits `sha256sum {name}.wasm` prints"
            ));
        }
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_and_their_errors() {
        let pin = "ab".repeat(32);
        let text = format!(
            "[maglev]\nsha256 = \"{pin}\"\nfailure_mode = \"closed\"\nconfig = '{{\"a\": 1}}'\n[random]\n"
        );
        let settings = parse(&text).unwrap();
        assert_eq!(settings["maglev"].sha256.as_deref(), Some(pin.as_str()));
        assert_eq!(settings["maglev"].failure_mode(), Some(FailureMode::Closed));
        assert_eq!(settings["maglev"].config.as_deref(), Some("{\"a\": 1}"));
        assert_eq!(settings["random"], PolicySettings::default());

        let error = parse("[maglev]\nfailure = \"closed\"\n").unwrap_err();
        assert!(
            error.starts_with("line 2:") && error.contains("failure_mode"),
            "{error}"
        );
        let error = parse("[maglev]\nsha256 = \"abc\"\n").unwrap_err();
        assert!(error.contains("64 hex digits"), "{error}");
    }
}
