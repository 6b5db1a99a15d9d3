//! Connecting to the API's Unix socket (for reclaimctl and tests).
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use super::pb::reclaimd_client::ReclaimdClient;

/// The endpoint `channel` connects with; its URI is required but unused (the connector
/// dials the socket). Tune it (windows, timeouts) and pass it to `channel_on`.
pub fn endpoint() -> Endpoint {
    Endpoint::from_static("http://reclaimd.sock")
}

/// A channel to the daemon at `socket`. Fails at once when nothing listens there.
pub async fn channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    channel_on(endpoint(), socket).await
}

pub async fn channel_on(
    endpoint: Endpoint,
    socket: &Path,
) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = socket.to_owned();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

pub async fn connect(socket: &Path) -> Result<ReclaimdClient<Channel>, tonic::transport::Error> {
    Ok(ReclaimdClient::new(channel(socket).await?))
}
