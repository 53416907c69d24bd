//! Warnings said once while they last, and again if they come back.

use std::collections::{BTreeSet, HashMap};

use crate::model::ServiceKey;

/// The warnings of the last sync and of the one in progress, each with the Service it is
/// about (if one).
#[derive(Default)]
pub(super) struct Warnings {
    reported: HashMap<String, Option<ServiceKey>>,
    seen: HashMap<String, Option<ServiceKey>>,
}

impl Warnings {
    /// Whether a warning is new since the last sync; notes it as seen in this one.
    pub(super) fn once(&mut self, message: String, service: Option<&ServiceKey>) -> bool {
        let new = !self.reported.contains_key(&message) && !self.seen.contains_key(&message);
        self.seen.insert(message, service.cloned());
        new
    }

    /// Ends a sync that rebuilt `only` these Services (every one for `None`): their
    /// warnings are replaced by what this sync saw; the others still stand.
    pub(super) fn synced(&mut self, only: Option<&BTreeSet<ServiceKey>>) {
        let seen = std::mem::take(&mut self.seen);
        match only {
            Some(keys) => {
                self.reported
                    .retain(|_, service| !service.as_ref().is_some_and(|k| keys.contains(k)));
                self.reported.extend(seen);
            }
            None => self.reported = seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ServiceKey {
        ("default".to_string(), name.to_string())
    }

    #[test]
    fn a_warning_is_new_once_while_it_lasts_and_again_after_it_went_away() {
        let mut warnings = Warnings::default();
        assert!(warnings.once("a".into(), None));
        assert!(!warnings.once("a".into(), None), "twice in one sync");
        warnings.synced(None);
        assert!(
            !warnings.once("a".into(), None),
            "still there at the next sync"
        );
        warnings.synced(None);
        warnings.synced(None);
        assert!(
            warnings.once("a".into(), None),
            "back after a sync without it"
        );
    }

    #[test]
    fn a_partial_sync_replaces_only_the_warnings_of_the_services_it_rebuilt() {
        let mut warnings = Warnings::default();
        warnings.once("web".into(), Some(&key("web")));
        warnings.once("db".into(), Some(&key("db")));
        warnings.synced(None);
        // Only web is rebuilt, and its warning is gone; db's still stands.
        warnings.synced(Some(&[key("web")].into()));
        assert!(warnings.once("web".into(), Some(&key("web"))));
        assert!(!warnings.once("db".into(), Some(&key("db"))));
    }
}
