//! The HTTP stack's ceiling: a bare hyper server that answers every request
//! with the same bytes, read once from a file, for `scripts/perf.sh`.
//!
//! ```text
//! cargo run --release --example static_body -- --file exposition.txt
//! ```
//!
//! It prints its base URL as the first line of standard output, then serves
//! until SIGTERM or SIGINT. It uses the same runtime, HTTP/1 settings and
//! socket options as the exporter's server, and nothing else: no routing, no
//! auth, no content negotiation. Whatever rate `wrk` reaches against it for a
//! body is the most the exporter could reach serving that body as cached
//! bytes, so the two figures side by side say how much of the gap to a target
//! is the exporter's and how much is the machine's.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use http::{header, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use cloudflare_access_exporter::server::http1_builder;

/// Serves one file's bytes on every path until killed.
#[derive(Debug, Parser)]
#[command(name = "static_body", about, long_about = None)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// The body to serve.
    #[arg(long)]
    file: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();

    let body = match std::fs::read(&args.file) {
        Ok(body) => Bytes::from(body),
        Err(e) => {
            eprintln!("static_body: --file {}: {e}", args.file.display());
            return ExitCode::from(2);
        }
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("static_body: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };

    match runtime.block_on(serve(args.listen, body)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("static_body: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: SocketAddr, body: Bytes) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("http://{}", listener.local_addr()?);

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);

        let body = body.clone();
        let service = service_fn(move |_req| {
            let response = Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .body(Full::new(body.clone()))
                .unwrap_or_default();
            async move { Ok::<_, Infallible>(response) }
        });

        tokio::spawn(async move {
            let _ = http1_builder()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
