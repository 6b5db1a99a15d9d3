//! Sizes and tables as people read them.

/// Bytes as MiB or GiB, the units `nvidia-smi` users think in.
pub fn bytes(b: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    const GIB: f64 = (1u64 << 30) as f64;
    let f = b as f64;
    if f >= GIB {
        format!("{:.1} GiB", f / GIB)
    } else {
        format!("{:.0} MiB", f / MIB)
    }
}

/// "used / total", as the device tables show memory.
pub fn used_of(used: u64, total: u64) -> String {
    format!("{} / {}", bytes(used), bytes(total))
}

/// How long ago a Unix-ms time was, coarsely: "12s ago", "3m ago", "5h ago", "2d ago".
pub fn ago(then_ms: i64, now_ms: i64) -> String {
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// A duration in ms as people read it: "850 ms", "12.3 s".
pub fn millis(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_and_durations() {
        assert_eq!(super::ago(0, 5_000), "5s ago");
        assert_eq!(super::ago(0, 180_000), "3m ago");
        assert_eq!(super::ago(0, 3 * 3_600_000), "3h ago");
        assert_eq!(super::ago(0, 49 * 3_600_000), "2d ago");
        assert_eq!(super::ago(10, 0), "0s ago", "clock skew is not negative");
        assert_eq!(super::millis(850), "850 ms");
        assert_eq!(super::millis(12_345), "12.3 s");
    }

    #[test]
    fn sizes() {
        assert_eq!(super::bytes(0), "0 MiB");
        assert_eq!(super::bytes(256 << 20), "256 MiB");
        assert_eq!(super::bytes(3 << 30), "3.0 GiB");
        assert_eq!(super::bytes((80 << 30) + (512 << 20)), "80.5 GiB");
    }
}
