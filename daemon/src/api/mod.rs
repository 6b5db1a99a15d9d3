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

pub use self::service::{CoreRequest, ReclaimdService};
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
    #[error("[api] {key} {path}: {source}")]
    TlsFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("[api] listen {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
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

/// The services every listener carries: health, reflection (v1 and v1alpha: grpcurl asks
/// v1, grpcio's client and older tools v1alpha), and the API.
async fn router(
    builder: &mut tonic::transport::Server,
    svc: ReclaimdService,
) -> Result<tonic::transport::server::Router, ApiError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::reclaimd_server::ReclaimdServer<ReclaimdService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(builder
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(pb::reclaimd_server::ReclaimdServer::new(svc)))
}

/// Serves the API on `listener` until `shutdown` resolves, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    socket: &Path,
    svc: ReclaimdService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    let mut builder = tonic::transport::Server::builder();
    let result = router(&mut builder, svc)
        .await?
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    Ok(result?)
}

/// The TCP listener's TLS: the server's certificate and key, and the CA whose client
/// certificates are accepted (clients without one are refused in the handshake).
pub fn tls(cfg: &ApiConfig) -> Result<Option<tonic::transport::ServerTlsConfig>, ApiError> {
    let (Some(cert), Some(key), Some(ca)) = (&cfg.tls_cert, &cfg.tls_key, &cfg.client_ca) else {
        return Ok(None);
    };
    let read = |key: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|source| ApiError::TlsFile {
            key,
            path: path.clone(),
            source,
        })
    };
    Ok(Some(
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                read("tls_cert", cert)?,
                read("tls_key", key)?,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(read(
                "client_ca",
                ca,
            )?))
            .client_auth_optional(false),
    ))
}

/// Binds the TCP listener (checked at start-up, so a taken port stops the daemon).
pub async fn bind_tcp(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, ApiError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Listen { addr, source })
}

/// Serves the API over TCP with mutual TLS until `shutdown`. Peers there have no Unix
/// credentials: they may read, never `Reclaim`.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    tls: tonic::transport::ServerTlsConfig,
    svc: ReclaimdService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    let mut builder = tonic::transport::Server::builder().tls_config(tls)?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    Ok(router(&mut builder, svc)
        .await?
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?)
}
