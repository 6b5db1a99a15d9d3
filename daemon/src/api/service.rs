//! The `reclaimd.v1.Reclaimd` service. Reads that need the daemon's live state are asked of
//! the daemon's core through a channel (it owns that state); ledger reads go to the ledger.
use std::{
    pin::Pin,
    sync::{Arc, Mutex},
};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::{
    Stream, StreamExt as _,
    wrappers::{BroadcastStream, errors::BroadcastStreamRecvError},
};
use tonic::{Request, Response, Status, transport::server::UdsConnectInfo};

use super::{access::Access, convert, pb};
use crate::ledger::{Action, Decision, Ledger, Outcome, Query};

/// What the API asks of the daemon's core.
pub enum CoreRequest {
    Status(oneshot::Sender<pb::GetStatusResponse>),
    Sessions(
        pb::ListSessionsRequest,
        oneshot::Sender<pb::ListSessionsResponse>,
    ),
    Holders(
        pb::ListHoldersRequest,
        oneshot::Sender<pb::ListHoldersResponse>,
    ),
    Reclaim(ManualReclaim, oneshot::Sender<Result<Vec<i64>, Status>>),
}

/// A checked manual reclaim request.
#[derive(Debug, Clone)]
pub struct ManualReclaim {
    /// A holder's pid, or (when 0) every holder of `session_key`.
    pub pid: u32,
    pub session_key: String,
    pub dry_run: bool,
    pub reason: String,
    pub uid: u32,
}

#[derive(Clone)]
pub struct ReclaimdService {
    pub core: mpsc::Sender<CoreRequest>,
    pub events: broadcast::Sender<pb::Event>,
    pub ledger: Arc<Mutex<Ledger>>,
    pub access: Access,
}

const MAX_PAGE: u32 = crate::ledger::MAX_QUERY_LIMIT - 1;

fn daemon_gone() -> Status {
    Status::unavailable("reclaimd is shutting down")
}

impl ReclaimdService {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> CoreRequest,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.core.send(make(tx)).await.map_err(|_| daemon_gone())?;
        rx.await.map_err(|_| daemon_gone())
    }

    async fn ledger<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, crate::ledger::LedgerError> + Send + 'static,
    ) -> Result<T, Status> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || {
            let l = ledger
                .lock()
                .map_err(|_| Status::internal("ledger lock poisoned"))?;
            f(&l).map_err(|e| Status::internal(format!("ledger: {e}")))
        })
        .await
        .map_err(|e| Status::internal(format!("ledger task: {e}")))?
    }
}

/// The page cursor: the id of the last record returned (the next page has older ones).
fn page_token(token: &str) -> Result<Option<i64>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "page_token: {token:?} is not a token from a previous page"
            ))
        })
}

#[tonic::async_trait]
impl pb::reclaimd_server::Reclaimd for ReclaimdService {
    async fn get_status(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.ask(CoreRequest::Status).await.map(Response::new)
    }

    async fn list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let r = req.into_inner();
        self.ask(|tx| CoreRequest::Sessions(r, tx))
            .await
            .map(Response::new)
    }

    async fn list_holders(
        &self,
        req: Request<pb::ListHoldersRequest>,
    ) -> Result<Response<pb::ListHoldersResponse>, Status> {
        let r = req.into_inner();
        const VERDICTS: [&str; 6] = crate::reconcile::Verdict::NAMES;
        if !r.verdict.is_empty() && !VERDICTS.contains(&r.verdict.as_str()) {
            return Err(Status::invalid_argument(format!(
                "verdict: {:?} is not one of {}",
                r.verdict,
                VERDICTS.join(", ")
            )));
        }
        self.ask(|tx| CoreRequest::Holders(r, tx))
            .await
            .map(Response::new)
    }

    async fn list_reclaims(
        &self,
        req: Request<pb::ListReclaimsRequest>,
    ) -> Result<Response<pb::ListReclaimsResponse>, Status> {
        let r = req.into_inner();
        if r.page_size > MAX_PAGE {
            return Err(Status::invalid_argument(format!(
                "page_size: {} is above the maximum {MAX_PAGE}",
                r.page_size
            )));
        }
        if r.since_ms < 0 || r.until_ms < 0 || (r.until_ms != 0 && r.until_ms < r.since_ms) {
            return Err(Status::invalid_argument(
                "since_ms/until_ms: times are Unix ms, since_ms <= until_ms",
            ));
        }
        let outcome = match r.outcome.as_str() {
            "" => None,
            o => Some(Outcome::parse(o).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "outcome: {o:?} is not one of pending, reclaimed, failed, skipped, released, interrupted"
                ))
            })?),
        };
        let size = if r.page_size == 0 { 100 } else { r.page_size };
        let q = Query {
            since_ms: (r.since_ms > 0).then_some(r.since_ms),
            until_ms: (r.until_ms > 0).then_some(r.until_ms),
            service: (!r.service.is_empty()).then_some(r.service),
            outcome,
            pid: (r.pid > 0).then_some(r.pid),
            before_id: page_token(&r.page_token)?,
            // One more than asked, to know whether another page follows.
            limit: Some(size + 1),
        };
        let mut rows = self.ledger(move |l| l.query(&q)).await?;
        let more = rows.len() > size as usize;
        rows.truncate(size as usize);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListReclaimsResponse {
            reclaims: rows.iter().map(convert::record).collect(),
            next_page_token,
        }))
    }

    type WatchEventsStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch_events(
        &self,
        _req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        // Polled only as fast as the client reads; a client that falls more than the
        // broadcast buffer behind gets RESOURCE_EXHAUSTED and its stream ends. The daemon
        // never waits for anyone: the broadcast overwrites.
        let mut lagged = false;
        let stream = BroadcastStream::new(self.events.subscribe()).map_while(move |item| {
            if lagged {
                return None;
            }
            Some(item.map_err(|BroadcastStreamRecvError::Lagged(n)| {
                lagged = true;
                tracing::warn!(missed = n, "API watcher too slow: dropped");
                Status::resource_exhausted(format!(
                    "client too slow: {n} events missed; reconnect to watch again"
                ))
            }))
        });
        let stream: Self::WatchEventsStream = Box::pin(stream);
        Ok(Response::new(stream))
    }

    async fn reclaim(
        &self,
        req: Request<pb::ReclaimRequest>,
    ) -> Result<Response<pb::ReclaimResponse>, Status> {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred);
        let r = req.into_inner();
        let peer = self.access.peer(cred);
        if !peer.admin {
            tracing::warn!(uid = ?peer.uid, pid = r.pid, "manual reclaim refused: not an admin");
            let d = Decision {
                time_ms: crate::reclaim::executor::unix_ms(),
                service: String::new(),
                session_kind: "manual".to_owned(),
                session_key: r.session_key.clone(),
                death_cause: String::new(),
                death_time_ms: None,
                pid: r.pid,
                start_time: 0,
                comm: String::new(),
                cgroup: String::new(),
                gpu_uuid: String::new(),
                bytes: None,
                action: Action::Skip,
                reason: format!(
                    "request refused: uid {} is not root or in the admin group ({})",
                    peer.uid
                        .map(|u| u.to_string())
                        .unwrap_or_else(|| "unknown".into()),
                    r.reason
                ),
            };
            let _ = self.ledger(move |l| l.record_decision(&d)).await;
            return Err(Status::permission_denied(if cred.is_some() {
                "Reclaim needs root or membership of [api] admin_group"
            } else {
                "Reclaim is served on the Unix socket only (TCP clients may read)"
            }));
        }
        if r.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "reason: say why (it goes in the ledger)",
            ));
        }
        if (r.pid == 0) == r.session_key.is_empty() {
            return Err(Status::invalid_argument(
                "pid/session_key: give exactly one of them",
            ));
        }
        let m = ManualReclaim {
            pid: r.pid,
            session_key: r.session_key,
            dry_run: r.dry_run,
            reason: r.reason,
            uid: peer.uid.unwrap_or(0),
        };
        let ids = self.ask(|tx| CoreRequest::Reclaim(m, tx)).await??;
        let records = self
            .ledger(move |l| {
                let mut out = Vec::new();
                for id in ids {
                    if let Some(r) = l.get(id)? {
                        out.push(r);
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(Response::new(pb::ReclaimResponse {
            records: records.iter().map(convert::record).collect(),
        }))
    }
}
