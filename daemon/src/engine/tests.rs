//! The engine driven through its inputs and judged by its effects: no kernel, /proc,
//! SQLite or tonic. A small world: a server (`llm-server`, pid 100) whose worker (pid 101)
//! holds 1 GiB on GPU-a.
use std::{collections::HashMap, sync::Arc, time::Duration};

use reclaimd_common::TcpState;

use super::*;
use crate::{
    clock::Now,
    event::{ExitStatus, KernelEvent},
    gpu::{Device, GpuMemory, Holder, HolderStatus, Inventory, NvmlStatus, ProcessKind},
    model::ConnKey,
    reconcile::VerdictKind,
    record::{Action, Outcome},
};

const GIB: u64 = 1 << 30;
const SERVER: ProcId = ProcId {
    pid: 100,
    start_time: 1000,
};
const WORKER: ProcId = ProcId {
    pid: 101,
    start_time: 1001,
};

fn engine(grace: &str, lineage: Vec<Lineage>) -> Engine {
    let cfg = Config::parse(
        &format!(
            "[policy]\ngrace = \"{grace}\"\n\n[[service]]\nname = \"llm\"\n\
             match = {{ comm = [\"llm-server\"] }}\n"
        ),
        "engine test",
    )
    .unwrap();
    Engine::new(Arc::new(cfg), lineage)
}

fn at(secs: f64) -> Now {
    Now {
        mono: (secs * 1e9) as u64,
        wall_ms: 1_700_000_000_000 + (secs * 1000.0) as i64,
    }
}

fn facts(id: ProcId, ppid: u32, comm: &str) -> ProcFacts {
    ProcFacts {
        pid: id.pid,
        ppid,
        start_time: id.start_time,
        comm: comm.to_owned(),
        exe: None,
        cgroup: None,
        cmdline: None,
    }
}

fn worker_holder(ppid: u32) -> Holder {
    Holder {
        pid: WORKER.pid,
        comm: Some("worker".to_owned()),
        ppid: Some(ppid),
        start_time: Some(WORKER.start_time),
        memory: vec![GpuMemory {
            device_uuid: "GPU-a".to_owned(),
            bytes: Some(GIB),
            kind: ProcessKind::Compute,
        }],
        fds: Vec::new(),
        status: HolderStatus::Live,
    }
}

fn inventory(holders: Vec<Holder>) -> Inventory {
    Inventory {
        nvml: NvmlStatus::Available {
            driver_version: "test".to_owned(),
        },
        devices: vec![Device {
            index: 0,
            uuid: "GPU-a".to_owned(),
            name: "Fake".to_owned(),
            minor: Some(0),
            total_bytes: 80 * GIB,
            used_bytes: GIB,
            attributed_bytes: GIB,
            unattributed_bytes: 0,
            parent_uuid: None,
        }],
        holders: holders.into_iter().map(|h| (h.pid, h)).collect(),
        warnings: Vec::new(),
        nvml_duration: Duration::ZERO,
    }
}

/// A full snapshot at `now`: the processes listed and the worker holding, or not.
fn snapshot(now: Now, procs: Vec<ProcFacts>, holding: bool) -> Snapshot {
    let ppid = procs
        .iter()
        .find(|f| f.pid == WORKER.pid)
        .map_or(1, |f| f.ppid);
    Snapshot {
        started: now.mono,
        procs: Some(procs),
        tcp: Some(Vec::new()),
        inventory: inventory(if holding {
            vec![worker_holder(ppid)]
        } else {
            Vec::new()
        }),
        conns: HashMap::new(),
        held: HashMap::new(),
        holder_facts: Vec::new(),
    }
}

fn both() -> Vec<ProcFacts> {
    vec![
        facts(SERVER, 1, "llm-server"),
        facts(WORKER, SERVER.pid, "worker"),
    ]
}

/// The worker alone, reparented to init: the server is gone.
fn orphaned() -> Vec<ProcFacts> {
    vec![facts(WORKER, 1, "worker")]
}

fn server_exit(secs: f64) -> KernelEvent {
    KernelEvent::Exit {
        ts_ns: at(secs).mono,
        pid: SERVER.pid,
        tgid: SERVER.pid,
        status: ExitStatus::Signal(9),
        comm: "llm-server".into(),
    }
}

/// /proc as a table.
#[derive(Default)]
struct Table(HashMap<u32, ProcFacts>);

impl ProcSource for Table {
    fn facts(&mut self, pid: u32) -> Option<ProcFacts> {
        self.0.get(&pid).cloned()
    }
}

fn orders(effects: &[Effect]) -> Vec<&Order> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(o) => Some(o),
            _ => None,
        })
        .collect()
}

fn verdicts(effects: &[Effect]) -> Vec<(u32, VerdictKind)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish(Published {
                event: DomainEvent::VerdictChanged { pid, verdict, .. },
                ..
            }) => Some((*pid, *verdict)),
            _ => None,
        })
        .collect()
}

fn done(outcome: Outcome, ledger_id: Option<i64>, ledger_error: Option<&str>) -> Done {
    Done {
        id: WORKER,
        service: "llm".to_owned(),
        outcome,
        ledger_id,
        bytes_freed: Some(GIB),
        time_to_reclaim: None,
        pod: None,
        ledger_error: ledger_error.map(str::to_owned),
    }
}

/// An engine that has seen the server die at 2 s, with the worker orphaned at `secs`.
fn dead_server(grace: &str, secs: f64) -> (Engine, Reconciled) {
    let mut e = engine(grace, Vec::new());
    let r = e.on_snapshot(&snapshot(at(1.0), both(), true), at(1.0), 8);
    assert_eq!(verdicts(&r.effects), [(WORKER.pid, VerdictKind::Live)]);
    e.on_event(&server_exit(2.0), &mut Table::default(), at(2.0).mono);
    let r = e.on_snapshot(&snapshot(at(secs), orphaned(), true), at(secs), 8);
    (e, r)
}

#[test]
fn a_servers_death_is_urgent_announced_and_starts_the_grace() {
    let mut e = engine("10s", Vec::new());
    let r = e.on_snapshot(&snapshot(at(1.0), both(), true), at(1.0), 8);
    assert!(orders(&r.effects).is_empty());
    assert_eq!(r.next, None, "nothing is pending");
    let urgency = e.on_event(&server_exit(2.0), &mut Table::default(), at(2.0).mono);
    assert_eq!(urgency, Urgency::Now, "the worker is bound to the server");
    let r = e.on_snapshot(&snapshot(at(2.5), orphaned(), true), at(2.5), 8);
    assert!(
        orders(&r.effects).is_empty(),
        "within grace: {:?}",
        r.effects
    );
    assert_eq!(verdicts(&r.effects), [(WORKER.pid, VerdictKind::Pending)]);
    let died: Vec<_> = r
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::SessionDied { key, death, .. } => Some((key.clone(), death.cause.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        died,
        [(SessionKey::Process(SERVER), "killed by signal 9".to_owned())]
    );
    assert_eq!(r.next, Some(Duration::from_millis(9500)));
}

#[test]
fn the_session_counts_tally_the_listing_with_every_combination() {
    let (e, _) = dead_server("10s", 2.5);
    let mut listed: HashMap<(&'static str, String, &'static str), u64> = HashMap::new();
    for s in e.sessions("", true) {
        let state = if s.death.is_some() { "dead" } else { "live" };
        *listed
            .entry((s.kind.as_str(), s.service, state))
            .or_default() += 1;
    }
    assert!(
        listed.get(&("process", "llm".to_owned(), "dead")) == Some(&1),
        "{listed:?}"
    );
    let counts: HashMap<_, _> = e.session_counts().into_iter().collect();
    assert_eq!(counts.len(), 4, "two kinds × live/dead for llm: {counts:?}");
    for (key, n) in &counts {
        assert_eq!(listed.get(key).copied().unwrap_or(0), *n, "{key:?}");
    }
    assert!(listed.keys().all(|k| counts.contains_key(k)), "{listed:?}");
}

#[test]
fn past_its_grace_an_orphan_is_ordered_once_and_settled_once() {
    let (mut e, r) = dead_server("10s", 12.5);
    let o = orders(&r.effects);
    assert_eq!(o.len(), 1, "{:?}", r.effects);
    assert_eq!(o[0].assessment.id, WORKER);
    assert_eq!(o[0].manual, None);
    // In flight: the next sweep does not order it again.
    let r = e.on_snapshot(&snapshot(at(13.0), orphaned(), true), at(13.0), 8);
    assert!(orders(&r.effects).is_empty());
    let effects = e.on_done(&done(Outcome::Reclaimed, Some(7), None));
    assert!(matches!(
        effects.as_slice(),
        [
            Effect::Settled {
                outcome: Outcome::Reclaimed,
                ..
            },
            Effect::PublishRecord(7)
        ]
    ));
    // Gone after the reclaim: decided, so not "released" as well; its session settles.
    let r = e.on_snapshot(&snapshot(at(14.0), Vec::new(), false), at(14.0), 8);
    assert!(!r.effects.iter().any(|e| matches!(e, Effect::Record(_))));
    assert!(
        r.effects
            .iter()
            .any(|e| matches!(e, Effect::SessionSettled(k) if *k == SessionKey::Process(SERVER)))
    );
}

#[test]
fn a_dying_holder_that_lets_go_by_itself_is_recorded_as_released() {
    let (mut e, _) = dead_server("10s", 3.0);
    let r = e.on_snapshot(&snapshot(at(4.0), Vec::new(), false), at(4.0), 8);
    let records: Vec<_> = r
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Record(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(records.len(), 1, "{:?}", r.effects);
    assert_eq!(records[0].action, Action::None);
    assert_eq!(records[0].pid, WORKER.pid);
    assert_eq!(records[0].session_key, "pid:100@1000");
    assert_eq!(records[0].death_time_ms, Some(at(2.0).wall_ms));
}

#[test]
fn a_full_queue_defers_the_order_to_the_next_snapshot() {
    let (mut e, r) = dead_server("0s", 3.0);
    assert_eq!(orders(&r.effects).len(), 1);
    e.on_done(&done(Outcome::Skipped, Some(1), Some("disk full")));
    let r = e.on_snapshot(&snapshot(at(4.0), orphaned(), true), at(4.0), 0);
    assert!(orders(&r.effects).is_empty());
    assert_eq!(e.queue_full(), 1);
    let r = e.on_snapshot(&snapshot(at(5.0), orphaned(), true), at(5.0), 1);
    assert_eq!(orders(&r.effects).len(), 1);
}

#[test]
fn a_ledger_failure_leaves_the_holder_undecided_and_the_next_sweep_retries() {
    let (mut e, r) = dead_server("0s", 3.0);
    assert_eq!(orders(&r.effects).len(), 1);
    let effects = e.on_done(&done(Outcome::Failed, None, Some("disk I/O error")));
    assert!(
        matches!(effects.as_slice(), [Effect::LedgerFailed]),
        "{effects:?}"
    );
    assert_eq!(e.ledger_error(), Some("disk I/O error"));
    let r = e.on_snapshot(&snapshot(at(4.0), orphaned(), true), at(4.0), 8);
    assert_eq!(orders(&r.effects).len(), 1, "retried: {:?}", r.effects);
    let effects = e.on_done(&done(Outcome::Reclaimed, Some(9), None));
    assert!(matches!(effects.first(), Some(Effect::Settled { .. })));
    assert_eq!(e.ledger_error(), None, "a write went through");
    let r = e.on_snapshot(&snapshot(at(5.0), orphaned(), true), at(5.0), 8);
    assert!(orders(&r.effects).is_empty(), "decided once");
}

#[test]
fn a_manual_reclaim_orders_its_target_and_answers_when_done() {
    let mut e = engine("10s", Vec::new());
    e.on_snapshot(&snapshot(at(1.0), both(), true), at(1.0), 8);
    let manual = Manual {
        reason: "stuck".to_owned(),
        dry_run: false,
        uid: 0,
    };
    let req = |target| ManualRequest {
        target,
        manual: manual.clone(),
    };
    let missing = e.manual_reclaim(req(Target::Pid(999)), 8).unwrap_err();
    assert_eq!(
        missing.to_string(),
        "pid 999 holds no GPU memory or device file (as of the last inventory)"
    );
    let full = e
        .manual_reclaim(req(Target::Session(SessionKey::Process(SERVER))), 0)
        .unwrap_err();
    assert_eq!(full, ManualError::QueueFull);
    let (ticket, effects) = e
        .manual_reclaim(req(Target::Session(SessionKey::Process(SERVER))), 8)
        .unwrap();
    let o = orders(&effects);
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].assessment.id, WORKER);
    assert_eq!(o[0].manual.as_ref(), Some(&manual));
    let busy = e
        .manual_reclaim(req(Target::Pid(WORKER.pid)), 8)
        .unwrap_err();
    assert_eq!(busy, ManualError::Busy(WORKER.pid));
    let effects = e.on_done(&done(Outcome::Reclaimed, Some(3), None));
    assert!(
        effects.iter().any(
            |x| matches!(x, Effect::Reply { ticket: t, result: Ok(ids) } if *t == ticket && ids == &[3])
        ),
        "{effects:?}"
    );
}

#[test]
fn a_manual_reclaim_the_ledger_could_not_record_says_so() {
    let mut e = engine("10s", Vec::new());
    e.on_snapshot(&snapshot(at(1.0), both(), true), at(1.0), 8);
    let (ticket, _) = e
        .manual_reclaim(
            ManualRequest {
                target: Target::Pid(WORKER.pid),
                manual: Manual {
                    reason: "stuck".to_owned(),
                    dry_run: true,
                    uid: 0,
                },
            },
            8,
        )
        .unwrap();
    let effects = e.on_done(&done(Outcome::Skipped, None, Some("read-only")));
    assert!(effects.iter().any(|x| matches!(
        x,
        Effect::Reply { ticket: t, result: Err(ManualError::Unrecorded(why)) }
            if *t == ticket && why == "read-only"
    )));
}

#[test]
fn after_a_restart_the_lineage_binds_a_reparented_worker_to_its_dead_server() {
    let lineage = Lineage {
        pid: WORKER.pid,
        start_time: WORKER.start_time,
        service: "llm".to_owned(),
        root_pid: SERVER.pid,
        root_start_time: SERVER.start_time,
        matched: None,
    };
    // Without the lineage the worker (not llm-server, parent init) is nobody's.
    let mut forgetful = engine("0s", Vec::new());
    let r = forgetful.on_snapshot(&snapshot(at(1.0), orphaned(), true), at(1.0), 8);
    assert_eq!(verdicts(&r.effects), [(WORKER.pid, VerdictKind::Unmanaged)]);
    assert!(orders(&r.effects).is_empty());

    let mut e = engine("0s", vec![lineage]);
    let r = e.on_snapshot(&snapshot(at(1.0), orphaned(), true), at(1.0), 8);
    assert_eq!(verdicts(&r.effects), [(WORKER.pid, VerdictKind::Orphan)]);
    let o = orders(&r.effects);
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].assessment.service.as_deref(), Some("llm"));
    assert_eq!(
        o[0].assessment.death.as_ref().map(|d| d.cause.as_str()),
        Some("gone (seen missing)")
    );
    // The lineage is kept for the holder that lives, and only for it.
    assert!(
        r.effects
            .iter()
            .any(|x| matches!(x, Effect::KeepLineage(keep) if keep.as_slice() == [WORKER]))
    );
}

/// No service configured: the worker of a server that was SIGKILLed, reparented to init and
/// still holding GPU memory, is a suspect; ordered only with `suspects = "enforce"`.
#[test]
fn with_no_service_a_reparented_holder_whose_parent_died_is_a_suspect() {
    for (policy, ordered) in [
        ("", false),
        ("suspects = \"enforce\"\ngrace = \"0s\"", true),
    ] {
        let cfg = Config::parse(&format!("[policy]\n{policy}\n"), "engine test").unwrap();
        let mut e = Engine::new(Arc::new(cfg), Vec::new());
        let r = e.on_snapshot(&snapshot(at(1.0), both(), true), at(1.0), 8);
        assert_eq!(verdicts(&r.effects), [(WORKER.pid, VerdictKind::Unmanaged)]);
        e.on_event(&server_exit(2.0), &mut Table::default(), at(2.0).mono);
        let r = e.on_snapshot(&snapshot(at(2.5), orphaned(), true), at(2.5), 8);
        assert_eq!(
            verdicts(&r.effects),
            [(WORKER.pid, VerdictKind::Suspect)],
            "{policy}"
        );
        let judged = e.judged().unwrap();
        let death = judged.assessments[0].death.as_ref().unwrap();
        assert_eq!(death.at, at(2.0).mono);
        assert_eq!(
            death.cause,
            "original parent 100 killed by signal 9; reparented to 1"
        );
        assert_eq!(orders(&r.effects).len(), usize::from(ordered), "{policy}");
    }
}

/// The core names no edge: no probe (aya), ledger (SQLite), API (tonic, protobuf) or
/// telemetry, and opens nothing itself.
#[test]
fn the_pure_core_names_no_edge() {
    let sources = [
        ("engine/mod.rs", include_str!("mod.rs")),
        ("engine/effect.rs", include_str!("effect.rs")),
        ("engine/manual.rs", include_str!("manual.rs")),
        ("engine/snapshot.rs", include_str!("snapshot.rs")),
        ("model.rs", include_str!("../model.rs")),
        ("reconcile.rs", include_str!("../reconcile.rs")),
        ("record.rs", include_str!("../record.rs")),
        ("ids.rs", include_str!("../ids.rs")),
    ];
    let forbidden = [
        "crate::probe",
        "crate::ledger",
        "crate::api",
        "crate::telemetry",
        "crate::runtime",
        "crate::scan",
        "pb::",
        "tonic",
        "rusqlite",
        "tokio",
        "aya",
        "std::fs",
        "std::net::TcpStream",
        "clock::monotonic_ns",
        "clock::unix_ms",
        "Now::read",
    ];
    let mut found = Vec::new();
    for (file, text) in sources {
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for f in forbidden.iter().filter(|f| line.contains(*f)) {
                found.push(format!("{file}:{}: {f}: {}", n + 1, line.trim()));
            }
        }
    }
    // The configuration the core reads names no edge either (it only reads its own file).
    for (n, line) in include_str!("../config.rs").lines().enumerate() {
        for f in [
            "crate::probe",
            "crate::gpu",
            "crate::ledger",
            "crate::api",
            "aya",
        ] {
            if line.contains(f) && !line.trim_start().starts_with("//") {
                found.push(format!("config.rs:{}: {f}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "the core names an edge:\n{}",
        found.join("\n")
    );
}

/// A connection-scoped `api` service on port 9000, grace 0 s: an orphan is ordered at once.
fn connection_engine() -> Engine {
    let cfg = Config::parse(
        "[policy]\ngrace = \"0s\"\n\n[[service]]\nname = \"api\"\nports = [9000]\n\
         scope = \"connection\"\nmatch = { comm = [\"api-server\"] }\n",
        "engine test",
    )
    .unwrap();
    Engine::new(Arc::new(cfg), Vec::new())
}

fn conn(cport: u16) -> ConnKey {
    ConnKey {
        local: "127.0.0.1:9000".parse().unwrap(),
        remote: format!("127.0.0.1:{cport}").parse().unwrap(),
    }
}

/// A change of the server socket of the connection from `cport`, as the kernel reports it.
fn change(cport: u16, old: TcpState, new: TcpState, secs: f64) -> KernelEvent {
    use crate::event::{Endpoint, Socket};
    let key = conn(cport);
    KernelEvent::Tcp {
        ts_ns: at(secs).mono,
        socket: Socket {
            sock: u64::from(cport),
            local: Endpoint {
                addr: key.local.ip(),
                port: key.local.port(),
            },
            remote: Endpoint {
                addr: key.remote.ip(),
                port: key.remote.port(),
            },
        },
        old_state: old,
        new_state: new,
        owner_tgid: SERVER.pid,
        owner_comm: "api-server".into(),
        error: 0,
    }
}

/// The worker holding the sockets of these connections, in the states the table gave.
fn holding_conns(now: Now, held: &[(u16, TcpState)]) -> Snapshot {
    let mut s = snapshot(
        now,
        vec![
            facts(SERVER, 1, "api-server"),
            facts(WORKER, SERVER.pid, "worker"),
        ],
        true,
    );
    s.conns
        .insert(WORKER.pid, held.iter().map(|(p, _)| conn(*p)).collect());
    s.held = held
        .iter()
        .enumerate()
        .map(|(fd, (p, state))| {
            let h = HeldFd {
                pid: WORKER.pid,
                fd: fd as u32 + 3,
                state: *state,
            };
            (conn(*p), h)
        })
        .collect();
    s
}

/// A listener's child is reported with its owner (its first accept or I/O), so a holder
/// may hold a live connection the events have not named yet beside one they saw die: the
/// socket table's word for it binds the holder to it, and the holder lives.
#[test]
fn a_live_connection_the_events_have_not_named_yet_keeps_its_holder() {
    use TcpState::{CloseWait, Established, SynRecv};

    for (unnamed, want) in [
        (Some(Established), VerdictKind::Live),
        (None, VerdictKind::Orphan),
    ] {
        let mut e = connection_engine();
        let mut table = Table::default();
        e.on_event(
            &change(6000, SynRecv, Established, 1.0),
            &mut table,
            at(1.0).mono,
        );
        e.on_event(
            &change(6000, Established, CloseWait, 2.0),
            &mut table,
            at(2.0).mono,
        );
        let mut held = vec![(6000, CloseWait)];
        held.extend(unnamed.map(|state| (6001, state)));
        let r = e.on_snapshot(&holding_conns(at(3.0), &held), at(3.0), 8);
        assert_eq!(
            verdicts(&r.effects),
            [(WORKER.pid, want)],
            "holding also an unnamed connection: {unnamed:?}"
        );
    }
}
