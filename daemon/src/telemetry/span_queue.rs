//! The span processor: a bounded queue in front of the OTLP exporter, drained by a thread of
//! its own in batches. The SDK's batch processor does the same but only logs what its full
//! queue drops; this one counts every span lost, whether the queue was full or the
//! collector failed, so operators see it on `reclaimd_spans_dropped_total`.
use std::{
    sync::{
        Arc, Mutex,
        mpsc::{
            Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError, channel, sync_channel,
        },
    },
    time::{Duration, Instant},
};

use opentelemetry::Context;
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    trace::{Span, SpanData, SpanExporter, SpanProcessor},
};

use super::Metrics;

/// Spans waiting for export; beyond this, new ones are dropped (and counted).
pub const QUEUE: usize = 2048;
const BATCH: usize = 512;
const EVERY: Duration = Duration::from_secs(5);

enum Control {
    Flush(Sender<()>),
    Shutdown(Sender<()>),
}

#[derive(Debug)]
pub struct SpanQueue {
    spans: SyncSender<SpanData>,
    control: Mutex<Sender<Control>>,
    metrics: Arc<Metrics>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Control::Flush(_) => "Flush",
            Control::Shutdown(_) => "Shutdown",
        })
    }
}

impl SpanQueue {
    pub fn new<E: SpanExporter + 'static>(exporter: E, metrics: Arc<Metrics>) -> Self {
        let (spans, rx) = sync_channel(QUEUE);
        let (control, crx) = channel();
        let m = metrics.clone();
        let worker = std::thread::Builder::new()
            .name("otlp-spans".into())
            .spawn(move || drain(exporter, rx, crx, m))
            .ok();
        Self {
            spans,
            control: Mutex::new(control),
            metrics,
            worker: Mutex::new(worker),
        }
    }

    fn ask(&self, make: impl FnOnce(Sender<()>) -> Control, timeout: Duration) -> OTelSdkResult {
        let (tx, rx) = channel();
        self.control
            .lock()
            .map_err(|_| OTelSdkError::InternalFailure("lock".into()))?
            .send(make(tx))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        rx.recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

fn export<E: SpanExporter>(exporter: &E, batch: Vec<SpanData>, metrics: &Metrics) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    match futures_executor::block_on(exporter.export(batch)) {
        Ok(()) => metrics.spans_exported(n),
        Err(_) => metrics.spans_dropped(n, "export_failed"),
    }
}

fn drain<E: SpanExporter>(
    exporter: E,
    spans: Receiver<SpanData>,
    control: Receiver<Control>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut due = Instant::now() + EVERY;
    loop {
        // Control first: a flush or shutdown sends everything queued so far.
        match control.try_recv() {
            Ok(c) => {
                batch.extend(spans.try_iter());
                for chunk in std::mem::take(&mut batch).chunks(BATCH) {
                    export(&exporter, chunk.to_vec(), &metrics);
                }
                match c {
                    Control::Flush(done) => {
                        let _ = done.send(());
                    }
                    Control::Shutdown(done) => {
                        let _ = exporter.shutdown();
                        let _ = done.send(());
                        return;
                    }
                }
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
        }
        let wait = due
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        match spans.recv_timeout(wait) {
            Ok(s) => batch.push(s),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if batch.len() >= BATCH || (Instant::now() >= due && !batch.is_empty()) {
            export(&exporter, std::mem::take(&mut batch), &metrics);
        }
        if Instant::now() >= due {
            due = Instant::now() + EVERY;
        }
    }
}

impl SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.spans.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.metrics.spans_dropped(1, "queue_full"),
            Err(TrySendError::Disconnected(_)) => self.metrics.spans_dropped(1, "shut_down"),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Control::Flush, Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let r = self.ask(Control::Shutdown, timeout);
        if r.is_ok()
            && let Ok(mut w) = self.worker.lock()
            && let Some(w) = w.take()
        {
            let _ = w.join();
        }
        r
    }

    fn set_resource(&mut self, _resource: &Resource) {}
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;

    /// A collector that takes nothing until the gate opens: the slowest possible one.
    #[derive(Debug)]
    struct Stuck {
        gate: Mutex<Receiver<()>>,
    }

    impl SpanExporter for Stuck {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            if let Ok(g) = self.gate.lock() {
                let _ = g.recv();
            }
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let metrics = Arc::new(Metrics::new(&Default::default()).unwrap());
        let (open, gate) = channel();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(SpanQueue::new(
                Stuck {
                    gate: Mutex::new(gate),
                },
                metrics.clone(),
            ))
            .build();
        let tracer = provider.tracer("test");
        let t = Instant::now();
        let n = QUEUE + 2 * BATCH + 100;
        for _ in 0..n {
            tracer.start("span").end();
        }
        // Ending spans never waited for the stuck collector.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let text = metrics.render();
        let dropped: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("reclaimd_spans_dropped_total{reason=\"queue_full\"} "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // At most one batch is in the exporter's hands; the queue holds QUEUE more.
        assert!(
            dropped as usize >= n - QUEUE - BATCH,
            "{dropped} of {n} dropped:\n{text}"
        );
        drop(open);
        let _ = provider.shutdown_with_timeout(Duration::from_secs(5));
    }
}
