//! Building one package must reuse what building the workspace built.
//!
//! Cargo enables a dependency's features from the packages a build selects, so
//! `cargo run --release -p keelctl` after `cargo build --release --workspace` (or after the
//! tests' build, which adds dev-dependencies) rebuilt bitflags, regex-syntax and everything
//! above them when those differed. `keel-workspace-hack` asks for the union; this test fails,
//! naming the crate, when a package built alone would resolve a dependency with features the
//! workspace build does not use (a new dependency, or a new feature, not added to
//! workspace-hack/Cargo.toml).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `name version|features` of every non-Keel crate in the graph `cargo tree` prints for `args`.
fn resolved(args: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = workspace_root().join("Cargo.toml");
    let out = Command::new(cargo)
        .arg("tree")
        .arg("--offline")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--prefix", "none", "-f", "{p}|{f}"])
        .args(args)
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim().trim_end_matches(" (*)");
            let (package, features) = line.split_once('|')?;
            let mut words = package.split_whitespace();
            let (name, version) = (words.next()?, words.next()?);
            if name.starts_with("keel") {
                return None;
            }
            let host = if package.contains("(proc-macro)") {
                " (proc-macro)"
            } else {
                ""
            };
            Some(format!("{name} {version}{host}|{features}"))
        })
        .collect()
}

fn metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--offline",
            "--no-deps",
            "--format-version",
            "1",
        ])
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata failed");
    serde_json::from_slice(&out.stdout).expect("metadata is JSON")
}

fn members() -> Vec<String> {
    metadata()["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// The features each package gets built alone (`cargo run -p P`, `cargo build -p P`) are
/// those of `cargo build --workspace` and of the tests' build (with dev-dependencies).
#[test]
fn every_package_alone_resolves_the_workspace_features() {
    let with_dev = resolved(&["--workspace", "-e", "normal,build,dev"]);
    let without_dev = resolved(&["--workspace", "-e", "normal,build"]);
    let mut problems = Vec::new();
    for line in without_dev.difference(&with_dev) {
        problems.push(format!(
            "cargo build --workspace and the tests' build differ: {line}"
        ));
    }
    let members = members();
    assert!(
        members.iter().any(|m| m == "keelctl"),
        "members: {members:?}"
    );
    // keel-workspace-hack is never built alone: it exists for the others.
    for member in members.iter().filter(|m| *m != "keel-workspace-hack") {
        for line in resolved(&["-p", member, "-e", "normal,build"]).difference(&with_dev) {
            problems.push(format!("-p {member} alone builds {line}"));
        }
    }
    assert!(
        problems.is_empty(),
        "a build of one package would rebuild dependencies the workspace build built with \
         other features; add them to workspace-hack/Cargo.toml with the workspace's features \
         (`cargo tree -e features --workspace -i CRATE`):\n{}",
        problems.join("\n")
    );
}

/// The README's first command, `cargo run --release -p keelctl -- up`, needs keelctl to be the
/// package's default binary (it also has keel-controller): without `default-run` Cargo refuses
/// ("could not determine which binary to run", exit 101).
#[test]
fn keelctl_is_the_default_binary_of_its_package() {
    let meta = metadata();
    let package = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "keelctl")
        .expect("package keelctl");
    assert_eq!(package["default_run"], "keelctl", "{package}");
}
