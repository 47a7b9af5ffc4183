//! The daemon's logs as an operator sees them, without root: `vmlb run` reads its configuration
//! before touching the kernel, so a bad file shows the log format and the exit status.

use std::process::Command;

fn run_with_bad_config(format: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("se.yaml");
    let se = include_str!("../../deploy/serviceentry-vms.yaml")
        .replace("\"10.10.1.3\"", "\"10.10.1.300\"");
    std::fs::write(&file, se).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmlb"))
        .args([
            "run",
            "--iface",
            "nonexistent0",
            "--snat-addr",
            "10.10.1.125",
        ])
        .arg("--config")
        .arg(&file)
        .arg("--pin-dir")
        .arg(dir.path().join("pins"))
        .args(["--log-format", format])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    (
        out.status.code(),
        err.replace(&file.display().to_string(), "SE"),
    )
}

#[test]
fn json_logs_are_one_object_per_line_and_text_logs_have_no_colour_off_a_terminal() {
    let (code, err) = run_with_bad_config("json");
    assert_eq!(code, Some(3), "invalid configuration: {err}");
    let events: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let refused = events
        .iter()
        .find(|e| e["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no ERROR event in {err}"));
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.starts_with("SE:") && message.contains("invalid IP address \"10.10.1.300\""),
        "{message}"
    );
    assert!(
        refused["timestamp"].is_string() && refused["target"].is_string(),
        "{refused}"
    );

    let (code, err) = run_with_bad_config("text");
    assert_eq!(code, Some(3));
    assert!(
        err.contains("ERROR") && err.contains("10.10.1.300"),
        "{err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "ANSI codes with stderr not a terminal: {err:?}"
    );
}
