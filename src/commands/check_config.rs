//! `tollgate check-config FILE`: every problem of a config file, each with its location.

use std::path::Path;

use crate::config::Config;

/// Returns the process exit code: 0 when the file is valid.
pub fn run(path: &Path) -> i32 {
    let origin = path.display().to_string();
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(problems) => {
            eprint!("{problems}");
            return 1;
        }
    };
    let problems = cfg.problems(&origin);
    if problems.is_empty() {
        println!(
            "ok: {origin}: {} accounts, {} workspaces, {} keys",
            cfg.accounts.len(),
            cfg.workspaces.len(),
            cfg.keys.len()
        );
        0
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{} problem(s) in {origin}", problems.len());
        1
    }
}
