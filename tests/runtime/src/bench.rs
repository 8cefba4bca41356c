//! What the start-up benches share: their arguments, the environment they run in, and
//! medians.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::env::Env;

pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The number after `key` in a log line (`key=12` or `key 12.5`).
pub fn field(line: &str, key: &str) -> Option<f64> {
    let i = line.find(key)? + key.len();
    line[i..]
        .trim_start()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

/// The guest image packaging/guest/build.py builds (or finds cached) for the release
/// agent.
pub fn guest_dir(root: &Path) -> Result<PathBuf> {
    let o = Command::new("python3")
        .arg(root.join("packaging/guest/build.py"))
        .arg("--agent")
        .arg(root.join("target/x86_64-unknown-linux-gnu/release/bulkhead-agent"))
        .output()?;
    if !o.status.success() {
        bail!("guest image: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8(o.stdout)?
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .into())
}

/// `--runs N` and `--guest DIR` from the command line; the environment on the release
/// binaries.
pub fn setup(default_runs: usize) -> Result<(usize, Env)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()?;
    let mut runs = default_runs;
    let mut guest = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--guest" => guest = it.next().map(PathBuf::from),
            _ => {}
        }
    }
    let guest = match guest {
        Some(g) => g,
        None => guest_dir(&root)?,
    };
    Ok((
        runs,
        Env::new(root.join("target/x86_64-unknown-linux-gnu/release"), guest)?,
    ))
}
