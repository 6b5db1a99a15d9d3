//! The clock the kernel stamps events with (`bpf_ktime_get_ns`), for latency measurements.

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The wall-clock time of a CLOCK_MONOTONIC instant in the past.
pub fn wall_time(mono_ns: u64) -> std::time::SystemTime {
    let ago = monotonic_ns().saturating_sub(mono_ns);
    std::time::SystemTime::now() - std::time::Duration::from_nanos(ago)
}

/// The same, as Unix milliseconds (how the ledger and the API write times).
pub fn wall_ms(mono_ns: u64) -> i64 {
    wall_time(mono_ns)
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix milliseconds now.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One reading of both clocks: what the engine is told the time is, so that it reads none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// CLOCK_MONOTONIC ns, the kernel events' clock.
    pub mono: u64,
    /// Unix ms, the ledger's and the API's clock.
    pub wall_ms: i64,
}

impl Now {
    pub fn read() -> Self {
        Self {
            mono: monotonic_ns(),
            wall_ms: unix_ms(),
        }
    }

    /// The Unix ms of an earlier CLOCK_MONOTONIC instant.
    pub fn wall_ms_of(&self, mono: u64) -> i64 {
        self.wall_ms - (self.mono.saturating_sub(mono) / 1_000_000) as i64
    }
}
