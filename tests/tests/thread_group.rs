//! Invariant 9: a process is dead when its last thread is. A service server whose main thread
//! exits while another thread keeps serving (its leader shows as `Z` in /proc) is alive, so
//! its worker is never signalled; the process dies with its last thread, and only then is
//! the worker reclaimed. With eBPF (the kernel's exit filter) and in fallback mode (the proc
//! connector and the /proc sweep), on every kernel of the matrix. Root only.
use std::time::{Duration, Instant};

use reclaimd::ledger::Outcome;
use reclaimd_tests::{
    Daemon, FakeGpu, Workload, alive, kill, ledger_records, llm_service, reclaimctl_json,
    status_field, wait_for_record, wait_until_bound,
};
use rstest::rstest;

const DEVICE: &str = "device 0 GPU-threads 16384 Fake H100";
const WAIT: Duration = Duration::from_secs(30);

fn workload() -> String {
    reclaimd_tests::workload_bin(env!("CARGO_BIN_EXE_workload"))
}

/// The state letter of `/proc/PID/stat` (the thread-group leader's).
fn leader_state(pid: u32) -> Option<char> {
    reclaimd::gpu::ProcStat::read(std::path::Path::new("/proc"), pid).map(|s| s.state)
}

/// Waits until the leader of `pid` has exited while other threads of it run.
fn wait_leader_zombie_with_threads(pid: u32) {
    let deadline = Instant::now() + WAIT;
    while leader_state(pid) != Some('Z') {
        assert!(Instant::now() < deadline, "leader of {pid} never exited");
        std::thread::sleep(Duration::from_millis(10));
    }
    let threads = status_field(pid, "Threads:");
    assert!(
        threads >= 2,
        "{pid} has {threads} threads: the process died"
    );
}

fn verdict_of(gpu: &FakeGpu, pid: u32) -> String {
    let listed = reclaimctl_json(gpu, &["holders"]);
    listed["holders"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["pid"] == pid))
        .and_then(|h| h["verdict"].as_str())
        .unwrap_or_else(|| panic!("{pid} not listed as a holder: {listed}"))
        .to_owned()
}

/// `probe`: the `[probe] mode`. `worker_too`: the worker's own main thread exits as well,
/// before the daemon first sees it (its device file is then held by another thread).
#[rstest]
#[case::ebpf("ebpf", false)]
#[case::ebpf_worker_leader_exited_too("ebpf", true)]
#[case::fallback("fallback", false)]
#[case::fallback_worker_leader_exited_too("fallback", true)]
fn a_server_whose_main_thread_exits_is_alive_until_its_last_thread_is(
    #[case] probe: &str,
    #[case] worker_too: bool,
) {
    let gpu = FakeGpu::new(DEVICE);
    let d = Daemon::builder(&gpu)
        .policy("mode", "enforce")
        .policy("grace", "0s")
        .set("probe", "mode", probe)
        .set("probe", "fallback_sweep", "200ms")
        .service(llm_service())
        .start();
    let device = gpu.device_file(0);
    let mut args = vec!["leader-exit-server", "llm-server", device.to_str().unwrap()];
    if worker_too {
        args.push("worker-too");
    }
    let mut server = Workload::spawn(&workload(), &args);
    let server_pid = server.pid();
    let worker: u32 = server.line("worker").parse().expect("worker pid");
    if worker_too {
        wait_leader_zombie_with_threads(worker);
    }
    gpu.set_state(&format!("{DEVICE}\nproc 0 {worker} 512 compute\n"));
    wait_until_bound(&gpu, &[worker]);

    server.send("exit the main thread");
    server.line("leader exited");
    wait_leader_zombie_with_threads(server_pid);
    // Ten sweeps, the exit event of the main thread, and a snapshot after each: the server
    // still serves, so nothing about its worker may be decided.
    std::thread::sleep(Duration::from_secs(2));
    assert!(alive(worker), "the worker of a live server was signalled");
    let decided: Vec<_> = ledger_records(&d.ledger)
        .into_iter()
        .filter(|r| r.decision.pid == worker)
        .collect();
    assert!(
        decided.is_empty(),
        "decided about a live server's worker: {decided:#?}"
    );
    assert_eq!(verdict_of(&gpu, worker), "live");

    // The last thread's exit is the process's: now the worker is an orphan.
    kill(server_pid);
    let r = wait_for_record(&d.ledger, worker, WAIT);
    assert_eq!(r.outcome, Outcome::Reclaimed, "{r:#?}");
    assert!(!alive(worker));
    assert!(
        r.decision
            .session_key
            .starts_with(&format!("pid:{server_pid}@")),
        "{r:#?}"
    );
    if probe == "ebpf" {
        assert_eq!(r.decision.death_cause, "killed by signal 9", "{r:#?}");
    }
    let _ = server.finish();
    d.stop();
}
