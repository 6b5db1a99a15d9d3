//! Where the daemon's events come from: the eBPF programs, or, where they cannot load (or
//! are turned off), the degraded path — the proc connector for processes, and a frequent
//! /proc sweep for everything (sockets included). Either way the model gets the same events.
use super::{ProbeError, ProbeOptions, Received, connector::ProcConnector};
use crate::config::ProbeMode;

pub enum EventSource {
    Ebpf(Box<super::Probe>),
    /// Degraded: process events from the connector; sockets only from the sweep.
    Connector(ProcConnector),
    /// Degraded further: nothing but the sweep.
    Sweep,
}

/// What the daemon runs on, and why it is not eBPF when it is not.
pub struct Opened {
    pub source: EventSource,
    pub degraded: Option<String>,
}

impl EventSource {
    /// eBPF when `mode` allows and it loads; otherwise the fallback. `ProbeMode::Ebpf` fails
    /// with eBPF's error instead of degrading.
    pub fn open(mode: ProbeMode, opts: &ProbeOptions) -> Result<Opened, ProbeError> {
        let why = match mode {
            ProbeMode::Ebpf => {
                return Ok(Opened {
                    source: Self::Ebpf(Box::new(super::Probe::load(opts)?)),
                    degraded: None,
                });
            }
            ProbeMode::Auto => match super::Probe::load(opts) {
                Ok(p) => {
                    return Ok(Opened {
                        source: Self::Ebpf(Box::new(p)),
                        degraded: None,
                    });
                }
                Err(e) => format!("eBPF unavailable: {e}"),
            },
            ProbeMode::Fallback => "eBPF turned off ([probe] mode = \"fallback\")".to_owned(),
        };
        Ok(match ProcConnector::open() {
            Ok(c) => Opened {
                source: Self::Connector(c),
                degraded: Some(why),
            },
            Err(e) => Opened {
                source: Self::Sweep,
                degraded: Some(format!("{why}; proc connector unavailable: {e}")),
            },
        })
    }

    /// As reported in status and metrics.
    pub fn mode(&self) -> &'static str {
        match self {
            Self::Ebpf(_) => "ebpf",
            Self::Connector(_) => "proc-connector",
            Self::Sweep => "proc-sweep",
        }
    }

    pub fn is_degraded(&self) -> bool {
        !matches!(self, Self::Ebpf(_))
    }

    /// Waits for events (forever, for the sweep alone) and appends them to `out`.
    pub async fn read_batch(&mut self, out: &mut Vec<Received>) -> Result<usize, ProbeError> {
        match self {
            Self::Ebpf(p) => p.read_batch(out).await,
            Self::Connector(c) => Ok(c.read_batch(out).await?),
            Self::Sweep => std::future::pending().await,
        }
    }

    /// Events lost so far. The connector only knows that it lost some, not how many: each
    /// overrun counts one.
    pub fn drops(&self) -> Result<u64, ProbeError> {
        match self {
            Self::Ebpf(p) => p.drops(),
            Self::Connector(c) => Ok(c.overruns()),
            Self::Sweep => Ok(0),
        }
    }
}
