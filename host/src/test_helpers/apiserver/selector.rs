//! Label and field selectors, as LIST and WATCH take them.

use super::*;

/// The objects a LIST or WATCH selects: the namespace in its path, `labelSelector` and
/// `fieldSelector`.
#[derive(Debug, Default)]
pub(super) struct Selector {
    pub(super) labels: Vec<LabelRequirement>,
    /// (JSON pointer into the object, value, whether it must equal or differ).
    pub(super) fields: Vec<(&'static str, String, bool)>,
}

#[derive(Debug)]
pub(super) enum LabelRequirement {
    Exists(String),
    Absent(String),
    Equals(String, String),
    /// Also matches objects without the label, as in Kubernetes.
    NotEquals(String, String),
}

impl Selector {
    pub(super) fn parse(
        namespace: Option<&str>,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Selector, ApiError> {
        let mut selector = Selector::default();
        if let Some(namespace) = namespace {
            selector
                .fields
                .push(("/metadata/namespace", namespace.to_string(), true));
        }
        for term in terms(labels) {
            selector.labels.push(parse_label_requirement(term)?);
        }
        for term in terms(fields) {
            let (field, value, equal) = if let Some((field, value)) = term.split_once("!=") {
                (field, value, false)
            } else if let Some((field, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                (field, value, true)
            } else {
                return Err(bad_request(format!("invalid field selector term {term:?}")));
            };
            let pointer = match field.trim() {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                other => {
                    return Err(bad_request(format!("field label not supported: {other}")));
                }
            };
            selector
                .fields
                .push((pointer, value.trim().to_string(), equal));
        }
        Ok(selector)
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        let label = |key: &str| object["metadata"]["labels"][key].as_str();
        let labels_match = self.labels.iter().all(|requirement| match requirement {
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::Absent(key) => label(key).is_none(),
            LabelRequirement::Equals(key, value) => label(key) == Some(value),
            LabelRequirement::NotEquals(key, value) => label(key) != Some(value),
        });
        labels_match
            && self.fields.iter().all(|(pointer, value, equal)| {
                let actual = object
                    .pointer(pointer)
                    .and_then(Value::as_str)
                    .unwrap_or("");
                (actual == value) == *equal
            })
    }
}

/// The non-empty comma-separated terms of a selector.
pub(super) fn terms(selector: Option<&str>) -> impl Iterator<Item = &str> {
    selector
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
}

/// `key`, `!key`, `key=value`, `key==value` or `key!=value`; set-based terms (`in`,
/// `notin`) and anything else are rejected.
pub(super) fn parse_label_requirement(term: &str) -> Result<LabelRequirement, ApiError> {
    let key_ok = |key: &str| {
        !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    let value_ok = |value: &str| {
        value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let requirement = if let Some(key) = term.strip_prefix('!') {
        LabelRequirement::Absent(key.trim().to_string())
    } else if let Some((key, value)) = term.split_once("!=") {
        LabelRequirement::NotEquals(key.trim().to_string(), value.trim().to_string())
    } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        LabelRequirement::Equals(key.trim().to_string(), value.trim().to_string())
    } else {
        LabelRequirement::Exists(term.to_string())
    };
    let valid = match &requirement {
        LabelRequirement::Exists(key) | LabelRequirement::Absent(key) => key_ok(key),
        LabelRequirement::Equals(key, value) | LabelRequirement::NotEquals(key, value) => {
            key_ok(key) && value_ok(value)
        }
    };
    if valid {
        Ok(requirement)
    } else {
        Err(bad_request(format!(
            "unable to parse requirement {term:?}: the fake API server supports key, !key, \
             key=value, key==value and key!=value"
        )))
    }
}
