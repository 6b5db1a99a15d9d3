//! Measurements of the core, run by `cargo xtask bench` (root): time-to-reclaim over many
//! end-to-end runs with grace 0, and the daemon's memory with many live sessions. Real
//! kernel, real processes, the fake NVML. Prints a Markdown report and writes it, with the
//! raw samples as CSV, under target/bench/.
use std::{
    fmt::Write as _,
    net::TcpStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use reclaimd::ledger::Outcome;
use reclaimd_tests::{Daemon, FakeGpu, Workload, alive, percentile, wait_for_record};

const DEVICE: &str = "device 0 GPU-bench 81920 Fake H100";

fn workload() -> String {
    let exe = std::env::current_exe().expect("current_exe");
    let built = exe.with_file_name("workload");
    reclaimd_tests::workload_bin(built.to_str().expect("utf-8 path"))
}

fn arg_or(args: &[String], flag: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{flag} takes a number"))
        })
        .unwrap_or(default)
}

/// Writes a config (sweep at the default 5 s unless `policy` says otherwise) and starts the
/// daemon with reconcile-level debug logs.
fn daemon(gpu: &FakeGpu, policy: &str, services: &str) -> Daemon {
    let (config, ledger) = Daemon::write_config(gpu, policy, services);
    Daemon::start_logging(config, ledger, "info,reclaimd::daemon=debug")
}

fn pidfd_wait(pid: u32, limit: Duration) -> Option<Instant> {
    // SAFETY: pidfd_open has no memory arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if fd < 0 {
        return None;
    }
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, limit.as_millis() as i32) };
    let at = Instant::now();
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    (n == 1).then_some(at)
}

struct Reclaims {
    /// Daemon's own measure, death → verified, from the ledger (ms).
    ledger_ms: Vec<u64>,
    /// SIGKILL of the server → the worker's exit, seen through a pidfd (µs).
    kill_to_exit_us: Vec<u64>,
    failures: usize,
}

fn time_to_reclaim(runs: usize) -> Reclaims {
    let gpu = FakeGpu::new(DEVICE);
    let d = daemon(
        &gpu,
        "mode = \"enforce\"\ngrace = \"0s\"\nmax_reclaims_per_minute = 100000",
        "[[service]]\nname = \"llm\"\nmatch = { comm = [\"llm-server\"] }\n",
    );
    let device = gpu.device_file(0);
    let mut out = Reclaims {
        ledger_ms: Vec::with_capacity(runs),
        kill_to_exit_us: Vec::with_capacity(runs),
        failures: 0,
    };
    for i in 0..runs {
        let (server, worker) = reclaimd_tests::spawn_server(
            &workload(),
            "llm-server",
            device.to_str().expect("utf-8"),
            &[],
        );
        gpu.set_state(&format!("{DEVICE}\nproc 0 {worker} 1024 compute\n"));
        // Let the daemon's exit-triggered snapshot of the previous run settle, so that this
        // run measures one death, not a queue.
        std::thread::sleep(Duration::from_millis(20));
        let t0 = Instant::now();
        reclaimd_tests::kill(server.pid());
        match pidfd_wait(worker, Duration::from_secs(20)) {
            Some(at) => out.kill_to_exit_us.push((at - t0).as_micros() as u64),
            None => out.failures += 1,
        }
        let r = wait_for_record(&d.ledger, worker, Duration::from_secs(20));
        match (&r.outcome, r.resolution.and_then(|x| x.time_to_reclaim_ms)) {
            (Outcome::Reclaimed, Some(ms)) => out.ledger_ms.push(ms.max(0) as u64),
            _ => out.failures += 1,
        }
        let _ = server.finish();
        if (i + 1) % 50 == 0 {
            eprintln!("bench: {}/{runs} reclaims", i + 1);
        }
    }
    d.stop();
    out
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The daemon's (conns, procs) after its next reconcile, from its debug log.
fn table_sizes(d: &mut Daemon) -> (u64, u64) {
    // Only lines logged from now on: the first one after an event-free moment is a sweep's.
    d.drain_log();
    d.log.clear();
    let line = d.wait_log("reconciled", Duration::from_secs(30));
    let num = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (num("conns="), num("procs="))
}

struct Memory {
    rows: Vec<(String, u64, u64, u64, u64)>,
}

fn memory(sessions: usize) -> Memory {
    let gpu = FakeGpu::new(DEVICE);
    let port = reclaimd_tests::free_port();
    let mut d = daemon(
        &gpu,
        "sweep = \"1s\"",
        &format!(
            "[[service]]\nname = \"api\"\nmatch = {{ comm = [\"api-server\"] }}\n\
             ports = [{port}]\nscope = \"connection\"\n\n\
             [[service]]\nname = \"batch\"\nmatch = {{ comm = [\"batch-root\"] }}\n"
        ),
    );
    let mut rows = Vec::new();
    let mut sample = |what: &str, d: &mut Daemon| {
        let (conns, procs) = table_sizes(d);
        let (rss, hwm) = rss_kib(d.pid());
        eprintln!("bench: {what}: conns={conns} procs={procs} rss={rss} KiB hwm={hwm} KiB");
        rows.push((what.to_owned(), conns, procs, rss, hwm));
    };
    sample("idle", &mut d);

    let addr = format!("127.0.0.1:{port}");
    // Three rounds: later ones show whether memory freed by the first is reused (flat) or
    // grows (a leak); the allocator keeps what it freed, so RSS plateaus, never drops.
    for round in ["", " (again)", " (third)"] {
        let server = Workload::spawn(
            &workload(),
            &["keep-conns", "api-server", &addr, &sessions.to_string()],
        );
        server.line("listening");
        let clients: Vec<TcpStream> = (0..sessions)
            .map(|_| TcpStream::connect(&addr).expect("connect"))
            .collect();
        server.line("accepted");
        sample(
            &format!("{sessions} live connection sessions{round}"),
            &mut d,
        );
        drop(clients);
        let _ = server.finish();
        std::thread::sleep(Duration::from_secs(2));
        sample(&format!("connections closed{round}"), &mut d);
    }

    let roots = Workload::spawn(&workload(), &["roots", "batch-root", &sessions.to_string()]);
    roots.line("roots");
    std::thread::sleep(Duration::from_secs(2));
    sample(&format!("{sessions} live process sessions"), &mut d);
    let _ = roots.finish();
    std::thread::sleep(Duration::from_secs(2));
    sample("processes gone", &mut d);
    d.stop();
    Memory { rows }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = arg_or(&args, "--runs", 300);
    let sessions = arg_or(&args, "--sessions", 10_000);
    let out_dir = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    assert!(alive(std::process::id()));

    let mut r = time_to_reclaim(runs);
    let m = memory(sessions);

    r.ledger_ms.sort_unstable();
    r.kill_to_exit_us.sort_unstable();
    let mut md = String::new();
    let _ = writeln!(md, "# reclaimd core measurements\n");
    let _ = writeln!(
        md,
        "## Time to reclaim ({} runs, grace 0, fake NVML)\n",
        runs
    );
    let _ = writeln!(
        md,
        "| measure | median | p90 | p99 | max |\n|---|---|---|---|---|"
    );
    let row = |v: &[u64], unit: &str, scale: f64| {
        let f = |x: u64| format!("{:.1} {unit}", x as f64 / scale);
        format!(
            "{} | {} | {} | {} |",
            f(percentile(v, 50.0)),
            f(percentile(v, 90.0)),
            f(percentile(v, 99.0)),
            f(v.last().copied().unwrap_or(0))
        )
    };
    let _ = writeln!(
        md,
        "| death → verified (ledger) | {}",
        row(&r.ledger_ms, "ms", 1.0)
    );
    let _ = writeln!(
        md,
        "| server SIGKILL → worker exit (pidfd) | {}",
        row(&r.kill_to_exit_us, "ms", 1000.0)
    );
    let _ = writeln!(md, "\nfailures: {}\n", r.failures);
    let _ = writeln!(md, "## Daemon memory\n");
    let _ = writeln!(
        md,
        "| state | connections in table | processes in table | RSS | peak RSS |\n|---|---|---|---|---|"
    );
    for (what, conns, procs, rss, hwm) in &m.rows {
        let _ = writeln!(
            md,
            "| {what} | {conns} | {procs} | {:.1} MiB | {:.1} MiB |",
            *rss as f64 / 1024.0,
            *hwm as f64 / 1024.0
        );
    }
    print!("{md}");
    write_out(&out_dir, &md, &r, &m);
    if r.failures > 0 {
        std::process::exit(1);
    }
}

fn write_out(dir: &Path, md: &str, r: &Reclaims, m: &Memory) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("bench: cannot create {}: {e}", dir.display());
        return;
    }
    let mut csv = String::from("kind,value\n");
    for v in &r.ledger_ms {
        let _ = writeln!(csv, "death_to_verified_ms,{v}");
    }
    for v in &r.kill_to_exit_us {
        let _ = writeln!(csv, "kill_to_worker_exit_us,{v}");
    }
    for (what, conns, procs, rss, hwm) in &m.rows {
        let _ = writeln!(csv, "\"rss_kib {what} conns={conns} procs={procs}\",{rss}");
        let _ = writeln!(csv, "\"hwm_kib {what}\",{hwm}");
    }
    for (name, text) in [("core.md", md), ("core.csv", csv.as_str())] {
        if let Err(e) = std::fs::write(dir.join(name), text) {
            eprintln!("bench: cannot write {name}: {e}");
        }
    }
    eprintln!("bench: report in {}", dir.join("core.md").display());
}
