//! Taking a snapshot, on a blocking thread: GPU inventory, the /proc facts and socket tables
//! it needs, read here so the engine reads nothing.
use std::{collections::HashMap, path::PathBuf, time::Duration};

use crate::{
    clock,
    engine::{HeldFd, Snapshot},
    gpu::{GpuInventory, HolderStatus},
    model::ProcFacts,
    scan,
};

/// What one snapshot brings back from the blocking thread.
pub struct Taken {
    /// The NVML handle, back for the next snapshot.
    pub gpu: GpuInventory,
    pub snapshot: Snapshot,
    /// How long the GPU inventory took.
    pub took: Duration,
}

/// `ports`: the services' ports, whose sockets are the only ones looked up.
pub fn take(mut gpu: GpuInventory, full: bool, proc_root: PathBuf, ports: &[u16]) -> Taken {
    let started = clock::monotonic_ns();
    let procs = full.then(|| scan::all_facts(&proc_root));
    let t0 = std::time::Instant::now();
    let inventory = if full { gpu.snapshot() } else { gpu.refresh() };
    let took = t0.elapsed();
    let live: Vec<u32> = inventory
        .holders
        .values()
        .filter(|h| h.status == HolderStatus::Live)
        .map(|h| h.pid)
        .collect();
    let sockets: Vec<(u32, Vec<(u32, u64)>)> = live
        .iter()
        .map(|pid| (*pid, scan::socket_fds(&proc_root, *pid)))
        .collect();
    // Even filtered, asking costs a netlink round trip per namespace: only for a full scan
    // or a holder with sockets.
    let table = if full || sockets.iter().any(|(_, s)| !s.is_empty()) {
        scan::tcp_sockets_seen_by(&proc_root, live.iter().copied(), ports)
    } else {
        HashMap::new()
    };
    let mut held = HashMap::new();
    let conns = sockets
        .iter()
        .map(|(pid, fds)| {
            let found = scan::connections_held(fds, &table);
            for (fd, sock) in &found {
                held.entry(sock.key.clone()).or_insert(HeldFd {
                    pid: *pid,
                    fd: *fd,
                    state: sock.state,
                });
            }
            (*pid, found.into_iter().map(|(_, sock)| sock.key).collect())
        })
        .collect();
    let holder_facts = live
        .iter()
        .flat_map(|pid| lineage_facts(&proc_root, *pid))
        .collect();
    Taken {
        gpu,
        snapshot: Snapshot {
            started,
            procs,
            tcp: full.then(|| table.into_values().collect()),
            inventory,
            conns,
            held,
            holder_facts,
        },
        took,
    }
}

/// The facts of `pid` and its living ancestors, nearest first (at most 16).
fn lineage_facts(proc_root: &std::path::Path, pid: u32) -> Vec<ProcFacts> {
    let mut out = Vec::new();
    let mut pid = pid;
    for _ in 0..16 {
        let Some(f) = scan::facts(proc_root, pid) else {
            break;
        };
        let ppid = f.ppid;
        out.push(f);
        if ppid <= 1 {
            break;
        }
        pid = ppid;
    }
    out
}
