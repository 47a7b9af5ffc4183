//! README stays true: its reference mentions every flag the binary accepts, its exit statuses
//! are the binary's, and its `vmlb config check` examples run as written and pass.

use std::{path::Path, process::Command};

use clap::CommandFactory as _;
use vmlb_user::cli::{exit, Cli};

fn readme() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join("README.md")).unwrap()
}

/// Every long flag of every (sub)command, with the command it belongs to.
fn flags(cmd: &clap::Command, path: &str, out: &mut Vec<(String, String)>) {
    for a in cmd.get_arguments() {
        if let Some(long) = a.get_long() {
            if !matches!(long, "help" | "version") && !a.is_hide_set() {
                out.push((path.to_string(), format!("--{long}")));
            }
        }
    }
    for sub in cmd.get_subcommands() {
        flags(sub, &format!("{path} {}", sub.get_name()), out);
    }
}

#[test]
fn readme_names_every_flag_and_subcommand() {
    let text = readme();
    let mut all = Vec::new();
    flags(&Cli::command(), "vmlb", &mut all);
    let missing: Vec<_> = all
        .iter()
        .filter(|(_, f)| !text.contains(f.as_str()))
        .collect();
    assert!(missing.is_empty(), "README does not mention: {missing:?}");
    for sub in Cli::command().get_subcommands() {
        let name = format!("vmlb {}", sub.get_name());
        assert!(text.contains(&name), "README does not mention {name}");
    }
    for code in [
        exit::OK,
        exit::FAILURE,
        exit::USAGE,
        exit::CONFIG_INVALID,
        exit::CONFIG_WARNINGS,
    ] {
        assert!(
            Cli::command()
                .render_help()
                .to_string()
                .contains(&format!("  {code}  ")),
            "--help lacks exit status {code}"
        );
    }
    assert!(text.contains(
        "Exit status: 0 success, 1 failure (cannot attach, no pinned state, ...), 2 usage error,\n  \
         3 invalid configuration, 4 `config check --strict` found warnings but no errors."
    ));
}

#[test]
fn readme_config_check_examples_run_as_written() {
    let text = readme();
    let examples: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("vmlb config check "))
        .collect();
    assert!(examples.len() >= 2, "{examples:?}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for line in examples {
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let out = Command::new(env!("CARGO_BIN_EXE_vmlb"))
            .args(&args)
            .current_dir(&root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("vms/http") && stdout.contains("10.10.1.125"),
            "{line}: {stdout}"
        );
    }
}
