//! Policy settings as JSON: the policy's own defaults (its `configure` text) with a
//! Service's `weir.dev/policy-config` annotation layered over them, read into the policy's
//! settings type with errors that name the field.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A parsed configuration: the policy's defaults, kept to layer each Service's over.
pub type Object = Map<String, Value>;

/// Parses a configuration text into a JSON object ("" and whitespace are `{}`).
pub fn object(text: &str) -> Result<Map<String, Value>, String> {
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!("expected a JSON object, got `{other}`")),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

/// `T` from `defaults` with the keys of `overrides` replacing theirs. Use
/// `#[serde(default, deny_unknown_fields)]` on `T` so a missing key keeps its default and
/// a misspelt one is an error naming it.
pub fn layered<T: DeserializeOwned>(
    defaults: &Map<String, Value>,
    overrides: Option<&str>,
) -> Result<T, String> {
    let mut merged = defaults.clone();
    if let Some(text) = overrides {
        merged.extend(object(text)?);
    }
    serde_json::from_value(Value::Object(merged)).map_err(|e| e.to_string())
}

/// Settings for one service: its annotation over the policy's defaults, or, when that is
/// wrong, the last good settings (else the defaults) and an error to log. Bad input never
/// stops a service from being served.
pub fn for_service<T: DeserializeOwned + Clone + Default>(
    defaults: &Map<String, Value>,
    service: &crate::Service,
    last_good: Option<&T>,
) -> (T, Option<String>) {
    match layered::<T>(defaults, service.config.as_deref()) {
        Ok(settings) => (settings, None),
        Err(error) => {
            let fallback = last_good
                .cloned()
                .or_else(|| layered::<T>(defaults, None).ok())
                .unwrap_or_default();
            let message = format!(
                "weir.dev/policy-config of {}: {error}; keeping the previous settings",
                service.display_name()
            );
            (fallback, Some(message))
        }
    }
}

/// A policy's settings type `T` with the policy's own configuration as the defaults that
/// each Service's `weir.dev/policy-config` is layered over. Keep one in the policy.
#[derive(Clone, Debug)]
pub struct Layered<T> {
    defaults: Object,
    settings: std::marker::PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned + Clone + Default> Layered<T> {
    /// From `configure`'s text: refuses settings `T` cannot read, naming the field.
    pub fn configure(config: &str) -> Result<Self, String> {
        let defaults = object(config)?;
        layered::<T>(&defaults, None)?;
        Ok(Layered {
            defaults,
            settings: std::marker::PhantomData,
        })
    }

    /// The policy's own settings, before any Service's annotation.
    pub fn defaults(&self) -> T {
        layered::<T>(&self.defaults, None).unwrap_or_default()
    }

    /// The settings for `service`. A bad annotation is logged and `last_good` (else the
    /// defaults) used instead: bad input never stops a service from being served.
    pub fn for_service(&self, service: &crate::Service, last_good: Option<&T>) -> T {
        let (settings, error) = for_service(&self.defaults, service, last_good);
        if let Some(error) = error {
            crate::log(crate::LogLevel::Warn, &error);
        }
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Clone, Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Settings {
        size: u32,
        name: String,
    }

    #[test]
    fn overrides_replace_defaults_key_by_key() {
        let defaults = object(r#"{"size": 7, "name": "a"}"#).unwrap();
        let s: Settings = layered(&defaults, Some(r#"{"name": "b"}"#)).unwrap();
        assert_eq!(
            s,
            Settings {
                size: 7,
                name: "b".into()
            }
        );
    }

    #[test]
    fn a_misspelt_key_is_named() {
        let error = layered::<Settings>(&Map::new(), Some(r#"{"sise": 1}"#)).unwrap_err();
        assert!(error.contains("unknown field `sise`"), "{error}");
    }

    #[test]
    fn bad_service_config_keeps_the_last_good_settings() {
        let mut service =
            crate::Service::cluster_ip("default", "web", "127.0.0.1".parse().unwrap(), 80);
        service.config = Some("{not json".into());
        let good = Settings {
            size: 3,
            name: "good".into(),
        };
        let (settings, error) = for_service(&Map::new(), &service, Some(&good));
        assert_eq!(settings, good);
        assert!(error.unwrap().contains("default/web:http"));
    }
}
