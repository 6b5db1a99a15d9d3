//! A burst of orphans: one server with about 200 GPU holders (workers, every second one
//! with a leaf process of its own) is SIGKILLed, grace 1 s. How long until the last one is
//! reclaimed, with the reclaim pool (`[policy] parallel`, default 16) and, in the same run,
//! one at a time (`parallel = 1`, what the executor did before the pool).
use std::time::Duration;

use reclaimd::ledger::{Outcome, Record};
use reclaimd_tests::{Burst, FakeGpu, llm_service, settled_record, wait_until_bound};

use crate::{
    Opts,
    core::{DEVICE, daemon},
    report::{Report, fmt, ratio},
};

const GRACE: Duration = Duration::from_secs(1);

pub struct BurstRun {
    pub parallel: usize,
    pub holders: usize,
    /// From the end of the grace to the last holder's verified reclaim (s).
    pub last_after_grace_s: f64,
    pub reclaimed: usize,
    /// Parents decided before their leaf's reclaim was done: must be 0.
    pub out_of_order: usize,
}

fn burst(workers: usize, parallel: usize) -> BurstRun {
    let gpu = FakeGpu::new(DEVICE);
    let d = daemon(&gpu)
        .policy("mode", "enforce")
        .policy("grace", "1s")
        .policy("max_reclaims_per_minute", 100_000)
        .policy("parallel", parallel as i64)
        .service(llm_service())
        .start();
    let b = Burst::start(&gpu, DEVICE, &crate::workload(), workers, &[]);
    let holders = b.holders();
    wait_until_bound(&gpu, &holders);
    let killed_ms = reclaimd::clock::unix_ms();
    reclaimd_tests::kill(b.server.pid());
    // A holder never settled counts as not reclaimed (and is ended), not as a panic.
    let records: Vec<(u32, Record)> = holders
        .iter()
        .filter_map(
            |&p| match settled_record(&d.ledger, p, Duration::from_secs(120)) {
                Some(r) => Some((p, r)),
                None => {
                    reclaimd_tests::kill(p);
                    None
                }
            },
        )
        .collect();
    let done_ms = |r: &Record| r.resolution.as_ref().map_or(i64::MAX, |x| x.time_ms);
    let last = records.iter().map(|(_, r)| done_ms(r)).max().unwrap_or(0);
    let out_of_order = b
        .leaves
        .iter()
        .filter(|(leaf, worker)| {
            let of = |p: &u32| records.iter().find(|(q, _)| q == p).map(|(_, r)| r);
            match (of(leaf), of(worker)) {
                (Some(l), Some(w)) => done_ms(l) > w.decision.time_ms,
                _ => true,
            }
        })
        .count();
    let run = BurstRun {
        parallel,
        holders: holders.len(),
        last_after_grace_s: (last - killed_ms) as f64 / 1e3 - GRACE.as_secs_f64(),
        reclaimed: records
            .iter()
            .filter(|(_, r)| r.outcome == Outcome::Reclaimed)
            .count(),
        out_of_order,
    };
    d.stop();
    let _ = b.server.finish();
    eprintln!(
        "bench: burst of {} (parallel {parallel}): last reclaimed {:.2} s after grace",
        run.holders, run.last_after_grace_s
    );
    run
}

pub fn run(opts: &Opts, rep: &mut Report) -> usize {
    // 134 workers, 67 of them with a leaf: 201 holders (40 with --quick).
    let workers = if opts.quick { 27 } else { 134 };
    let default = reclaimd::config::Config::default().policy.parallel;
    let runs = [burst(workers, default), burst(workers, 1)];
    rep.heading(&format!(
        "A burst of {} orphans of one server (grace {} s)",
        runs[0].holders,
        GRACE.as_secs()
    ));
    rep.line(
        "One `llm-server` with workers holding the fake device (every second one with a \
         leaf process holding it too) is SIGKILLed. Time from the end of the grace to the \
         last verified reclaim (ledger), with the reclaim pool and one at a time; a parent \
         decided before its leaf's reclaim was done counts as out of order.\n",
    );
    rep.line("| parallel | holders | reclaimed | last reclaimed after grace | out of order |");
    rep.line("|---|---|---|---|---|");
    let mut failures = 0;
    for r in &runs {
        rep.line(&format!(
            "| {} | {} | {} | {} s | {} |",
            r.parallel,
            r.holders,
            r.reclaimed,
            fmt(r.last_after_grace_s),
            r.out_of_order
        ));
        rep.value(
            &format!("burst_last_after_grace_s parallel={}", r.parallel),
            r.last_after_grace_s,
        );
        failures += (r.holders - r.reclaimed) + r.out_of_order;
    }
    rep.line(&format!(
        "\nRatio one at a time / pool: {}.\n",
        ratio(runs[1].last_after_grace_s, runs[0].last_after_grace_s)
    ));
    failures
}
