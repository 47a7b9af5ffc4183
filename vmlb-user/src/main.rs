use std::process::ExitCode;

fn main() -> ExitCode {
    match vmlb_user::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain on one line, no backtrace: this is for people, not developers.
            eprintln!("vmlb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
