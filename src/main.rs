//! The `cloudflare-access-exporter` binary: parses flags and runs the app.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

use cloudflare_access_exporter::app;
use cloudflare_access_exporter::cli::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    app::init_logging(&args);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(app::run(args)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
