//! `GET /metrics` for Prometheus (and a plain answer elsewhere), on `[metrics] listen`.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Metrics;

#[derive(Debug, thiserror::Error)]
#[error("[metrics] listen {addr}: {source}")]
pub struct EndpointError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds at start-up, so a taken port stops the daemon with a clear error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, EndpointError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| EndpointError { addr, source })
}

fn answer(metrics: &Metrics, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, kind, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/" => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "reclaimd: metrics at /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_owned(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Serves until the task is dropped; one task per connection, so a slow scraper holds up no
/// one.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "metrics endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = answer(&metrics, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
