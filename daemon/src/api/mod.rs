//! The gRPC API (`reclaimd.v1`), on a Unix socket whose peers are known by their
//! credentials (SO_PEERCRED): reads for anyone who can open the socket, `Reclaim` only for
//! root and the admin group. Health and reflection are served beside it, so generic gRPC
//! clients work without the proto file.
pub mod access;
pub mod client;
pub mod convert;
pub mod service;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

pub use self::service::{CoreRequest, ManualReclaim, ReclaimdService};
use crate::config::ApiConfig;

pub mod pb {
    tonic::include_proto!("reclaimd.v1");

    /// The descriptor set served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("reclaimd_v1_descriptor");
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("[api] socket {path}: {what}: {source}")]
    Socket {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "[api] socket {0}: another reclaimd is listening there; stop it or choose another path"
    )]
    InUse(PathBuf),
    #[error("[api] {key}: no group named {group:?} on this host")]
    NoGroup { key: &'static str, group: String },
    #[error("[api] listen: TCP with TLS is not available in this build; use the Unix socket")]
    TcpUnsupported,
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Binds the Unix socket: parent directory created (0755), a stale socket from a crashed
/// daemon replaced (a live one refused), mode 0660, group `cfg.group`.
pub async fn bind(cfg: &ApiConfig) -> Result<UnixListener, ApiError> {
    let path = &cfg.socket;
    let err = |what, source| ApiError::Socket {
        path: path.clone(),
        what,
        source,
    };
    let gid = access::gid_of(&cfg.group).ok_or_else(|| ApiError::NoGroup {
        key: "group",
        group: cfg.group.clone(),
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err("creating its directory", e))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ApiError::InUse(path.clone()));
        }
        std::fs::remove_file(path).map_err(|e| err("removing a stale socket", e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| err("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err("setting mode 0660", e))?;
    std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(|e| err("setting its group", e))?;
    Ok(listener)
}

/// The admin group's gid, checked at start-up so a typo is not found at the first request.
pub fn admin_gid(cfg: &ApiConfig) -> Result<Option<u32>, ApiError> {
    match &cfg.admin_group {
        None => Ok(None),
        Some(g) => access::gid_of(g)
            .map(Some)
            .ok_or_else(|| ApiError::NoGroup {
                key: "admin_group",
                group: g.clone(),
            }),
    }
}

/// Serves the API on `listener` until `shutdown` resolves, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    socket: &Path,
    svc: ReclaimdService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::reclaimd_server::ReclaimdServer<ReclaimdService>>()
        .await;
    // Both reflection versions: grpcurl asks v1, grpcio's client (and older tools) v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::reclaimd_server::ReclaimdServer::new(svc))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    Ok(result?)
}
