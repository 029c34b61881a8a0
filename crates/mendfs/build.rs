//! Records the git commit the binary is built from as `MENDFS_GIT_COMMIT`, so that
//! `mendfs bench --json` can say which commit it measured. Outside a git checkout, or without
//! git, nothing is recorded and the bench names the crate version instead.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    // Without this line a build script reruns on any change in the package; with it, only
    // when a watched git file moves (a commit, a checkout).
    println!("cargo:rerun-if-changed=build.rs");
    let Some(commit) = git(&["rev-parse", "HEAD"]) else { return };
    println!("cargo:rustc-env=MENDFS_GIT_COMMIT={commit}");
    // HEAD names the branch; the branch's ref file (or packed-refs) names the commit. A path
    // that does not exist is not watched: cargo would take it as changed on every build.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]).map(PathBuf::from) {
            let path = if path.is_absolute() { path } else { Path::new(".").join(path) };
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}

/// `git args`' trimmed output, or None if git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}
