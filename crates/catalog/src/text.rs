//! Text forms shared by the SQLite columns and the metadata files: times and escaped strings.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::Pin;

/// RFC 3339 in UTC with microseconds, e.g. `2026-11-21T10:15:00.123456Z`. Fixed width for years
/// 0000-9999, so the text sorts like the time.
pub(crate) fn time_text(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses an RFC 3339 time with any offset into UTC.
pub(crate) fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The text of a pin: `forever`, or the time it ends as [`time_text`] writes it.
pub fn pin_text(p: &Pin) -> String {
    match p {
        Pin::Forever => FOREVER.to_string(),
        Pin::Until(t) => time_text(t),
    }
}

/// Reverses [`pin_text`].
pub fn parse_pin(s: &str) -> Option<Pin> {
    if s == FOREVER {
        Some(Pin::Forever)
    } else {
        parse_time(s).map(Pin::Until)
    }
}

const FOREVER: &str = "forever";

/// The text a missing optional value is written as in the manifest (as in PostgreSQL's COPY).
/// `escape` never produces it, since it doubles every backslash.
pub(crate) const NULL: &str = "\\N";

/// Escapes a value so it holds no tab, newline, carriage return or other ASCII control character
/// and can be split on them: `\` becomes `\\`, tab `\t`, newline `\n`, carriage return `\r`, and
/// other controls `\xHH`.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`escape`]; the error says which escape is bad.
pub(crate) fn unescape(s: &str) -> Result<String, String> {
    if !s.contains('\\') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(b) if hex.len() == 2 && b.is_ascii() => out.push(char::from(b)),
                    _ => return Err(format!("bad escape \\x{hex} in {s:?}")),
                }
            }
            Some(other) => return Err(format!("bad escape \\{other} in {s:?}")),
            None => return Err(format!("trailing backslash in {s:?}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip() {
        for s in [
            "",
            "plain",
            "a\tb\nc\rd\\e",
            "\\N",
            "\u{0}\u{1b}[31m\u{7f}",
            "ünï\u{2028}cödé",
        ] {
            let e = escape(s);
            assert!(!e.contains(['\t', '\n', '\r']), "{e:?}");
            assert_ne!(e, NULL);
            assert_eq!(unescape(&e).unwrap(), s);
        }
        assert!(unescape("a\\").is_err());
        assert!(unescape("\\q").is_err());
        assert!(unescape("\\x4").is_err());
        assert!(unescape("\\xff").is_err());
    }

    #[test]
    fn times() {
        let t = parse_time("2026-11-21T11:15:00.123456+01:00").unwrap();
        assert_eq!(time_text(&t), "2026-11-21T10:15:00.123456Z");
        assert_eq!(parse_time("2026-11-21 10:15"), None);
    }
}
