//! What the daemon costs a system call that has nothing to do with it. Its `owner:accept`
//! program sits on a `syscalls` tracepoint, and while one is attached every system call of
//! every process takes the kernel's traced entry and exit path; the daemon attaches it only
//! where the kernel lacks `owner:io` (before 6.3), so on newer kernels this should read zero.
use std::time::Duration;

use reclaimd_tests::FakeGpu;

use crate::{
    Opts,
    core::daemon,
    report::{Report, fmt, ratio},
    util::mono_ns,
};

/// ns per `getppid`, the cheapest system call: the best of five loops.
fn getppid_ns(calls: u32) -> f64 {
    (0..5)
        .map(|_| {
            let t0 = mono_ns();
            for _ in 0..calls {
                // SAFETY: getppid takes no arguments and cannot fail.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
            (mono_ns() - t0) as f64 / f64::from(calls)
        })
        .fold(f64::INFINITY, f64::min)
}

/// Alternates nobody watching and the daemon (watching `services`), timing `getppid`.
pub fn run(opts: &Opts, rep: &mut Report, gpu: &FakeGpu, services: toml::Table) {
    let (rounds, calls) = if opts.quick {
        (1, 500_000)
    } else {
        (3, 2_000_000)
    };
    rep.heading("A system call while the daemon runs");
    rep.line(&format!(
        "A loop of {calls} `getppid` calls (best of 5 loops), {rounds} alternation(s) of \
         nobody watching and the daemon. While a `syscalls` tracepoint is attached, every \
         system call of the host takes the kernel's traced entry and exit path, whatever \
         its process; the daemon's `owner:accept` program is one, attached only where the \
         kernel lacks `owner:io` (before 6.3).\n"
    ));
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        off.push(getppid_ns(calls));
        let d = daemon(gpu).service(services.clone()).start();
        std::thread::sleep(Duration::from_secs(1));
        on.push(getppid_ns(calls));
        d.stop();
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    rep.line("| observer | ns per getppid | rounds |\n|---|---|---|");
    for (name, v) in [("off", &off), ("on", &on)] {
        rep.line(&format!("| {name} | {} | {} |", fmt(mean(v)), v.len()));
        rep.values(&format!("getppid_ns {name}"), v.clone());
    }
    rep.line(&format!(
        "\nRatio on/off: {}; the daemon adds {} ns to each system call.\n",
        ratio(mean(&on), mean(&off)),
        fmt(mean(&on) - mean(&off))
    ));
}
