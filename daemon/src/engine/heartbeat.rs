//! Which connections get a heartbeat: the live connection sessions of services with
//! `[service.heartbeat]` that a GPU holder holds, each armed once while it is held.
use std::collections::{HashMap, HashSet};

use super::{Effect, Engine, HeldFd};
use crate::{config::Heartbeat, ids::ConnKey, model::SessionKey, reconcile::Assessment};

/// Set the service's keepalive on the socket of `conn`, reached through `holder`'s fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm {
    pub service: String,
    pub conn: ConnKey,
    pub holder: HeldFd,
    pub beat: Heartbeat,
}

impl Engine {
    pub(super) fn arm_heartbeats(
        &mut self,
        assessments: &[Assessment],
        held: &HashMap<ConnKey, HeldFd>,
        out: &mut Vec<Effect>,
    ) {
        // A connection no holder holds any more is forgotten: its socket is gone or no
        // longer ours to watch.
        self.armed.retain(|k| held.contains_key(k));
        for a in assessments {
            let Some((service, beat)) = a
                .service
                .as_deref()
                .and_then(|name| self.cfg.service(name))
                .and_then(|s| Some((&s.name, s.heartbeat?)))
            else {
                continue;
            };
            let live = a.sessions.iter().filter(|s| s.death.is_none());
            for key in live.filter_map(|s| match &s.key {
                SessionKey::Connection(k) => Some(k),
                SessionKey::Process(_) => None,
            }) {
                let Some(holder) = held.get(key) else {
                    continue;
                };
                if self.armed.insert(key.clone()) {
                    out.push(Effect::Heartbeat(Arm {
                        service: service.clone(),
                        conn: key.clone(),
                        holder: *holder,
                        beat,
                    }));
                }
            }
        }
    }
}

/// The connections armed so far.
pub(super) type Armed = HashSet<ConnKey>;
