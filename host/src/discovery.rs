//! Where Kubernetes objects come from. Every source produces the same [`Objects`].

pub mod files;
pub mod kubernetes;
pub mod watch;

use std::collections::BTreeSet;

pub use files::{Diagnostic, Objects, Origin, load_paths};

use crate::model::ServiceKey;

/// The source a proxy follows: files, or the Kubernetes API.
#[derive(Debug)]
pub enum Source {
    Files(watch::FileSource),
    Kubernetes(Box<kubernetes::KubeSource>),
}

impl Source {
    /// What changed since the last look.
    pub fn poll(&mut self) -> watch::Poll {
        match self {
            Source::Files(files) => files.poll(),
            Source::Kubernetes(kube) => kube.poll(),
        }
    }

    /// Every object.
    pub fn objects(&self) -> Objects {
        match self {
            Source::Files(files) => files.objects(),
            Source::Kubernetes(kube) => kube.objects(),
        }
    }

    /// The objects the ports of `services` are built from, and the Nodes.
    pub fn objects_for(&self, services: &BTreeSet<ServiceKey>) -> Objects {
        match self {
            Source::Files(files) => files.objects_for(services),
            Source::Kubernetes(kube) => kube.objects_for(services),
        }
    }

    pub fn kubernetes(&self) -> Option<&kubernetes::KubeSource> {
        match self {
            Source::Kubernetes(kube) => Some(kube),
            Source::Files(_) => None,
        }
    }
}
