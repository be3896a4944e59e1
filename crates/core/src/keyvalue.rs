//! The `key=value` lines of the small INI-shaped files affa writes and reads back
//! (`.AFFA3-REPORT`, `.doneDates`).
//!
//! Owns: splitting such a text into trimmed (key, value) pairs, by section. Must never: fail or
//! panic on any text (a damaged file gives fewer pairs), or interpret values (that is the
//! caller's).

/// The `key=value` lines of `text`, key and value trimmed. Lines starting with `;` or `#`,
/// section headers and lines without `=` are skipped. With `section`, only the lines under the
/// header `[section]`; without, the lines of every section (and those before any header).
pub fn pairs<'a>(text: &'a str, section: Option<&'a str>) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    let mut inside = section.is_none();
    text.lines().filter_map(move |line| {
        let line = line.trim();
        if let Some(h) = line.strip_prefix('[') {
            inside = section.is_none_or(|s| h.strip_suffix(']') == Some(s));
            return None;
        }
        if !inside || line.starts_with(';') || line.starts_with('#') {
            return None;
        }
        line.split_once('=').map(|(k, v)| (k.trim(), v.trim()))
    })
}

#[cfg(test)]
mod tests {
    use super::pairs;

    #[test]
    fn pairs_by_section() {
        let t = "a=1\n[Report]\n Date = 202601010000 \n;x=2\n#y=3\nnoequals\nk=v=w\n[Other]\nb=4\n[Report]\nc=5\n";
        let all: Vec<_> = pairs(t, None).collect();
        assert_eq!(all, [("a", "1"), ("Date", "202601010000"), ("k", "v=w"), ("b", "4"), ("c", "5")]);
        let rep: Vec<_> = pairs(t, Some("Report")).collect();
        assert_eq!(rep, [("Date", "202601010000"), ("k", "v=w"), ("c", "5")]);
        assert_eq!(pairs("", Some("Report")).count(), 0);
        assert_eq!(pairs("[Reportx]\na=1\n[Report\nb=2\n", Some("Report")).count(), 0);
    }
}
