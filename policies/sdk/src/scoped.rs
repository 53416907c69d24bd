//! A value per traffic scope (a table, a schedule, a counter), built from each scope's
//! eligible set in `update` and used by `select` for the connection's scope.

use crate::types::{Eligibility, EndpointId, Scope};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PerScope<T> {
    pub internal: T,
    pub external: T,
}

impl<T: Clone> PerScope<T> {
    /// Builds one value per scope; when both scopes have the same endpoints (the common
    /// case), builds once and clones.
    pub fn build(eligibility: &Eligibility, mut build: impl FnMut(&[EndpointId]) -> T) -> Self {
        let internal = build(&eligibility.internal.endpoints);
        let external = if eligibility.external.endpoints == eligibility.internal.endpoints {
            internal.clone()
        } else {
            build(&eligibility.external.endpoints)
        };
        PerScope { internal, external }
    }
}

impl<T> PerScope<T> {
    pub fn get(&self, scope: Scope) -> &T {
        match scope {
            Scope::Internal => &self.internal,
            Scope::External => &self.external,
        }
    }

    pub fn get_mut(&mut self, scope: Scope) -> &mut T {
        match scope {
            Scope::Internal => &mut self.internal,
            Scope::External => &mut self.external,
        }
    }
}
