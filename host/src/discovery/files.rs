//! Kubernetes objects from YAML or JSON files, as `kubectl get -o yaml` prints them:
//! single objects, multi-document files and `kind: List`. Bad input becomes a diagnostic
//! naming the file, the document or list item, the object and the field.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

pub use crate::objects::{Diagnostic, Objects, Origin, Severity, Sourced};

/// Reads every path (a file, or a directory searched recursively for `.yaml`, `.yml` and
/// `.json` files, in name order).
pub fn load_paths(paths: &[PathBuf]) -> (Objects, Vec<Diagnostic>) {
    let mut objects = Objects::default();
    let mut diagnostics = Vec::new();
    for path in paths {
        let mut files = Vec::new();
        if let Err(error) = collect_files(path, true, &mut files) {
            diagnostics.push(Diagnostic::error(
                path.display(),
                None,
                format!("cannot read: {error}"),
            ));
            continue;
        }
        if files.is_empty() {
            diagnostics.push(Diagnostic::warning(
                path.display(),
                None,
                "no .yaml, .yml or .json files here",
            ));
        }
        for file in files {
            match read_text(&file) {
                Ok(text) => load_str(&file, &text, &mut objects, &mut diagnostics),
                Err(error) => diagnostics.push(Diagnostic::error(file.display(), None, error)),
            }
        }
    }
    (objects, diagnostics)
}

pub(crate) fn collect_files(
    path: &Path,
    explicit: bool,
    out: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let metadata = std::fs::metadata(path)?;
    if metadata.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        entries.sort();
        for entry in entries {
            match collect_files(&entry, false, out) {
                // Deleted while the directory was read (an editor's probe file), or a
                // dangling symlink: not a file of objects, and no reason to stop.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                result => result?,
            }
        }
    } else if explicit
        || path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
    {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Parses the text of one file (YAML, which includes JSON) into `objects`.
pub fn load_str(file: &Path, text: &str, objects: &mut Objects, diagnostics: &mut Vec<Diagnostic>) {
    let documents = if text.trim_start().starts_with(['{', '[']) {
        // JSON, or YAML written in flow style (`{apiVersion: v1, ...}`): JSON first, and
        // the YAML parser (which reads JSON too, but not tabs) when that fails.
        let mut json_errors = Vec::new();
        let documents = json_documents(file, text, &mut json_errors);
        if json_errors.is_empty() {
            documents
        } else {
            let mut yaml_errors = Vec::new();
            let documents = yaml_documents(file, text, &mut yaml_errors);
            let errors = if yaml_errors.is_empty() {
                yaml_errors
            } else {
                json_errors
            };
            diagnostics.extend(errors);
            documents
        }
    } else {
        yaml_documents(file, text, diagnostics)
    };
    let multi = documents.len() > 1;
    for (index, value) in documents.into_iter().enumerate() {
        let origin = Origin {
            file: file.to_path_buf(),
            document: multi.then_some(index + 1),
            item: None,
        };
        load_value(origin, value, objects, diagnostics);
    }
}

/// JSON as `kubectl get -o json` prints it (one value, or several in a row), read with a
/// JSON parser so tabs and other JSON-only text never trip the YAML one.
fn json_documents(file: &Path, text: &str, diagnostics: &mut Vec<Diagnostic>) -> Vec<Value> {
    collect_documents(file, crate::yaml::json_documents(text), diagnostics)
}

fn yaml_documents(file: &Path, text: &str, diagnostics: &mut Vec<Diagnostic>) -> Vec<Value> {
    collect_documents(file, crate::yaml::documents(text), diagnostics)
}

/// The documents, or the syntax error with its position: one error makes the whole file
/// bad (the objects of its last good version keep serving).
fn collect_documents(
    file: &Path,
    documents: Result<Vec<Value>, crate::yaml::SyntaxError>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<Value> {
    match documents {
        Ok(documents) => documents,
        Err(error) => {
            diagnostics.push(Diagnostic::error(
                file.display(),
                None,
                format!("malformed YAML/JSON {error}"),
            ));
            Vec::new()
        }
    }
}

/// The text of a file of objects, refusing one larger than [`crate::yaml::MAX_FILE_BYTES`]
/// before reading it.
pub(crate) fn read_text(file: &Path) -> Result<String, String> {
    use std::io::Read;
    let limit = crate::yaml::MAX_FILE_BYTES;
    let handle = std::fs::File::open(file).map_err(|e| format!("cannot read: {e}"))?;
    let mut text = String::new();
    handle
        .take(limit + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > limit {
        return Err(format!(
            "larger than {} MiB, the most weir reads from one file; split it into several files",
            limit / (1024 * 1024)
        ));
    }
    Ok(text)
}

fn load_value(
    origin: Origin,
    value: Value,
    objects: &mut Objects,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let Value::Object(map) = &value else {
        if !value.is_null() {
            diagnostics.push(Diagnostic::error(
                origin,
                None,
                "not a Kubernetes object: expected a mapping with apiVersion and kind",
            ));
        }
        return;
    };
    let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let Some(kind) = map.get("kind").and_then(Value::as_str) else {
        diagnostics.push(Diagnostic::error(
            origin,
            None,
            "object has no `kind`; every object needs apiVersion and kind (e.g. `apiVersion: v1`, `kind: Service`)",
        ));
        return;
    };
    if kind.ends_with("List") && map.get("items").is_some_and(Value::is_array) {
        let items = map
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (index, item) in items.into_iter().enumerate() {
            let origin = Origin {
                item: Some(index),
                ..origin.clone()
            };
            load_value(origin, item, objects, diagnostics);
        }
        return;
    }
    let name = object_name(kind, map);
    match (api_version, kind) {
        ("v1", "Service") => {
            if let Some(object) = decode::<Service>(&origin, &name, value, diagnostics) {
                objects.services.push(Sourced {
                    origin,
                    object: object.into(),
                });
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            if let Some(object) = decode::<EndpointSlice>(&origin, &name, value, diagnostics) {
                objects.endpoint_slices.push(Sourced {
                    origin,
                    object: object.into(),
                });
            }
        }
        ("v1", "Node") => {
            if let Some(object) = decode::<Node>(&origin, &name, value, diagnostics) {
                objects.nodes.push(Sourced {
                    origin,
                    object: object.into(),
                });
            }
        }
        (_, "Service" | "Node") if api_version != "v1" => diagnostics.push(Diagnostic::error(
            origin,
            Some(name),
            format!("apiVersion `{api_version}` is not served for {kind}; use `apiVersion: v1`"),
        )),
        (_, "EndpointSlice") => diagnostics.push(Diagnostic::error(
            origin,
            Some(name),
            format!(
                "apiVersion `{api_version}` is not supported for EndpointSlice; use `apiVersion: discovery.k8s.io/v1`"
            ),
        )),
        _ => diagnostics.push(Diagnostic::warning(
            origin,
            Some(name),
            format!("skipped: weir uses only v1 Service, discovery.k8s.io/v1 EndpointSlice and v1 Node, not {api_version} {kind}"),
        )),
    }
}

fn object_name(kind: &str, map: &serde_json::Map<String, Value>) -> String {
    let metadata = map.get("metadata");
    let field = |key: &str| {
        metadata
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let name = field("name").unwrap_or_else(|| "<no name>".to_string());
    match (kind, field("namespace")) {
        ("Node", _) => format!("Node {name}"),
        (_, Some(namespace)) => format!("{kind} {namespace}/{name}"),
        (_, None) => format!("{kind} default/{name}"),
    }
}

fn decode<T: serde::de::DeserializeOwned + HasMetadata>(
    origin: &Origin,
    name: &str,
    value: Value,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(mut object) => {
            let metadata = object.metadata_mut();
            if metadata.name.as_deref().unwrap_or("").is_empty() {
                diagnostics.push(Diagnostic::error(
                    origin,
                    Some(name.to_string()),
                    "metadata.name is missing; every object needs a name",
                ));
                return None;
            }
            if T::NAMESPACED && metadata.namespace.is_none() {
                // As `kubectl apply` does without `-n`.
                metadata.namespace = Some("default".to_string());
            }
            Some(object)
        }
        Err(error) => {
            let path = error.path().to_string();
            diagnostics.push(Diagnostic::error(
                origin,
                Some(name.to_string()),
                format!("field `{path}`: {}", error.inner()),
            ));
            None
        }
    }
}

trait HasMetadata {
    const NAMESPACED: bool;
    fn metadata_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
}

impl HasMetadata for Service {
    const NAMESPACED: bool = true;
    fn metadata_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}

impl HasMetadata for EndpointSlice {
    const NAMESPACED: bool = true;
    fn metadata_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}

impl HasMetadata for Node {
    const NAMESPACED: bool = false;
    fn metadata_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (Objects, Vec<Diagnostic>) {
        let mut objects = Objects::default();
        let mut diagnostics = Vec::new();
        load_str(
            Path::new("objects.yaml"),
            text,
            &mut objects,
            &mut diagnostics,
        );
        (objects, diagnostics)
    }

    #[test]
    fn multi_document_yaml_loads_every_object() {
        let (objects, diagnostics) = load(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 127.0.0.10}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n",
        );
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        assert_eq!(objects.services.len(), 1);
        assert_eq!(objects.nodes.len(), 1);
        assert_eq!(
            objects.services[0].object.metadata.namespace.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn kind_list_is_unpacked() {
        let (objects, diagnostics) = load(
            r#"{"apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "x"}},
                {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": "a-1", "namespace": "x"}, "addressType": "IPv4", "endpoints": []}]}"#,
        );
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        assert_eq!(objects.services.len(), 1);
        assert_eq!(objects.endpoint_slices.len(), 1);
        assert_eq!(objects.endpoint_slices[0].origin.item, Some(1));
    }

    #[test]
    fn wrong_field_type_names_the_field() {
        let (_, diagnostics) = load(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - port: http\n",
        );
        assert_eq!(diagnostics.len(), 1);
        let text = diagnostics[0].to_string();
        assert!(text.contains("objects.yaml"), "{text}");
        assert!(text.contains("Service default/web"), "{text}");
        assert!(text.contains("spec.ports[0].port"), "{text}");
    }

    #[test]
    fn malformed_yaml_names_the_line() {
        let (_, diagnostics) = load("apiVersion: v1\nkind: Service\nmetadata: {name: [\n");
        assert_eq!(diagnostics.len(), 1);
        assert!(diagnostics[0].is_error());
        assert!(
            diagnostics[0].message.contains("line"),
            "{}",
            diagnostics[0]
        );
    }

    #[test]
    fn kubectl_json_with_tabs_is_read_as_json() {
        let (objects, diagnostics) = load(
            "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"List\",\n\t\"items\": [{\"apiVersion\": \"v1\", \"kind\": \"Node\", \"metadata\": {\"name\": \"n\"}}]\n}\n",
        );
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        assert_eq!(objects.nodes.len(), 1);
    }

    #[test]
    fn flow_style_yaml_is_not_mistaken_for_json() {
        let (objects, diagnostics) = load("{apiVersion: v1, kind: Node, metadata: {name: n}}\n");
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        assert_eq!(objects.nodes.len(), 1);
    }

    #[test]
    fn malformed_json_names_the_line() {
        let (_, diagnostics) =
            load("{\"apiVersion\": \"v1\",\n \"kind\": \"Node\" \"metadata\"}\n");
        assert_eq!(diagnostics.len(), 1);
        assert!(
            diagnostics[0].message.contains("line 2"),
            "{}",
            diagnostics[0]
        );
    }

    #[test]
    fn unknown_kinds_are_skipped_with_a_warning() {
        let (objects, diagnostics) =
            load("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n");
        assert_eq!(objects.services.len(), 0);
        assert_eq!(diagnostics.len(), 1);
        assert!(!diagnostics[0].is_error());
        assert!(diagnostics[0].message.contains("apps/v1 Deployment"));
    }
}
