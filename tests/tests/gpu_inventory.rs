//! The GPU inventory through the real nvml-wrapper code path, against this repository's fake
//! `libnvidia-ml.so.1`, with real processes holding (fake) device files.
use std::time::Duration;

use reclaimd::gpu::{GpuInventory, GpuOptions, HolderStatus, NvmlStatus, ProcessKind};
use reclaimd_tests::{FakeGpu, Workload, snapshot_until};

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

const MIB: u64 = 1 << 20;

fn inventory(gpu: &FakeGpu) -> GpuInventory {
    GpuInventory::new(&GpuOptions {
        nvml_library: Some(gpu.lib.clone()),
        device_glob: gpu.device_glob(),
    })
    .expect("inventory")
}

fn holder_of(gpu: &FakeGpu, minor: u32) -> Workload {
    let w = Workload::spawn(
        &workload(),
        &["hold", gpu.device_file(minor).to_str().unwrap()],
    );
    w.line("holding");
    w
}

#[test]
fn devices_and_per_process_memory_are_joined_with_device_fds() {
    let gpu = FakeGpu::new("");
    let a = holder_of(&gpu, 0);
    let b = holder_of(&gpu, 1);
    gpu.set_state(&format!(
        "device 0 GPU-aaaa 16384 Fake H100 80GB HBM3\n\
         device 1 GPU-bbbb 8192 Fake L4\n\
         proc 0 {} 1024 compute\n\
         proc 1 {} 512 graphics\n\
         unattributed 0 100\n",
        a.pid(),
        b.pid()
    ));
    let s = inventory(&gpu).snapshot();
    assert!(
        matches!(s.nvml, NvmlStatus::Available { .. }),
        "{:?}",
        s.nvml
    );
    assert_eq!(s.devices.len(), 2);
    let d0 = s.device("GPU-aaaa").unwrap();
    assert_eq!(d0.name, "Fake H100 80GB HBM3");
    assert_eq!(d0.total_bytes, 16384 * MIB);
    assert_eq!(d0.used_bytes, 1124 * MIB);
    assert_eq!(d0.attributed_bytes, 1024 * MIB);
    assert_eq!(d0.unattributed_bytes, 100 * MIB);
    assert_eq!(d0.minor, Some(0));
    let d1 = s.device("GPU-bbbb").unwrap();
    assert_eq!(d1.unattributed_bytes, 0);

    let ha = &s.holders[&a.pid()];
    assert_eq!(ha.status, HolderStatus::Live);
    assert_eq!(ha.comm.as_deref(), Some("workload"));
    assert_eq!(ha.memory.len(), 1);
    assert_eq!(ha.memory[0].bytes, Some(1024 * MIB));
    assert_eq!(ha.memory[0].kind, ProcessKind::Compute);
    assert_eq!(ha.memory[0].device_uuid, "GPU-aaaa");
    assert_eq!(ha.fds.len(), 1);
    assert_eq!(ha.fds[0].minor, Some(0));
    assert!(ha.start_time.unwrap() > 0);
    let hb = &s.holders[&b.pid()];
    assert_eq!(hb.memory[0].kind, ProcessKind::Graphics);
    assert_eq!(hb.fds[0].minor, Some(1));
    // reclaimd's own handles never make it a holder.
    assert!(!s.holders.contains_key(&std::process::id()));
    let _ = a.finish();
    let _ = b.finish();
}

#[test]
fn unknown_memory_is_kept_as_unknown_not_zero() {
    let gpu = FakeGpu::new("");
    let h = holder_of(&gpu, 0);
    gpu.set_state(&format!(
        "device 0 GPU-aaaa 16384 Fake\nproc 0 {} na compute\nunattributed 0 300\n",
        h.pid()
    ));
    let s = inventory(&gpu).snapshot();
    let holder = &s.holders[&h.pid()];
    assert_eq!(holder.status, HolderStatus::Live);
    assert_eq!(holder.memory[0].bytes, None);
    assert!(holder.bytes_unknown());
    let d = s.device("GPU-aaaa").unwrap();
    assert_eq!(d.attributed_bytes, 0, "unknown is not counted as known");
    assert_eq!(d.unattributed_bytes, 300 * MIB);
    let _ = h.finish();
}

#[test]
fn listed_pid_without_a_device_fd_or_without_a_process_is_never_live() {
    let gpu = FakeGpu::new("");
    // Alive but holding nothing: NVML's number may be someone else by now.
    let idle = Workload::spawn(&workload(), &["hold"]);
    idle.line("holding");
    // A pid that no longer exists: the fake, like the driver, stops reporting it.
    let gone = Workload::spawn(&workload(), &["exit", "0"]);
    let gone_pid = gone.pid();
    let _ = gone.finish();
    gpu.set_state(&format!(
        "device 0 GPU-aaaa 16384 Fake\nproc 0 {} 64 compute\nproc 0 {gone_pid} 64 compute\n",
        idle.pid()
    ));
    let s = inventory(&gpu).snapshot();
    let h = &s.holders[&idle.pid()];
    assert_eq!(h.status, HolderStatus::NoDeviceFd);
    assert!(!h.status.actionable());
    assert!(
        !s.holders.contains_key(&gone_pid),
        "dead pids are not reported"
    );
    assert_eq!(s.device("GPU-aaaa").unwrap().attributed_bytes, 64 * MIB);
    let _ = idle.finish();
}

#[test]
fn a_child_holding_an_inherited_handle_is_found_through_its_fd() {
    let gpu = FakeGpu::new("device 0 GPU-aaaa 16384 Fake\n");
    let server = Workload::spawn(
        &workload(),
        &["hold-fork", gpu.device_file(0).to_str().unwrap()],
    );
    let server_pid = server.pid();
    let child: u32 = server.line("child").parse().unwrap();
    // Only the creator is listed, as the driver does; the creator then dies and the
    // memory stays held through the child's inherited fd.
    gpu.set_state(&format!(
        "device 0 GPU-aaaa 16384 Fake\nproc 0 {server_pid} 2048 compute\n"
    ));
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success());
    gpu.set_state("device 0 GPU-aaaa 16384 Fake\nunattributed 0 2048\n");

    let s = inventory(&gpu).snapshot();
    assert!(
        !s.holders.contains_key(&server_pid),
        "the dead creator is not a holder"
    );
    let h = &s.holders[&child];
    assert_eq!(h.status, HolderStatus::Live);
    assert_eq!(h.ppid.map(|p| p != server_pid), Some(true), "reparented");
    assert!(h.memory.is_empty(), "NVML does not list the child");
    assert_eq!(h.fds[0].minor, Some(0));
    assert_eq!(s.device("GPU-aaaa").unwrap().unattributed_bytes, 2048 * MIB);
    let _ = server.finish(); // closes the shared stdin: the child exits
}

#[test]
fn mps_clients_come_from_the_mps_list() {
    let gpu = FakeGpu::new("");
    let h = holder_of(&gpu, 0);
    gpu.set_state(&format!(
        "device 0 GPU-aaaa 16384 Fake\nproc 0 {} 256 mps\n",
        h.pid()
    ));
    let s = inventory(&gpu).snapshot();
    assert_eq!(s.holders[&h.pid()].memory[0].kind, ProcessKind::Mps);
    let _ = h.finish();
}

#[test]
fn mig_instances_carry_their_own_processes_and_memory() {
    let gpu = FakeGpu::new("");
    let a = holder_of(&gpu, 0);
    let b = holder_of(&gpu, 0);
    gpu.set_state(&format!(
        "device 0 GPU-aaaa 81920 Fake A100\n\
         mig 0 0 MIG-1111 40960 Fake A100 3g.40gb\n\
         mig 0 2 MIG-2222 20480 Fake A100 2g.20gb\n\
         device 1 GPU-bbbb 16384 Fake L4\n\
         proc 0:0 {} 1024 compute\n\
         proc 0:2 {} 512 compute\n\
         unattributed 0:2 64\n\
         unattributed 0 32\n",
        a.pid(),
        b.pid()
    ));
    let s = inventory(&gpu).snapshot();
    let uuids: Vec<(&str, u32)> = s
        .devices
        .iter()
        .map(|d| (d.uuid.as_str(), d.index))
        .collect();
    assert_eq!(
        uuids,
        [
            ("GPU-aaaa", 0),
            ("MIG-1111", 0),
            ("MIG-2222", 2),
            ("GPU-bbbb", 1)
        ],
        "MIG instances keep their own index"
    );
    let parent = s.device("GPU-aaaa").unwrap();
    assert_eq!(parent.used_bytes, (1024 + 512 + 64 + 32) * MIB);
    assert_eq!(parent.attributed_bytes, (1024 + 512) * MIB);
    assert_eq!(
        parent.unattributed_bytes,
        32 * MIB,
        "counted once, not per level"
    );
    let m1 = s.device("MIG-1111").unwrap();
    assert_eq!(m1.parent_uuid.as_deref(), Some("GPU-aaaa"));
    assert_eq!((m1.total_bytes, m1.used_bytes), (40960 * MIB, 1024 * MIB));
    assert_eq!(
        m1.minor, None,
        "a MIG instance has no device file of its own"
    );
    let m2 = s.device("MIG-2222").unwrap();
    assert_eq!(m2.unattributed_bytes, 64 * MIB);
    let ha = &s.holders[&a.pid()];
    assert_eq!(ha.memory.len(), 1);
    assert_eq!(ha.memory[0].device_uuid, "MIG-1111");
    assert_eq!(s.holders[&b.pid()].memory[0].device_uuid, "MIG-2222");
    assert_eq!(s.device("GPU-bbbb").unwrap().parent_uuid, None);
    let _ = a.finish();
    let _ = b.finish();
}

#[test]
fn malformed_or_missing_v3_lists_fall_back_to_v2() {
    let gpu = FakeGpu::new("");
    let a = holder_of(&gpu, 0);
    let b = holder_of(&gpu, 0);
    for quirk in ["garbage_v3", "no_v3"] {
        gpu.set_state(&format!(
            "device 0 GPU-aaaa 16384 Fake\nproc 0 {} 1000 compute\nproc 0 {} 24 compute\n\
             quirk 0 {quirk}\n",
            a.pid(),
            b.pid()
        ));
        let s = inventory(&gpu).snapshot();
        assert_eq!(
            s.holders[&a.pid()].memory[0].bytes,
            Some(1000 * MIB),
            "{quirk}"
        );
        assert_eq!(
            s.holders[&b.pid()].memory[0].bytes,
            Some(24 * MIB),
            "{quirk}"
        );
        assert!(!s.holders.contains_key(&0), "{quirk}: pid 0 from garbage");
        assert!(
            s.warnings.iter().any(|w| w.contains("used _v2")),
            "{quirk}: {:?}",
            s.warnings
        );
        assert_eq!(s.device("GPU-aaaa").unwrap().attributed_bytes, 1024 * MIB);
    }
    let _ = a.finish();
    let _ = b.finish();
}

#[test]
fn missing_nvml_is_reported_and_device_handles_are_still_found() {
    let gpu = FakeGpu::new("");
    let h = holder_of(&gpu, 0);
    let mut inv = GpuInventory::new(&GpuOptions {
        nvml_library: Some(gpu.dir.path().join("no-such-libnvidia-ml.so.1")),
        device_glob: gpu.device_glob(),
    })
    .unwrap();
    let s = inv.snapshot();
    match &s.nvml {
        NvmlStatus::Unavailable { reason } => {
            assert!(reason.contains("cannot load"), "{reason}");
            assert!(reason.contains("no-such-libnvidia-ml.so.1"), "{reason}");
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(s.devices.is_empty());
    assert_eq!(s.holders[&h.pid()].status, HolderStatus::Live);
    let _ = h.finish();
}

#[test]
fn a_failing_driver_is_retried_and_recovers() {
    let gpu = FakeGpu::new("device 0 GPU-aaaa 16384 Fake\nfail nvmlInit_v2 9\n");
    let mut inv = inventory(&gpu);
    let s = inv.snapshot();
    match &s.nvml {
        NvmlStatus::Unavailable { reason } => assert!(reason.contains("not loaded"), "{reason}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    gpu.set_state("device 0 GPU-aaaa 16384 Fake\n");
    let s = snapshot_until(&mut inv, Duration::from_secs(10), |s| {
        matches!(s.nvml, NvmlStatus::Available { .. })
    });
    assert_eq!(s.devices.len(), 1);

    // The GPU falls off the bus mid-run.
    gpu.set_state("device 0 GPU-aaaa 16384 Fake\nfail nvmlDeviceGetMemoryInfo_v2 15\n");
    let s = inv.snapshot();
    match &s.nvml {
        NvmlStatus::Unavailable { reason } => assert!(reason.contains("fallen off"), "{reason}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    gpu.set_state("device 0 GPU-aaaa 16384 Fake\n");
    snapshot_until(&mut inv, Duration::from_secs(10), |s| {
        matches!(s.nvml, NvmlStatus::Available { .. })
    });
}

#[test]
fn malformed_state_lines_do_not_break_the_library() {
    let gpu = FakeGpu::new("device 0 GPU-aaaa 16384 Fake\nthis is nonsense\nproc x y z w\n");
    let s = inventory(&gpu).snapshot();
    assert!(matches!(s.nvml, NvmlStatus::Available { .. }));
    assert_eq!(s.devices.len(), 1);
}

#[test]
fn an_invalid_device_glob_is_refused_with_the_key_named() {
    let err = GpuInventory::new(&GpuOptions {
        nvml_library: None,
        device_glob: "/dev/nvidia[".to_owned(),
    })
    .err()
    .expect("invalid glob refused");
    assert!(err.to_string().contains("device_glob"), "{err}");
}
