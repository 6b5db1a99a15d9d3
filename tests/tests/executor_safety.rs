//! The executor's last-moment checks, driven directly with real processes, the real pidfd
//! path and the fake NVML: a recycled pid and a holder that let go of its device file are
//! never signalled; the right process is. Root only (pidfd_open on other users' processes).
use std::{sync::Arc, time::Duration};

use reclaimd::{
    clock,
    config::Config,
    gpu::{GpuInventory, GpuOptions},
    ledger::{Ledger, Outcome},
    ledger_writer::LedgerWriter,
    model::{BoundSession, Death, ProcId, SessionKind},
    reclaim::{Executor, Job, Untouchable},
    reconcile::{Assessment, Verdict},
};
use reclaimd_tests::{FakeGpu, TempDir, Workload, alive, ledger_records, snapshot_until};

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

const DEVICE: &str = "device 0 GPU-exec 16384 Fake H100";

/// Fields drop in order: the executor (and its NVML handle) before the fake's files.
struct Setup {
    executor: Executor,
    gpu: FakeGpu,
    dir: TempDir,
}

fn setup() -> Setup {
    let gpu = FakeGpu::new(DEVICE);
    let dir = TempDir::new("executor");
    let cfg = Config::parse(
        "[policy]\nmode = \"enforce\"\nterm_grace = \"1s\"\n\n\
         [[service]]\nname = \"llm\"\nmatch = { comm = [\"llm-server\"] }\n",
        "test",
    )
    .expect("config");
    let ledger = Ledger::open(&dir.path().join("ledger.db")).expect("ledger");
    let inv = GpuInventory::new(&GpuOptions {
        nvml_library: Some(gpu.lib.clone()),
        device_glob: gpu.device_glob(),
    })
    .expect("inventory");
    let executor = Executor::new(
        Arc::new(cfg),
        LedgerWriter::spawn(ledger).expect("ledger thread").0,
        inv,
        Untouchable {
            pids: [std::process::id()].into_iter().collect(),
        },
    );
    Setup { executor, gpu, dir }
}

/// An orphan job for the holder `pid` as a fresh snapshot sees it (listed with 256 MiB).
fn orphan_job(s: &Setup, pid: u32) -> Job {
    s.gpu
        .set_state(&format!("{DEVICE}\nproc 0 {pid} 256 compute\n"));
    let mut inv = GpuInventory::new(&GpuOptions {
        nvml_library: Some(s.gpu.lib.clone()),
        device_glob: s.gpu.device_glob(),
    })
    .expect("inventory");
    let snap = snapshot_until(&mut inv, Duration::from_secs(10), |i| {
        i.holders
            .get(&pid)
            .is_some_and(|h| !h.fds.is_empty() && !h.memory.is_empty())
    });
    let holder = snap.holders[&pid].clone();
    let death = Death {
        at: clock::monotonic_ns(),
        cause: "killed by signal 9".to_owned(),
    };
    Job {
        assessment: Assessment {
            id: ProcId {
                pid,
                start_time: holder.start_time.expect("start time"),
            },
            holder,
            service: Some("llm".to_owned()),
            matched: None,
            sessions: vec![BoundSession {
                kind: SessionKind::Process,
                key: "pid:1@1".parse().expect("session key"),
                death: Some(death.clone()),
                seen: None,
            }],
            death: Some(death),
            grace: Duration::ZERO,
            pressure: 0.0,
            verdict: Verdict::Orphan,
        },
        exe: None,
        cgroup: "/".to_owned(),
        pod: None,
        manual: None,
        parent: None,
    }
}

fn holder(s: &Setup, sub: &str) -> Workload {
    let w = Workload::spawn(&workload(), &[sub, s.gpu.device_file(0).to_str().unwrap()]);
    w.line("holding");
    w
}

#[test]
fn the_pinned_process_is_signalled_and_the_memory_verified() {
    let mut s = setup();
    let w = holder(&s, "hold");
    let pid = w.pid();
    let done = s.executor.handle(orphan_job(&s, pid));
    assert_eq!(done.outcome, Outcome::Reclaimed, "{done:?}");
    assert_eq!(done.bytes_freed, Some(256 << 20));
    let _ = w.finish();
    assert!(!alive(pid));
    let records = ledger_records(&s.dir.path().join("ledger.db"));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].outcome, Outcome::Reclaimed);
}

#[test]
fn a_recycled_pid_is_never_signalled() {
    let mut s = setup();
    let w = holder(&s, "hold");
    let pid = w.pid();
    // The pid as the daemon knew it belonged to a process started at another time: the
    // number now names someone else (pid reuse), which the pin must refuse.
    let mut job = orphan_job(&s, pid);
    job.assessment.id.start_time += 1;
    let done = s.executor.handle(job);
    assert_eq!(done.outcome, Outcome::Released, "{done:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(pid), "a process with a reused pid was signalled");
    let records = ledger_records(&s.dir.path().join("ledger.db"));
    let detail = &records[0].resolution.as_ref().expect("resolved").detail;
    assert!(detail.contains("before any signal"), "{detail}");
    let (_, status) = w.finish();
    assert!(status.success(), "the holder was disturbed: {status:?}");
}

#[test]
fn a_holder_without_a_device_file_at_signal_time_is_left_alone() {
    let mut s = setup();
    let mut w = holder(&s, "hold-release");
    let pid = w.pid();
    let job = orphan_job(&s, pid);
    // Between the decision and the signal, it closes its device file but lives on.
    w.send("");
    w.line("released");
    let done = s.executor.handle(job);
    assert_eq!(done.outcome, Outcome::Released, "{done:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(pid), "a process holding no device file was signalled");
    let (_, status) = w.finish();
    assert!(status.success(), "the process was disturbed: {status:?}");
}
