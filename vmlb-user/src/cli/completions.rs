//! `vmlb completions <shell>` and `vmlb man`: both generated from the clap definition, so they cannot
//! drift from the binary.

use std::io::Write;

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use super::Cli;

#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

pub fn completions(args: CompletionsArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    clap_complete::generate(args.shell, &mut Cli::command(), "vmlb", out);
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// Write one page per command (vmlb.1, vmlb-run.1, vmlb-inspect-flows.1, ...) into this
    /// directory instead of printing vmlb(1).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

pub fn man(args: ManArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    match args.dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), &dir)
            .with_context(|| format!("writing man pages to {}", dir.display())),
        None => Ok(clap_mangen::Man::new(Cli::command()).render(out)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_and_man_page_name_every_subcommand() {
        let mut bash = Vec::new();
        completions(CompletionsArgs { shell: Shell::Bash }, &mut bash).unwrap();
        let bash = String::from_utf8(bash).unwrap();
        let mut page = Vec::new();
        man(ManArgs { dir: None }, &mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.contains(".TH vmlb 1"), "{page}");
        let dir = tempfile::tempdir().unwrap();
        man(
            ManArgs {
                dir: Some(dir.path().into()),
            },
            &mut Vec::new(),
        )
        .unwrap();
        for sub in [
            "run",
            "inspect",
            "simulate",
            "config",
            "verify",
            "completions",
            "man",
        ] {
            assert!(bash.contains(sub), "bash completion lacks {sub}");
            assert!(page.contains(sub), "vmlb(1) lacks {sub}");
            let sub_page = dir.path().join(format!("vmlb-{sub}.1"));
            assert!(sub_page.exists(), "{} missing", sub_page.display());
        }
        let run = std::fs::read_to_string(dir.path().join("vmlb-run.1")).unwrap();
        assert!(run.contains("snat\\-addr"), "{run}");
        assert!(bash.contains("--snat-addr"));
    }
}
