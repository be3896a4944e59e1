#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    if let Ok(c) =
        affa::config::Config::parse(Path::new("/nonexistent"), &[(PathBuf::from("/nonexistent/x.conf"), text)])
    {
        for (name, j) in &c.jobs {
            assert!(affa::config::valid_job_name(name));
            assert_eq!(j.job_dir().parent(), Some(j.root_dir().as_path()));
            let _ = j.to_ini();
        }
    }
});
