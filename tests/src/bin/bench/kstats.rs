//! The kernel's own cost of a process's eBPF programs: run time and run count from the
//! kernel's BPF statistics (switched on only while measuring, through BPF_ENABLE_STATS, as
//! bpftop does), for the programs a process holds (prog ids from /proc/PID/fdinfo).
use std::{collections::HashMap, os::fd::OwnedFd};

/// The statistics are collected while this is held.
pub struct Enabled(#[expect(dead_code, reason = "held, never read")] OwnedFd);

pub fn enable() -> Option<Enabled> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(Enabled(fd)),
        Err(e) => {
            eprintln!("bench: BPF run-time statistics unavailable: {e}");
            None
        }
    }
}

/// Program name → (run time ns, runs), summed over same-named programs of `pid`.
pub type Sample = HashMap<String, (u64, u64)>;

fn prog_ids(pid: u32) -> Vec<u32> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf-prog")
        })
        .filter_map(|e| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .ok()?;
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

/// The programs `pid` holds now, with their statistics so far.
pub fn sample(pid: u32) -> Sample {
    let ids = prog_ids(pid);
    let mut out = Sample::new();
    for info in aya::programs::loaded_programs().flatten() {
        if !ids.contains(&info.id()) {
            continue;
        }
        let name = info.name_as_str().unwrap_or("?").to_owned();
        let e = out.entry(name).or_default();
        e.0 += info.run_time().as_nanos() as u64;
        e.1 += info.run_count();
    }
    out
}

/// What ran between two samples: per program (run time ns, runs), busiest first.
pub fn delta(before: &Sample, after: &Sample) -> Vec<(String, u64, u64)> {
    let mut out: Vec<(String, u64, u64)> = after
        .iter()
        .map(|(name, (ns, n))| {
            let (ns0, n0) = before.get(name).copied().unwrap_or_default();
            (name.clone(), ns.saturating_sub(ns0), n.saturating_sub(n0))
        })
        .filter(|(_, _, n)| *n > 0)
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.1));
    out
}
