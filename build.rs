//! Records the git revision and rustc version for the build_info metric.

use std::process::Command;

fn main() {
    // A build without .git (a container build) passes the revision in.
    let given: Option<String> = std::env::var("CLOUDFLARE_ACCESS_EXPORTER_REVISION")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let revision = given
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let rustc_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());

    println!("cargo:rustc-env=CLOUDFLARE_ACCESS_EXPORTER_REVISION={revision}");
    println!("cargo:rustc-env=CLOUDFLARE_ACCESS_EXPORTER_RUSTC={rustc_version}");
    println!("cargo:rerun-if-env-changed=CLOUDFLARE_ACCESS_EXPORTER_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
