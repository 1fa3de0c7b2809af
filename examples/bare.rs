//! The floor of the benchmark: a bare hyper 1 server on the same runtime as the router
//! (tokio multi-thread, one worker per core), reading each request body in full and answering
//! with a small JSON body. It is also the local HTTP sink destination of `bench/run.sh`.
//!
//! ```sh
//! cargo run --release --example bare -- 127.0.0.1:18000        # answers 202
//! cargo run --release --example bare -- 127.0.0.1:18001 200    # answers 200 (an HTTP sink target)
//! ```
//!
//! Prints `listening on ADDR` once bound; stops on SIGTERM/SIGINT.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::TcpListener;

async fn answer(req: Request<Incoming>, status: StatusCode) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body like the router does, so the floor includes it.
    let _ = req.into_body().collect().await;
    Ok(Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(br#"{"status":"accepted"}"#)))
        .expect("static response"))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:18000").parse().expect("ADDR");
    let status =
        StatusCode::from_u16(args.next().as_deref().unwrap_or("202").parse().expect("STATUS")).expect("STATUS");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(addr).await.expect("bind");
        println!("listening on {}", listener.local_addr().expect("local addr"));
        let serve = async {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service_fn(move |req| answer(req, status)))
                        .await;
                });
            }
        };
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("signal");
        tokio::select! {
            _ = serve => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
}
