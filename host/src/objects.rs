//! The Kubernetes objects weir reads, whatever their source, with where each came from,
//! and the diagnostics bad input turns into.

use std::fmt;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Where an object was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based document number in a multi-document file (`None` when the file has one).
    pub document: Option<usize>,
    /// Index in a `List`'s `items`.
    pub item: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(document) = self.document {
            write!(f, " (document {document})")?;
        }
        if let Some(item) = self.item {
            write!(f, " items[{item}]")?;
        }
        Ok(())
    }
}

/// An object and where it came from.
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub origin: Origin,
    /// Shared: a sync copies the objects it builds from, and only the pointers are copied.
    pub object: std::sync::Arc<T>,
}

/// The objects weir uses, in the order they were read.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Sourced<Service>>,
    pub endpoint_slices: Vec<Sourced<EndpointSlice>>,
    pub nodes: Vec<Sourced<Node>>,
}

impl Objects {
    /// How many objects of every kind.
    pub fn len(&self) -> usize {
        self.services.len() + self.endpoint_slices.len() + self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The input could not be used at all (unreadable file, malformed YAML, wrong types).
    Error,
    /// The input was used, but part of it was ignored, as kube-proxy would.
    Warning,
}

/// A problem with the input, for people: where, which object, what, and the fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The file (and document or item) the problem is in.
    pub origin: String,
    /// `Kind namespace/name`, when the problem is in one object.
    pub object: Option<String>,
    pub message: String,
}

impl Diagnostic {
    pub fn error(
        origin: impl ToString,
        object: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity: Severity::Error,
            origin: origin.to_string(),
            object,
            message: message.into(),
        }
    }

    pub fn warning(
        origin: impl ToString,
        object: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            origin: origin.to_string(),
            object,
            message: message.into(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{severity}: {}", self.origin)?;
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        write!(f, ": {}", self.message)
    }
}
