//! A value per traffic scope (a table, a schedule, a counter), built from each scope's
//! eligible set in `update` and used by `select` for the connection's scope. When both
//! scopes have the same endpoints (every port without a Local traffic policy) there is one
//! value, not two copies: tables are the bulk of a policy's memory.

use crate::types::{Eligibility, EndpointId, Scope};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PerScope<T> {
    internal: T,
    /// `None`: external traffic uses the internal value.
    external: Option<T>,
}

impl<T> PerScope<T> {
    /// Builds one value per distinct eligible set.
    pub fn build(eligibility: &Eligibility, mut build: impl FnMut(&[EndpointId]) -> T) -> Self {
        let internal = build(&eligibility.internal.endpoints);
        let external = (eligibility.external.endpoints != eligibility.internal.endpoints)
            .then(|| build(&eligibility.external.endpoints));
        PerScope { internal, external }
    }

    pub fn get(&self, scope: Scope) -> &T {
        match (scope, &self.external) {
            (Scope::External, Some(external)) => external,
            _ => &self.internal,
        }
    }

    pub fn get_mut(&mut self, scope: Scope) -> &mut T {
        match (scope, &mut self.external) {
            (Scope::External, Some(external)) => external,
            _ => &mut self.internal,
        }
    }

    /// Every distinct value (one or two).
    pub fn each_mut(&mut self) -> impl Iterator<Item = &mut T> {
        std::iter::once(&mut self.internal).chain(self.external.as_mut())
    }
}
