use std::process::ExitCode;

use vmlb_user::cli::{exit, ExitError};

fn main() -> ExitCode {
    match vmlb_user::cli::main() {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            // The whole chain on one line, no backtrace: this is for people, not developers.
            eprintln!("vmlb: error: {e:#}");
            let code = e
                .downcast_ref::<ExitError>()
                .map_or(exit::FAILURE, |e| e.code);
            ExitCode::from(code)
        }
    }
}
