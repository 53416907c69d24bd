//! Per-policy settings shipped beside the modules: the `policies.toml` key of a policies
//! ConfigMap. Each table is named after a policy:
//!
//! ```toml
//! [maglev]
//! sha256 = "9f2c…"          # a module under this name with another digest is refused
//! failure_mode = "closed"   # for its Services without a weir.dev/failure-mode annotation
//! config = '{"table_size": 65537}'  # the policy's own configuration (JSON)
//! memory_mib = 32           # each service port's memory budget
//!
//! [default]                 # reserved: the node's default policy (`policies.default`)
//! policy = "maglev"         # for Services without a weir.dev/policy annotation
//! config = '{"hash": "client-ip"}'  # what they give it, unless annotated
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use super::FailureMode;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// The only module accepted under this name, by its sha256 (hex).
    pub sha256: Option<String>,
    /// The failure mode of the Services using it, unless annotated.
    pub failure_mode: Option<FailureMode>,
    /// The policy's configuration, passed to its `configure`.
    pub config: Option<String>,
    /// Each of its service ports' memory budget in MiB, unless the Service's
    /// `weir.dev/policy-memory-mib` says otherwise (within `limits.max_memory_mib`).
    pub memory_mib: Option<u32>,
}

/// The `[default]` table: the policy of Services that name none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultPolicy {
    pub policy: String,
    /// Given to the policy as the Services' `weir.dev/policy-config` would be.
    pub config: Option<String>,
}

/// A whole `policies.toml`: the default policy, and each policy's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shipped {
    pub default: Option<DefaultPolicy>,
    pub policies: BTreeMap<String, PolicySettings>,
}

impl<'de> Deserialize<'de> for Shipped {
    // By hand rather than with `flatten`, so that an error in any table keeps its line.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Tables;
        impl<'de> serde::de::Visitor<'de> for Tables {
            type Value = Shipped;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("tables named after policies, and an optional [default]")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Shipped, A::Error> {
                let mut shipped = Shipped::default();
                while let Some(name) = map.next_key::<String>()? {
                    if name == "default" {
                        shipped.default = Some(map.next_value()?);
                    } else {
                        let settings = map.next_value()?;
                        shipped.policies.insert(name, settings);
                    }
                }
                Ok(shipped)
            }
        }
        deserializer.deserialize_map(Tables)
    }
}

impl PolicySettings {
    pub fn failure_mode(&self) -> Option<FailureMode> {
        self.failure_mode
    }
}

/// Why a `policies.toml` was refused; the message names the line or table, the key and
/// what is accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("line {line}: {message}")]
    At { line: usize, message: String },
    #[error("{message}")]
    Toml { message: String },
    #[error(
        "[{policy}] sha256 = \"{pin}\" is not a sha256: give the 64 hex digits `sha256sum {policy}.wasm` prints"
    )]
    NotSha256 { policy: String, pin: String },
}

/// Parses a `policies.toml`.
pub fn parse(text: &str) -> Result<Shipped, SettingsError> {
    let settings: Shipped = toml::from_str(text).map_err(|e| {
        let message = e.message().to_string();
        match e.span() {
            Some(span) => SettingsError::At {
                line: text[..span.start].matches('\n').count() + 1,
                message,
            },
            None => SettingsError::Toml { message },
        }
    })?;
    for (name, policy) in &settings.policies {
        if let Some(pin) = &policy.sha256
            && (pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(SettingsError::NotSha256 {
                policy: name.clone(),
                pin: pin.clone(),
            });
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
        let settings = parse(&text).unwrap().policies;
        assert_eq!(settings["maglev"].sha256.as_deref(), Some(pin.as_str()));
        assert_eq!(settings["maglev"].failure_mode(), Some(FailureMode::Closed));
        assert_eq!(settings["maglev"].config.as_deref(), Some("{\"a\": 1}"));
        assert_eq!(settings["random"], PolicySettings::default());

        let error = parse("[maglev]\nfailure = \"closed\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("line 2:") && error.contains("failure_mode"),
            "{error}"
        );
        let error = parse("[maglev]\nsha256 = \"abc\"\n").unwrap_err();
        assert!(matches!(&error, SettingsError::NotSha256 { policy, .. } if policy == "maglev"));
        let error = error.to_string();
        assert!(error.contains("64 hex digits"), "{error}");
    }

    #[test]
    fn the_default_table_names_the_nodes_default_policy() {
        let shipped =
            parse("[default]\npolicy = \"maglev\"\nconfig = '{}'\n[maglev]\nmemory_mib = 32\n")
                .unwrap();
        assert_eq!(
            shipped.default,
            Some(DefaultPolicy {
                policy: "maglev".into(),
                config: Some("{}".into())
            })
        );
        assert_eq!(shipped.policies["maglev"].memory_mib, Some(32));
        let error = parse("[default]\nname = \"maglev\"\n").unwrap_err();
        assert!(
            matches!(error, SettingsError::At { line: 2, .. }),
            "{error:?}"
        );
        let error = error.to_string();
        assert!(
            error.starts_with("line 2:") && error.contains("policy"),
            "{error}"
        );
    }
}
