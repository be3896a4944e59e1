//! Which offsite archives the job's offsite keeps keep (offsiteScheduledKeep ...
//! offsiteYearlyKeep, Affa's levels): the newest offsiteScheduledKeep archives, and for each of
//! daily, weekly, monthly and yearly the newest archive of each of the newest N periods (days,
//! weeks `%Y%W`, months, years: Affa's `.doneDates` periods) that have one. An archive is kept
//! when any level keeps it.
//!
//! Owns: that choice, from the archives' report Dates alone. Must never: choose to drop an
//! archive whose date it cannot read, or the newest one.

use std::collections::HashSet;

use chrono::NaiveDateTime;

use crate::archive::Keeps;
use crate::archive::Level;
use crate::config::typed::offsite_keep_key;

/// For each archive (its report Date, `YYYYMMDDHHMM`), whether the keeps keep it. Among equal
/// dates the later in `dates` counts as the newer.
pub fn kept(dates: &[&str], keeps: Keeps) -> Vec<bool> {
    let mut order: Vec<usize> = (0..dates.len()).collect();
    order.sort_by(|&a, &b| dates[b].cmp(dates[a]).then(b.cmp(&a)));
    let parsed: Vec<Option<NaiveDateTime>> =
        dates.iter().map(|d| NaiveDateTime::parse_from_str(d, "%Y%m%d%H%M").ok()).collect();
    let mut keep: Vec<bool> = parsed.iter().map(Option::is_none).collect();
    for &i in order.iter().filter(|&&i| parsed[i].is_some()).take(keeps.of(Level::Scheduled).max(1) as usize) {
        keep[i] = true;
    }
    for l in [Level::Daily, Level::Weekly, Level::Monthly, Level::Yearly] {
        let mut periods = HashSet::new();
        for &i in &order {
            let Some(t) = parsed[i] else { continue };
            if periods.len() as u32 >= keeps.of(l) {
                break;
            }
            if periods.insert(l.period(t)) {
                keep[i] = true;
            }
        }
    }
    keep
}

/// `offsiteScheduledKeep=1 offsiteDailyKeep=7 ...` for messages.
pub fn describe(keeps: Keeps) -> String {
    Level::ALL.iter().map(|&l| format!("{}={}", offsite_keep_key(l), keeps.of(l))).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dates: &[&str], keeps: [u32; 5]) -> Vec<String> {
        let k = kept(dates, Keeps(keeps));
        dates.iter().zip(k).filter(|(_, k)| *k).map(|(d, _)| d.to_string()).collect()
    }

    #[test]
    fn the_keeps_choose_by_level_as_affa() {
        // Three runs a day on 1, 2 and 3 December, one on 10 December, one a year earlier.
        let d = [
            "202512150100",
            "202612010100",
            "202612010900",
            "202612011700",
            "202612020100",
            "202612020900",
            "202612021700",
            "202612030100",
            "202612030900",
            "202612101200",
        ];
        assert_eq!(names(&d, [1, 0, 0, 0, 0]), ["202612101200"], "only the newest");
        assert_eq!(names(&d, [0, 0, 0, 0, 0]), ["202612101200"], "the newest whatever the keeps");
        assert_eq!(names(&d, [2, 0, 0, 0, 0]), ["202612030900", "202612101200"]);
        assert_eq!(
            names(&d, [1, 3, 0, 0, 0]),
            ["202612021700", "202612030900", "202612101200"],
            "the newest of each of the 3 newest days that have one"
        );
        // Weeks (%W, Monday first): 10 Dec is week 49, 1-3 Dec week 48, 15 Dec 2025 week 50.
        assert_eq!(names(&d, [1, 0, 2, 0, 0]), ["202612030900", "202612101200"]);
        assert_eq!(names(&d, [1, 0, 0, 5, 0]), ["202512150100", "202612101200"], "December 2026, December 2025");
        assert_eq!(names(&d, [1, 0, 0, 0, 1]), ["202612101200"]);
        assert_eq!(names(&d, [1, 0, 0, 0, 2]), ["202512150100", "202612101200"]);
        assert_eq!(names(&d, [10000, 0, 0, 0, 0]).len(), d.len());
    }

    #[test]
    fn an_unreadable_date_is_kept_and_ties_go_to_the_later_upload() {
        assert_eq!(kept(&["garbage", "202612010100", "202612020100"], Keeps([1, 0, 0, 0, 0])), [true, false, true]);
        assert_eq!(kept(&["202612010100", "202612010100"], Keeps([1, 0, 0, 0, 0])), [false, true]);
        assert!(kept(&[], Keeps([1, 7, 4, 12, 2])).is_empty());
    }
}
