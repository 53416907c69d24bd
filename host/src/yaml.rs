//! YAML and JSON text to JSON values, strictly and within a budget: a file of objects is
//! untrusted input. Duplicate keys are an error naming the key and its line (the last no
//! longer wins silently); YAML anchors and aliases are budgeted so that an alias bomb is
//! refused instead of expanded, nesting is capped, and so is the size of a file.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The largest file of objects weir reads (a `kubectl get -A -o yaml` of a large cluster's
/// Services and EndpointSlices stays well below it).
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// How deeply mappings and sequences may nest (a Kubernetes object needs about ten).
pub const MAX_DEPTH: usize = 32;
/// YAML aliases (`*name`) in one file: `kubectl` never writes them, people sometimes do, an
/// alias bomb needs many.
pub const MAX_ALIASES: usize = 100;

/// Where and why the text could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    /// Line and column, from 1.
    pub at: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, column)) => write!(f, "at line {line}, column {column}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// YAML 1.2's core schema, as `serde_yaml` read it: `n`, `no` and `off` are strings (a Node
/// named `n` stays named `n`), `0755` and `1_000` too.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 20_000,
        },
        budget: serde_saphyr::budget! {
            max_aliases: MAX_ALIASES,
            max_anchors: MAX_ALIASES,
            max_recorded_anchor_events: 20_000,
            max_recorded_anchor_bytes: 1024 * 1024,
            max_depth: MAX_DEPTH,
            max_events: 50_000_000,
            max_nodes: 25_000_000,
            max_documents: 1_000_000,
            max_total_scalar_bytes: MAX_FILE_BYTES as usize,
        },
    }
}

/// Every YAML document of `text` (empty documents skipped), or the first error. Duplicate
/// keys are errors.
pub fn documents(text: &str) -> Result<Vec<Value>, SyntaxError> {
    serde_saphyr::from_multiple_with_options::<Value>(text, options()).map_err(|error| {
        let at = error
            .location()
            .map(|l| (l.line() as usize, l.column() as usize));
        SyntaxError {
            at,
            message: plain_message(&error.to_string()),
        }
    })
}

/// One YAML document (or none, as null).
pub fn document(text: &str) -> Result<Value, SyntaxError> {
    let mut all = documents(text)?;
    match all.len() {
        0 => Ok(Value::Null),
        1 => Ok(all.remove(0)),
        n => Err(SyntaxError {
            at: None,
            message: format!("expected one YAML document, found {n}"),
        }),
    }
}

/// The parser's first line, without its `error: line L column C:` prefix and its advice to
/// the parser's own users, and with budget breaches said in the reader's terms.
fn plain_message(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or(rendered);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let first = match first.strip_prefix("line ") {
        Some(rest) => rest.split_once(": ").map_or(first, |(_, message)| message),
        None => first,
    };
    let first = first
        .split(", set DuplicateKeyPolicy")
        .next()
        .unwrap_or(first);
    if first.contains("budget breached") {
        let what = if first.contains("Alias")
            || first.contains("Anchor")
            || first.contains("Recorded")
        {
            format!(
                "more than {MAX_ALIASES} YAML anchors or aliases, or aliases that expand too far"
            )
        } else if first.contains("Depth") {
            format!("nested more than {MAX_DEPTH} levels deep")
        } else {
            first.to_string()
        };
        return format!(
            "{what}: weir refuses it; write the objects out in full, as `kubectl get -o yaml` does"
        );
    }
    first.to_string()
}

/// Every JSON value of `text` (one, or several in a row, as `kubectl get -o json` prints
/// them). Duplicate keys are errors.
pub fn json_documents(text: &str) -> Result<Vec<Value>, SyntaxError> {
    let mut values = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Strict>();
    for value in &mut stream {
        match value {
            Ok(Strict(value)) => values.push(value),
            Err(error) => {
                let message = error.to_string();
                let message = message.split(" at line ").next().unwrap_or(&message);
                return Err(SyntaxError {
                    at: Some((error.line(), error.column())),
                    message: message.to_string(),
                });
            }
        }
    }
    Ok(values)
}

/// A JSON value whose objects have no duplicate keys.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut seen = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(value) = map.next_value_seed(StrictSeed)?;
            if seen.insert(key.clone(), value).is_some() {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
        }
        Ok(Value::Object(seen.into_iter().collect()))
    }
}

struct StrictSeed;

impl<'de> DeserializeSeed<'de> for StrictSeed {
    type Value = Strict;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Strict, D::Error> {
        Strict::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_duplicate_keys_name_the_key_and_line() {
        let error = documents("kind: Service\nmetadata:\n  annotations:\n    weir.dev/policy: a\n    weir.dev/policy: b\n").unwrap_err();
        assert_eq!(error.at.map(|a| a.0), Some(5), "{error}");
        assert!(error.message.contains("duplicate"), "{error}");
        assert!(error.message.contains("weir.dev/policy"), "{error}");
        assert!(!error.message.contains("DuplicateKeyPolicy"), "{error}");
    }

    #[test]
    fn json_duplicate_keys_name_the_key_and_line() {
        let error = json_documents(
            "{\"spec\": {\n \"clusterIP\": \"198.18.0.1\",\n \"clusterIP\": \"198.18.0.2\"}}",
        )
        .unwrap_err();
        assert_eq!(error.at.map(|a| a.0), Some(3), "{error}");
        assert!(
            error.message.contains("duplicate key `clusterIP`"),
            "{error}"
        );
    }

    /// The shape of the 48 KB file that took a parser to 2.7 GB: each level aliases the
    /// one before nine times. Refused quickly, with a message that says why.
    #[test]
    fn an_alias_bomb_is_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for level in 1..12 {
            let previous = format!("*a{}", level - 1);
            let items = [previous.as_str(); 9].join(", ");
            text.push_str(&format!("a{level}: &a{level} [{items}]\n"));
        }
        let started = std::time::Instant::now();
        let error = documents(&text).unwrap_err();
        assert!(error.message.contains("aliases"), "{error}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_few_aliases_still_read() {
        let values = documents("a: &ports [{port: 80}]\nb: *ports\n").unwrap();
        assert_eq!(values[0]["b"][0]["port"], 80);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut text = String::new();
        for depth in 0..200 {
            text.push_str(&" ".repeat(depth));
            text.push_str("a:\n");
        }
        let error = documents(&text).unwrap_err();
        assert!(error.message.contains("nested more than 32"), "{error}");
        let json = "[".repeat(5000) + &"]".repeat(5000);
        assert!(json_documents(&json).is_err());
    }

    #[test]
    fn scalars_resolve_as_kubectl_writes_them() {
        let values = documents(
            "a: 80\nb: \"80\"\nc: true\nd: null\ne: 1.5\ny: no\nz: 0755\n---\n---\nf: x\n",
        )
        .unwrap();
        assert_eq!(values[0]["y"], "no", "YAML 1.2: not a boolean");
        assert_eq!(values[0]["z"], "0755");
        assert_eq!(values.len(), 2, "the empty document is skipped");
        assert_eq!(values[0]["a"], 80);
        assert_eq!(values[0]["b"], "80");
        assert_eq!(values[0]["c"], true);
        assert!(values[0]["d"].is_null());
        assert_eq!(values[1]["f"], "x");
        assert!(documents("").unwrap().is_empty());
        assert!(documents("# only a comment\n").unwrap().is_empty());
    }
}
