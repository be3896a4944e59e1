//! Rotation over 800 simulated days with an injected clock: after every run the exact set of
//! archive names, and the date in each one's report, must match a model of Affa 3's algorithm
//! (with its monthly-fallback defect fixed).

use crate::common;

use std::collections::BTreeMap;
use std::fs;

use affa::archive::Level;
use affa::backup::{run, RunOptions};
use affa::clock::FixedClock;
use affa::config::Config;
use chrono::{Duration, NaiveDate, NaiveDateTime};

/// The model: per level, slots 0..K holding the report date of the archive there.
struct Model {
    keep: [usize; 5],
    slots: [Vec<Option<String>>; 5],
    done: [String; 5],
}

impl Model {
    fn new(keep: [usize; 5]) -> Model {
        Model { keep, slots: keep.map(|k| vec![None; k]), done: Default::default() }
    }
    fn period(l: usize, t: NaiveDateTime) -> String {
        t.format(["", "%Y%j", "%Y%W", "%Y%m", "%Y"][l]).to_string()
    }
    /// Shift level l up by one if slot 0 is taken; the last one falls off.
    fn shift(&mut self, l: usize) {
        if self.slots[l][0].is_some() {
            self.slots[l].pop();
            self.slots[l].insert(0, None);
        }
    }
    fn promote(&mut self, l: usize) {
        if self.keep[l] == 0 {
            return;
        }
        self.shift(l);
        // The source is the oldest slot of the nearest lower level that keeps anything.
        let src = (0..l).rev().find(|&b| self.keep[b] > 0);
        if let Some(b) = src {
            let last = self.keep[b] - 1;
            if self.slots[l][0].is_none() {
                if let Some(d) = self.slots[b][last].take() {
                    self.slots[l][0] = Some(d);
                }
            }
        }
    }
    fn run(&mut self, t: NaiveDateTime) {
        if self.slots[0][0].is_some() {
            for l in [4, 3, 2, 1] {
                if self.done[l] != Self::period(l, t) && self.keep[l] > 0 {
                    self.promote(l);
                    self.done[l] = Self::period(l, t);
                }
            }
        }
        self.shift(0);
        self.slots[0][0] = Some(t.format("%Y%m%d%H%M").to_string());
    }
    fn expected(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for (l, level) in Level::ALL.iter().enumerate() {
            for (i, d) in self.slots[l].iter().enumerate() {
                if let Some(d) = d {
                    m.insert(format!("{}.{}", level.name(), i), d.clone());
                }
            }
        }
        m
    }
}

fn actual(job_dir: &std::path::Path) -> BTreeMap<String, String> {
    affa::archive::list(job_dir)
        .unwrap()
        .into_iter()
        .map(|a| (a.name(), a.report.expect("every archive has a report").date().unwrap().to_string()))
        .collect()
}

fn simulate(keep: [usize; 5], days: i64, label: &str, must_exist: &[&str]) {
    // run() below installs affa's signal handlers in this process: keep Ctrl-C working.
    common::keep_default_signal_actions();
    let affa = common::Affa::new();
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("f"), "x").unwrap();
    affa.write_conf(
        "job.conf",
        &format!(
            "[rot]\nremoteHostName=localhost\nInclude={}\nscheduledKeep={}\ndailyKeep={}\nweeklyKeep={}\nmonthlyKeep={}\nyearlyKeep={}\n",
            src.path().display(),
            keep[0], keep[1], keep[2], keep[3], keep[4]
        ),
    );
    let cfg = Config::load(&affa.conf).unwrap();
    let mut model = Model::new(keep);
    let start = NaiveDate::from_ymd_opt(2026, 12, 20).unwrap().and_hms_opt(0, 0, 0).unwrap();
    let mut runs = 0;
    for day in 0..days {
        let mut times = vec![Duration::hours(2) + Duration::minutes(15), Duration::hours(13) + Duration::minutes(30)];
        if day % 3 == 0 {
            times.push(Duration::hours(22) + Duration::minutes(45));
        }
        if day % 11 == 5 {
            times.clear(); // a day without any run
        }
        for off in times {
            let t = start + Duration::days(day) + off;
            fs::write(src.path().join("f"), format!("{t}")).unwrap();
            run(&cfg, "rot", &FixedClock(t), RunOptions { level: Level::Scheduled, watch: Default::default() })
                .unwrap_or_else(|e| panic!("{label}: run at {t} failed: {e}"));
            model.run(t);
            runs += 1;
            assert_eq!(actual(&affa.job_dir("rot")), model.expected(), "{label}: after the run at {t} (run {runs})");
        }
    }
    // The model is not allowed to agree with an implementation that never promotes.
    for name in must_exist {
        let d = affa.job_dir("rot").join(name);
        assert!(d.is_dir(), "{label}: no {name} after {days} days");
        assert!(fs::read_to_string(d.join(src.path().strip_prefix("/").unwrap()).join("f")).is_ok());
    }
}

#[test]
fn rotation_over_800_days_matches_affa() {
    simulate([3, 7, 4, 12, 2], 800, "keeps 3/7/4/12/2", &["daily.6", "weekly.3", "monthly.11", "yearly.0"]);
}

#[test]
fn rotation_with_empty_levels_falls_through() {
    // weekly and daily keep nothing: monthly is promoted from scheduled (Affa 3's defect 5).
    simulate([2, 0, 0, 3, 1], 120, "keeps 2/0/0/3/1", &["monthly.2"]);
}
