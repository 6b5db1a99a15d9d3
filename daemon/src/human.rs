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

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::bytes(0), "0 MiB");
        assert_eq!(super::bytes(256 << 20), "256 MiB");
        assert_eq!(super::bytes(3 << 30), "3.0 GiB");
        assert_eq!(super::bytes((80 << 30) + (512 << 20)), "80.5 GiB");
    }
}
