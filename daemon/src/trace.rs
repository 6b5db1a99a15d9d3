//! `reclaimd trace`: stream the kernel events the daemon sees, one line each, until
//! interrupted. For operators (is the kernel side working, what does it see?) and for tests.
use std::{
    io::{self, Write},
    time::Duration,
};

use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use crate::probe::{Capability, Probe, ProbeOptions, Received};

#[derive(Debug, Clone)]
pub struct TraceOptions {
    pub probe: ProbeOptions,
    pub json: bool,
}

/// How often the drop counter is read while tracing.
const DROP_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(transparent)]
    Probe(#[from] crate::probe::ProbeError),
    #[error("writing to stdout: {0}")]
    Stdout(#[source] io::Error),
    #[error("installing signal handlers: {0}")]
    Signal(#[source] io::Error),
}

/// Runs until SIGINT or SIGTERM (or stdout closes), then prints a summary.
pub async fn run(opts: TraceOptions) -> Result<(), TraceError> {
    let mut sigint = signal(SignalKind::interrupt()).map_err(TraceError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(TraceError::Signal)?;
    let mut probe = Probe::load(&opts.probe)?;
    let mut out = Output {
        json: opts.json,
        stdout: io::stdout().lock(),
    };
    for (cap, why) in probe.missing() {
        tracing::warn!(capability = cap.name(), reason = %why,
            "this kernel does not show these events");
    }
    if let Err(e) = out.ready(&opts.probe, &probe) {
        return closed_or(e);
    }

    let mut batch: Vec<Received> = Vec::with_capacity(1024);
    let mut events: u64 = 0;
    let mut reported_drops: u64 = 0;
    let mut poll = tokio::time::interval(DROP_POLL);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = poll.tick() => {
                let drops = probe.drops()?;
                if drops > reported_drops {
                    tracing::warn!(lost = drops - reported_drops, total = drops,
                        "kernel dropped events: ring buffer full (raise --ring-bytes)");
                    if let Err(e) = out.lost(drops - reported_drops) {
                        return closed_or(e);
                    }
                    reported_drops = drops;
                }
            }
            read = probe.read_batch(&mut batch) => {
                read?;
                for r in batch.drain(..) {
                    events += 1;
                    if let Err(e) = out.event(&r) {
                        return closed_or(e);
                    }
                }
                if let Err(e) = out.flush() {
                    return closed_or(e);
                }
            }
        }
    }
    // Whatever arrived before the signal is still printed. In batched mode a read ends on
    // its own timer, possibly with nothing: that is the end too.
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(50), probe.read_batch(&mut batch)).await
        && n > 0
    {
        for r in batch.drain(..) {
            events += 1;
            if let Err(e) = out.event(&r) {
                return closed_or(e);
            }
        }
    }
    let drops = probe.drops()?;
    let malformed = probe.malformed();
    drop(probe);
    tracing::info!(
        events,
        dropped = drops,
        malformed,
        "trace stopped, programs detached"
    );
    match out.summary(events, drops, malformed) {
        Ok(()) => Ok(()),
        Err(e) => closed_or(e),
    }
}

/// A reader that went away (`reclaimd trace | head`) is a normal end, not an error.
fn closed_or(e: io::Error) -> Result<(), TraceError> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(TraceError::Stdout(e))
    }
}

/// Capabilities with their detail or reason, as a JSON object keyed by capability name.
fn by_name(list: &[(Capability, String)]) -> serde_json::Map<String, serde_json::Value> {
    list.iter()
        .map(|(c, text)| (c.name().to_owned(), json!(text)))
        .collect()
}

struct Output<'a> {
    json: bool,
    stdout: io::StdoutLock<'a>,
}

impl Output<'_> {
    /// The first line: what is attached and what this kernel cannot show.
    fn ready(&mut self, opts: &ProbeOptions, probe: &Probe) -> io::Result<()> {
        if self.json {
            let v = json!({ "kind": "ready", "ports": opts.watched_ports,
                            "ring_bytes": opts.ring_bytes,
                            "capabilities": by_name(probe.attached()),
                            "missing": by_name(probe.missing()),
                            "spared": by_name(probe.spared()) });
            writeln!(self.stdout, "{v}")?;
        } else {
            for (c, why) in probe.missing() {
                writeln!(self.stdout, "# cannot see {}: {why}", c.name())?;
            }
            for (c, why) in probe.spared() {
                writeln!(self.stdout, "# left out {}: {why}", c.name())?;
            }
            writeln!(
                self.stdout,
                "{:>14} {:<5} {:>7} {:<16} DETAILS",
                "TIME(s)", "KIND", "PID", "COMM"
            )?;
        }
        self.stdout.flush()
    }

    fn event(&mut self, r: &Received) -> io::Result<()> {
        if self.json {
            writeln!(self.stdout, "{}", r.event.to_json(r.recv_ns))
        } else {
            writeln!(self.stdout, "{}", r.event.to_text())
        }
    }

    fn lost(&mut self, count: u64) -> io::Result<()> {
        if self.json {
            writeln!(self.stdout, "{}", json!({ "kind": "lost", "count": count }))?;
        } else {
            writeln!(self.stdout, "# lost {count} events (ring buffer full)")?;
        }
        self.stdout.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stdout.flush()
    }

    fn summary(&mut self, events: u64, dropped: u64, malformed: u64) -> io::Result<()> {
        if self.json {
            let v = json!({ "kind": "summary", "events": events, "dropped": dropped,
                            "malformed": malformed });
            writeln!(self.stdout, "{v}")?;
        } else {
            writeln!(
                self.stdout,
                "# {events} events, {dropped} dropped by the kernel, {malformed} malformed"
            )?;
        }
        self.stdout.flush()
    }
}
