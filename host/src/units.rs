//! Text as operators write and read it: durations with a unit (`250ms`, `1.5s`), and
//! messages cut to a length at a character boundary.

use std::time::Duration;

use serde::Deserialize;

/// A number and a unit (`us`, `ms`, `s`, `m`, `h`), fractions allowed; `None` for
/// anything else, including a duration too long to represent.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "us" | "µs" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// The longest duration weir accepts in its config or an annotation: a year.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A duration written with a unit: `"250ms"`, `"2s"`, `"1m"`, `"1h"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Humantime(pub Duration);

impl<'de> Deserialize<'de> for Humantime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map(Humantime).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid duration `{text}`: write a number and a unit (us, ms, s, m, h), e.g. \"250ms\" or \"30s\""
            ))
        })
    }
}

/// The line (1-based) where a dotted key (`table.key`) is set in TOML text, if it is:
/// how a config error points at the line to fix.
pub fn line_of(text: &str, dotted: &str) -> Option<usize> {
    let (table, key) = dotted.split_once('.')?;
    let mut current = "";
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = header.trim();
        } else if current == table
            && line
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return Some(n + 1);
        }
    }
    None
}

/// The longest head of `text` of at most `max` bytes that ends at a character boundary.
pub fn head(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let end = (0..=max)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    &text[..end]
}

/// `text` cut to at most `max` bytes, with `...` marking the cut.
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    format!("{}...", head(text, max.saturating_sub(3)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("30us"), Some(Duration::from_micros(30)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("5 days"), None);
        assert_eq!(
            parse_duration("100000000000000000000000h"),
            None,
            "too long: an error, not a panic"
        );
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        assert_eq!(head("héllo", 2), "h", "not inside é");
        assert_eq!(head("héllo", 3), "hé");
        assert_eq!(head("abc", 10), "abc");
        assert_eq!(shorten("abcdefgh", 6), "abc...");
        assert_eq!(shorten("ab", 6), "ab");
        assert_eq!(shorten("ééééé", 6), "é...");
    }
}
