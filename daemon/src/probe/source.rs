//! Where the daemon's events come from, capability by capability: the eBPF programs this
//! kernel can run, and for what they cannot see, the degraded paths — the proc connector for
//! process forks and exits, a frequent /proc sweep for socket closes (and for processes where
//! the connector is unavailable too), the snapshot's fd reading for socket owners. Either way
//! the model gets the same events. The whole daemon runs without eBPF only when no program
//! loads (or eBPF is turned off).
use super::{
    Capability, CapabilityStatus, ProbeError, ProbeOptions, Received, Source,
    connector::ProcConnector,
};
use crate::{config::ProbeMode, event::KernelEvent};

pub struct EventSource {
    ebpf: Option<Box<super::Probe>>,
    /// Open when eBPF gives no `exit` or no `fork`.
    connector: Option<ProcConnector>,
    capabilities: Vec<CapabilityStatus>,
}

/// What the daemon runs on, and why it is not eBPF when it is not.
pub struct Opened {
    pub source: EventSource,
    /// Set when no eBPF program runs at all.
    pub degraded: Option<String>,
}

impl EventSource {
    /// eBPF where `mode` allows and the kernel has it, the fallback for the rest.
    /// `ProbeMode::Ebpf` fails with eBPF's error when no program loads, instead of degrading.
    pub fn open(mode: ProbeMode, opts: &ProbeOptions) -> Result<Opened, ProbeError> {
        let (ebpf, why) = match mode {
            ProbeMode::Ebpf => (Some(Box::new(super::Probe::load(opts)?)), None),
            ProbeMode::Auto => match super::Probe::load(opts) {
                Ok(p) => (Some(Box::new(p)), None),
                Err(e) => (None, Some(format!("eBPF unavailable: {e}"))),
            },
            ProbeMode::Fallback => (
                None,
                Some("eBPF turned off ([probe] mode = \"fallback\")".to_owned()),
            ),
        };
        let has = |c: Capability| ebpf.as_ref().is_some_and(|p| attached(p, c).is_some());
        let (connector, connector_error) = if has(Capability::Exit) && has(Capability::Fork) {
            (None, None)
        } else {
            match ProcConnector::open() {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(format!("proc connector unavailable: {e}"))),
            }
        };
        let capabilities = Capability::ALL
            .into_iter()
            .map(|c| {
                status(
                    c,
                    ebpf.as_deref(),
                    why.as_deref(),
                    connector.is_some(),
                    connector_error.as_deref(),
                )
            })
            .collect();
        let degraded = why.map(|w| match &connector_error {
            Some(e) => format!("{w}; {e}"),
            None => w,
        });
        Ok(Opened {
            source: Self {
                ebpf,
                connector,
                capabilities,
            },
            degraded,
        })
    }

    /// As reported in status and metrics: "ebpf" while any program runs.
    pub fn mode(&self) -> &'static str {
        match (&self.ebpf, &self.connector) {
            (Some(_), _) => Source::Ebpf.name(),
            (None, Some(_)) => Source::ProcConnector.name(),
            (None, None) => Source::ProcSweep.name(),
        }
    }

    pub fn is_degraded(&self) -> bool {
        self.ebpf.is_none()
    }

    /// Every capability, where its events come from, and how or why.
    pub fn capabilities(&self) -> &[CapabilityStatus] {
        &self.capabilities
    }

    /// Whether some deaths (processes or connections) are only found by the /proc sweep or
    /// the connector, so the sweep must run at `[probe] fallback_sweep`.
    pub fn needs_fast_sweep(&self) -> bool {
        self.capabilities.iter().any(|c| {
            matches!(
                c.capability,
                Capability::Exit | Capability::Fork | Capability::Tcp
            ) && c.source != Source::Ebpf
        })
    }

    /// Waits for events (forever, for the sweep alone) and appends them to `out`.
    pub async fn read_batch(&mut self, out: &mut Vec<Received>) -> Result<usize, ProbeError> {
        let before = out.len();
        match (&mut self.ebpf, &mut self.connector) {
            (Some(p), None) => p.read_batch(out).await?,
            (None, Some(c)) => c.read_batch(out).await?,
            (Some(p), Some(c)) => {
                let mut from_connector = Vec::new();
                tokio::select! {
                    read = p.read_batch(out) => read?,
                    read = c.read_batch(&mut from_connector) => read?,
                };
                // Only what eBPF does not report itself: never a fork twice.
                let caps = &self.capabilities;
                out.extend(
                    from_connector
                        .into_iter()
                        .filter(|r| connector_stands_in(caps, &r.event)),
                );
                0
            }
            (None, None) => std::future::pending().await,
        };
        Ok(out.len() - before)
    }

    /// The kernel sockets whose death must wake the daemon at once (eBPF only; the
    /// connector reports no sockets).
    pub fn set_bound(&mut self, socks: &std::collections::HashSet<u64>) -> Result<(), ProbeError> {
        match &mut self.ebpf {
            Some(p) => p.set_bound(socks),
            None => Ok(()),
        }
    }

    /// Events lost so far. The connector only knows that it lost some, not how many: each
    /// overrun counts one.
    pub fn drops(&self) -> Result<u64, ProbeError> {
        let ebpf = match &self.ebpf {
            Some(p) => p.drops()?,
            None => 0,
        };
        Ok(ebpf + self.connector.as_ref().map_or(0, ProcConnector::overruns))
    }
}

fn attached(p: &super::Probe, c: Capability) -> Option<&str> {
    p.attached()
        .iter()
        .find(|(a, _)| *a == c)
        .map(|(_, detail)| detail.as_str())
}

/// Capability `c`: from eBPF when its programs run, else from its fallback, with why.
fn status(
    c: Capability,
    ebpf: Option<&super::Probe>,
    no_ebpf: Option<&str>,
    connector: bool,
    connector_error: Option<&str>,
) -> CapabilityStatus {
    if let Some(detail) = ebpf.and_then(|p| attached(p, c)) {
        return CapabilityStatus {
            capability: c,
            source: Source::Ebpf,
            detail: detail.to_owned(),
        };
    }
    let why = ebpf
        .and_then(|p| p.missing().iter().chain(p.spared()).find(|(m, _)| *m == c))
        .map(|(_, why)| why.clone())
        .or_else(|| no_ebpf.map(str::to_owned))
        .unwrap_or_default();
    let source = c.fallback(connector);
    let detail = match (source, connector_error) {
        (Source::ProcSweep, Some(e)) if matches!(c, Capability::Exit | Capability::Fork) => {
            format!("{why}; {e}")
        }
        _ => why,
    };
    CapabilityStatus {
        capability: c,
        source,
        detail,
    }
}

/// Whether the connector reports `event` for a capability eBPF does not give.
fn connector_stands_in(caps: &[CapabilityStatus], event: &KernelEvent) -> bool {
    let cap = match event {
        KernelEvent::Exit { .. } => Capability::Exit,
        KernelEvent::Fork { .. } => Capability::Fork,
        _ => return false,
    };
    caps.iter()
        .any(|s| s.capability == cap && s.source == Source::ProcConnector)
}
