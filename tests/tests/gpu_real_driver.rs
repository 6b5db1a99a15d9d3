//! The GPU inventory against the real NVIDIA driver: a process allocates GPU memory through
//! CUDA, reclaimd's inventory must see it, with its device files, and see it go.
//!
//! Ignored by default (CI has no GPU); `cargo xtask test` includes it where a driver is
//! loaded, and it runs as is wherever the test binaries are carried to a GPU machine.
use std::time::Duration;

use reclaimd::{
    gpu::{GpuInventory, GpuOptions, HolderStatus, NvmlStatus},
    ledger::Outcome,
};
use reclaimd_tests::{
    Daemon, TempDir, Workload, alive, kill, llm_service, nvidia_driver_present, snapshot_until,
    spawn_server, wait_for_record,
};

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

const MIB: u64 = 1 << 20;

#[test]
#[ignore = "needs an NVIDIA GPU and driver"]
fn real_driver_sees_a_cuda_allocation_and_its_release() {
    assert!(nvidia_driver_present(), "no NVIDIA driver loaded");
    let mut inv = GpuInventory::new(&GpuOptions::default()).unwrap();
    let before = inv.snapshot();
    let driver = match &before.nvml {
        NvmlStatus::Available { driver_version } => driver_version.clone(),
        other => panic!("NVML unavailable with a driver loaded: {other:?}"),
    };
    assert!(!before.devices.is_empty());
    for d in &before.devices {
        assert!(d.total_bytes > 0 && d.used_bytes <= d.total_bytes, "{d:?}");
        assert!(
            d.uuid.starts_with("GPU-") || d.uuid.starts_with("MIG-"),
            "{d:?}"
        );
    }

    const HOLD_MIB: u64 = 512;
    let w = Workload::spawn(&workload(), &["cuda-hold", &HOLD_MIB.to_string()]);
    w.line("holding");
    let pid = w.pid();
    let held = snapshot_until(&mut inv, Duration::from_secs(20), |s| {
        s.holders.get(&pid).is_some_and(|h| !h.memory.is_empty())
    });
    let h = &held.holders[&pid];
    assert_eq!(h.status, HolderStatus::Live, "{h:?}");
    assert!(h.known_bytes() >= HOLD_MIB * MIB, "{h:?}");
    assert!(
        h.fds.iter().all(|f| f.path.starts_with("/dev")) && !h.fds.is_empty(),
        "{h:?}"
    );
    let uuid = &h.memory[0].device_uuid;
    let dev = held.device(uuid).unwrap();
    assert!(
        h.fds
            .iter()
            .any(|f| f.minor.is_some() && f.minor == dev.minor),
        "holds /dev/nvidia{:?}: {:?}",
        dev.minor,
        h.fds
    );
    assert!(dev.attributed_bytes >= HOLD_MIB * MIB);
    let used_held = dev.used_bytes;

    let _ = w.finish();
    let released = snapshot_until(&mut inv, Duration::from_secs(20), |s| {
        !s.holders.contains_key(&pid)
    });
    let used_after = released.device(uuid).unwrap().used_bytes;
    assert!(
        used_held - used_after >= HOLD_MIB * MIB,
        "used {used_held} while held, {used_after} after"
    );
    eprintln!(
        "real driver {driver}: {} held {} MiB on {} ({}), holder fds {:?}; used {} -> {} MiB \
         after exit",
        pid,
        h.known_bytes() / MIB,
        uuid,
        dev.name,
        h.fds
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>(),
        used_held / MIB,
        used_after / MIB
    );
}

/// `reclaimd run` against the real driver: a service's worker allocates GPU memory through
/// CUDA, its server is SIGKILLed, and the worker must be reclaimed with the memory verified
/// back by NVML.
#[test]
#[ignore = "needs an NVIDIA GPU and driver"]
fn real_driver_end_to_end_reclaim() {
    assert!(nvidia_driver_present(), "no NVIDIA driver loaded");
    const HOLD_MIB: u64 = 768;
    let dir = TempDir::new("real-e2e");
    // The system's NVML: no [gpu] table.
    let d = Daemon::builder_in(dir.path())
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .policy("sweep", "500ms")
        .set("metrics", "listen", "")
        .service(llm_service())
        .start();
    let ledger = d.ledger.clone();
    let (server, worker) =
        spawn_server(&workload(), "llm-server", &format!("cuda:{HOLD_MIB}"), &[]);
    // Let the daemon see the worker hold its memory before the server dies.
    let mut inv = GpuInventory::new(&GpuOptions::default()).unwrap();
    snapshot_until(&mut inv, Duration::from_secs(20), |s| {
        s.holders.get(&worker).is_some_and(|h| !h.memory.is_empty())
    });
    std::thread::sleep(Duration::from_millis(1200));
    kill(server.pid());
    let r = wait_for_record(&ledger, worker, Duration::from_secs(30));
    let res = r.resolution.clone().unwrap();
    eprintln!("real-driver reclaim: {r:#?}");
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert!(!alive(worker));
    assert!(r.decision.gpu_uuid.starts_with("GPU-") || r.decision.gpu_uuid.starts_with("MIG-"));
    assert!(
        r.decision.bytes.is_some_and(|b| b >= HOLD_MIB * MIB),
        "{r:#?}"
    );
    assert!(
        res.bytes_freed.is_some_and(|b| b >= HOLD_MIB * MIB),
        "{r:#?}"
    );
    d.stop();
    let _ = server.finish();
}
