//! The `reclaimd.v1.Reclaimd` service. Reads that need the daemon's live state are asked of
//! the daemon's core through a channel (it owns that state); ledger reads go to the ledger.
use std::pin::Pin;

use tokio::sync::{broadcast, mpsc, oneshot};

pub use crate::runtime::request::CoreRequest;
use tokio_stream::{
    Stream, StreamExt as _,
    wrappers::{BroadcastStream, errors::BroadcastStreamRecvError},
};
use tonic::{Request, Response, Status, transport::server::UdsConnectInfo};

use super::{access::Access, convert, pb};
use crate::{
    clock::Now,
    engine::{Manual, ManualError, ManualRequest, Published, Target},
    ledger::{Ledger, Outcome, Query},
    ledger_writer::LedgerWriter,
    runtime::request::{HolderFilter, SessionFilter},
};

#[derive(Clone)]
pub struct ReclaimdService {
    pub core: mpsc::Sender<CoreRequest>,
    pub events: broadcast::Sender<Published>,
    pub ledger: LedgerWriter,
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
        self.ledger
            .ask(f)
            .await
            .map_err(|e| Status::internal(format!("ledger: {e}")))
    }
}

/// An admin's reclaim request, checked, as the engine takes it.
fn manual_request(r: pb::ReclaimRequest, uid: u32) -> Result<ManualRequest, Status> {
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
    let target = if r.pid != 0 {
        Target::Pid(r.pid)
    } else {
        // No holder can be bound to what is not a session key.
        Target::Session(r.session_key.parse().map_err(|_| {
            manual_status(ManualError::NotFound(format!(
                "no holder is bound to session {:?}",
                r.session_key
            )))
        })?)
    };
    Ok(ManualRequest {
        target,
        manual: Manual {
            reason: r.reason,
            dry_run: r.dry_run,
            uid,
        },
    })
}

/// A manual reclaim the engine could not order, as the API reports it.
fn manual_status(e: ManualError) -> Status {
    let text = e.to_string();
    match e {
        ManualError::NotFound(_) => Status::not_found(text),
        ManualError::Busy(_) => Status::failed_precondition(text),
        ManualError::QueueFull => Status::resource_exhausted(text),
        ManualError::Unrecorded(_) => Status::unavailable(text),
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
        let view = self.ask(CoreRequest::Status).await?;
        Ok(Response::new(convert::status(&view)))
    }

    async fn list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let r = req.into_inner();
        let filter = SessionFilter {
            service: r.service,
            include_dead: r.include_dead,
        };
        let sessions = self.ask(|tx| CoreRequest::Sessions(filter, tx)).await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: sessions.iter().map(convert::session).collect(),
        }))
    }

    async fn list_holders(
        &self,
        req: Request<pb::ListHoldersRequest>,
    ) -> Result<Response<pb::ListHoldersResponse>, Status> {
        let r = req.into_inner();
        use crate::reconcile::VerdictKind;
        let verdict = match r.verdict.as_str() {
            "" => None,
            v => Some(v.parse::<VerdictKind>().map_err(|_| {
                Status::invalid_argument(format!(
                    "verdict: {:?} is not one of {}",
                    r.verdict,
                    VerdictKind::NAMES.join(", ")
                ))
            })?),
        };
        let filter = HolderFilter {
            service: r.service,
            verdict,
        };
        let view = self.ask(|tx| CoreRequest::Holders(filter, tx)).await?;
        Ok(Response::new(pb::ListHoldersResponse {
            holders: view.holders.iter().map(convert::holder).collect(),
            inventory_time_ms: view.time_ms,
        }))
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
            Some(
                item.map(|p| convert::event(&p))
                    .map_err(|BroadcastStreamRecvError::Lagged(n)| {
                        lagged = true;
                        tracing::warn!(missed = n, "API watcher too slow: dropped");
                        Status::resource_exhausted(format!(
                            "client too slow: {n} events missed; reconnect to watch again"
                        ))
                    }),
            )
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
            let d =
                crate::record::refused(r.pid, &r.session_key, peer.uid, &r.reason, &Now::read());
            let _ = self.ledger(move |l| l.record_decision(&d)).await;
            return Err(Status::permission_denied(if cred.is_some() {
                "Reclaim needs root or membership of [api] admin_group"
            } else {
                "Reclaim is served on the Unix socket only (TCP clients may read)"
            }));
        }
        let m = manual_request(r, peer.uid.unwrap_or(0))?;
        let ids = self
            .ask(|tx| CoreRequest::Reclaim(m, tx))
            .await?
            .map_err(manual_status)?;
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
