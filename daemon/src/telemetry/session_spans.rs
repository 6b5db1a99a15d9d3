//! The `session` spans of dead sessions: started (back to when the session was first seen)
//! when its death is announced, ended when nothing binds to it any more. Reclaims are their
//! children.
use std::collections::HashMap;

use opentelemetry::{
    Context, KeyValue,
    trace::{Span as _, TraceContextExt as _, Tracer as _},
};

use crate::{
    clock,
    model::{BoundSession, Death, Ns, SessionKey},
};

#[derive(Default)]
pub struct SessionSpans {
    open: HashMap<SessionKey, Context>,
}

impl SessionSpans {
    /// Starts the span of a dead session, with OTel's attribute names where they exist and
    /// ours under `reclaimd.*`.
    pub fn start(&mut self, key: &SessionKey, service: &str, death: &Death, seen: Option<Ns>) {
        let mut attrs = vec![
            KeyValue::new("reclaimd.session.kind", key.kind().as_str()),
            KeyValue::new("reclaimd.session.key", key.to_string()),
            KeyValue::new("reclaimd.service", service.to_owned()),
            KeyValue::new("reclaimd.death_cause", death.cause.clone()),
        ];
        match key {
            SessionKey::Process(root) => {
                attrs.push(KeyValue::new("process.pid", i64::from(root.pid)));
            }
            SessionKey::Connection(k) => {
                attrs.push(KeyValue::new("server.port", i64::from(k.local.port())));
                attrs.push(KeyValue::new(
                    "network.peer.address",
                    k.remote.ip().to_string(),
                ));
                attrs.push(KeyValue::new(
                    "network.peer.port",
                    i64::from(k.remote.port()),
                ));
            }
        }
        let tracer = super::traces::tracer();
        let mut span = tracer
            .span_builder("session")
            .with_start_time(clock::wall_time(seen.unwrap_or(death.at)))
            .with_attributes(attrs)
            .start(&tracer);
        span.add_event_with_timestamp(
            "died",
            clock::wall_time(death.at),
            vec![KeyValue::new("cause", death.cause.clone())],
        );
        self.open
            .insert(key.clone(), Context::new().with_span(span));
    }

    pub fn end(&mut self, key: &SessionKey) {
        if let Some(cx) = self.open.remove(key) {
            cx.span().end();
        }
    }

    /// The trace context of the first of `sessions` with an open span.
    pub fn context_of(&self, sessions: &[BoundSession]) -> Option<Context> {
        sessions.iter().find_map(|s| self.open.get(&s.key)).cloned()
    }

    pub fn end_all(&mut self) {
        for (_, cx) in self.open.drain() {
            cx.span().end();
        }
    }
}
