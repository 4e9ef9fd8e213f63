//! The files under deploy/ stay valid: the example config passes `check-config`.

mod common;

use std::process::Command;

#[test]
fn the_example_production_config_passes_check_config() {
    let out = Command::new(common::gateway::tollgate_bin())
        .arg("check-config")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/tollgate.example.toml"
        ))
        .env("ACME_PREFECT_AUTH", "admin:secret")
        .env("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6379")
        .output()
        .expect("run tollgate check-config");
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_example_config_names_the_missing_secret() {
    let out = Command::new(common::gateway::tollgate_bin())
        .arg("check-config")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/tollgate.example.toml"
        ))
        .env_remove("ACME_PREFECT_AUTH")
        .env("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6379")
        .output()
        .expect("run tollgate check-config");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("workspaces[0].upstream_auth") && err.contains("ACME_PREFECT_AUTH"),
        "{err}"
    );
}
