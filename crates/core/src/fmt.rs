//! How sizes, durations and dates are shown to a person (lists, reports, mails, the terminal).
//!
//! Owns: the one spelling of each. Must never: parse (configuration values are parsed in
//! affa's `config::keys`), or depend on anything but std.

/// 1234567 -> "1.2M"
pub fn human(bytes: u64) -> String {
    let units = ["B", "K", "M", "G", "T", "P"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", units[u])
    }
}

/// 3725 -> "1:02:05"
pub fn hms(secs: u64) -> String {
    format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// `YYYYmmddHHMM` -> `YYYY-mm-dd HH:MM`; anything else -> "-".
pub fn show_date(d: &str) -> String {
    if d.len() == 12 && d.is_ascii() {
        format!("{}-{}-{} {}:{}", &d[0..4], &d[4..6], &d[6..8], &d[8..10], &d[10..12])
    } else {
        "-".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!(human(999), "999B");
        assert_eq!(human(1234567), "1.2M");
        assert_eq!(hms(3725), "1:02:05");
        assert_eq!(show_date("202611301945"), "2026-11-30 19:45");
        assert_eq!(show_date("2026"), "-");
        assert_eq!(show_date("2026113019é"), "-");
    }
}
