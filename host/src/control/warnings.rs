//! Warnings said once while they last, and again if they come back.

use super::*;

/// Whether a warning is new since the last sync; notes it as seen in this one.
pub(super) fn once(
    reported: &Reported,
    seen: &mut Reported,
    message: String,
    service: Option<&ServiceKey>,
) -> bool {
    let new = !reported.contains_key(&message) && !seen.contains_key(&message);
    seen.insert(message, service.cloned());
    new
}

/// Warnings logged, each with the Service it is about (if one).
pub(super) type Reported = HashMap<String, Option<ServiceKey>>;
