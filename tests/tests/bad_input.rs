//! Invariant 6: bad input (kernel records, netlink datagrams, configuration files, gRPC
//! requests, a driver's answers) gets a clear error and changes nothing. Property-based: each
//! test feeds generated input, arbitrary and half-valid, to the daemon's real code, and checks
//! what must hold whatever the input.
//!
//! The gRPC test runs one real daemon (root, as the other daemon tests); the fake-NVML test
//! loads the repository's fake `libnvidia-ml.so.1`.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use proptest::{
    prelude::*,
    sample::Index,
    test_runner::{Config as ProptestConfig, TestCaseError, TestRunner},
};
use reclaimd::{
    api::{client, pb},
    config::{Config, ConfigError, Mode, Scope},
    event::{DecodeError, ExitStatus, KernelEvent},
    gpu::{GpuInventory, GpuOptions, HolderStatus, Inventory, NvmlStatus},
    probe::decode_proc_connector,
};
use reclaimd_tests::{Daemon, FakeGpu, alive, ledger_records};
use tonic::Code;

/// Runs with `cases` cases, and never writes regression files into the source tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs a property outside the `proptest!` macro, for tests with a fixture (a daemon, a
/// process) that lives across cases.
fn check<S: Strategy>(
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(config(cases));
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

/// The highest pid the kernel hands out: anything above it names no process.
fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4_194_304)
}

/// A `sleep` whose stdin is `file`: a process that holds a (fake) GPU device file, killed
/// when dropped.
struct Holder(Child);

impl Holder {
    fn on(file: &Path) -> Self {
        let f = std::fs::File::open(file).expect("open device file");
        let child = Command::new("sleep")
            .arg("1000")
            .stdin(Stdio::from(f))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---- 1. ring-buffer records ---------------------------------------------------------------

/// `reclaimd_common::Event`, as the kernel writes it (repr(C), native endian, 104 bytes).
/// The offsets are spelled out here, from outside the crate that defines the layout, so a
/// change to it fails this test as it would fail a kernel of the old layout.
mod layout {
    pub const LEN: usize = 104;
    pub const TS: usize = 0;
    pub const SOCK: usize = 8;
    pub const PID: usize = 16;
    pub const TGID: usize = 20;
    pub const PPID: usize = 24;
    pub const OWNER_TGID: usize = 28;
    pub const EXIT_CODE: usize = 32;
    pub const SPORT: usize = 36;
    pub const DPORT: usize = 38;
    pub const KIND: usize = 40;
    pub const FAMILY: usize = 41;
    pub const OLD_STATE: usize = 42;
    pub const NEW_STATE: usize = 43;
    pub const DETAIL: usize = 44;
    pub const START: usize = 48;
    pub const SADDR: usize = 56;
    pub const DADDR: usize = 72;
    pub const COMM: usize = 88;
    pub const COMM_LEN: usize = 16;
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
}

fn addr_at(b: &[u8], at: usize, family: u8) -> IpAddr {
    let raw: [u8; 16] = b[at..at + 16].try_into().unwrap();
    if family == 2 {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(raw))
    }
}

/// A record of the right size: random bytes, with kind, family and owner source drawn
/// mostly from their valid values, and sometimes a readable command name.
fn record() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(any::<u8>(), layout::LEN),
        prop_oneof![3 => 1u8..=4, 1 => any::<u8>()],
        prop_oneof![2 => Just(2u8), 2 => Just(10u8), 1 => any::<u8>()],
        prop_oneof![3 => 1u8..=2, 1 => any::<u8>()],
        prop::option::of("[a-z0-9 ._-]{0,15}"),
    )
        .prop_map(|(mut b, kind, family, detail, comm)| {
            b[layout::KIND] = kind;
            b[layout::FAMILY] = family;
            b[layout::DETAIL] = detail;
            if let Some(name) = comm {
                let c = &mut b[layout::COMM..layout::COMM + layout::COMM_LEN];
                c.fill(0);
                c[..name.len()].copy_from_slice(name.as_bytes());
            }
            b
        })
}

/// What the kernel's command name field says: bytes up to the first NUL.
fn comm_of(b: &[u8]) -> (&[u8], bool) {
    let c = &b[layout::COMM..layout::COMM + layout::COMM_LEN];
    let end = c.iter().position(|&x| x == 0).unwrap_or(c.len());
    (&c[..end], std::str::from_utf8(&c[..end]).is_ok())
}

fn check_comm(b: &[u8], got: &str) -> Result<(), TestCaseError> {
    let (raw, utf8) = comm_of(b);
    prop_assert!(!got.contains('\0'), "NUL in comm {got:?}");
    if utf8 {
        prop_assert_eq!(got.as_bytes(), raw);
    }
    Ok(())
}

fn check_status(raw: i32, status: ExitStatus) -> Result<(), TestCaseError> {
    match status {
        ExitStatus::Code(c) => {
            prop_assert_eq!(raw & 0x7f, 0);
            prop_assert_eq!(c, (raw >> 8) & 0xff);
        }
        ExitStatus::Signal(s) => {
            prop_assert_ne!(s, 0);
            prop_assert_eq!(s, raw & 0x7f);
        }
    }
    Ok(())
}

fn check_socket(b: &[u8], s: &reclaimd::event::Socket) -> Result<(), TestCaseError> {
    let family = b[layout::FAMILY];
    prop_assert_eq!(s.sock, u64_at(b, layout::SOCK));
    prop_assert_eq!(s.local.port, u16_at(b, layout::SPORT));
    prop_assert_eq!(s.remote.port, u16_at(b, layout::DPORT));
    prop_assert_eq!(s.local.addr, addr_at(b, layout::SADDR, family));
    prop_assert_eq!(s.remote.addr, addr_at(b, layout::DADDR, family));
    Ok(())
}

/// The decoded event of a right-sized record, field by field against the bytes.
fn check_record(b: &[u8]) -> Result<(), TestCaseError> {
    let kind = b[layout::KIND];
    let family = b[layout::FAMILY];
    let detail = b[layout::DETAIL];
    let ts = u64_at(b, layout::TS);
    let got = KernelEvent::decode(b);
    match kind {
        1 => match got {
            Ok(KernelEvent::Fork {
                ts_ns,
                pid,
                ppid,
                comm,
                parent_start,
            }) => {
                prop_assert_eq!(ts_ns, ts);
                prop_assert_eq!(pid, u32_at(b, layout::TGID));
                prop_assert_eq!(ppid, u32_at(b, layout::PPID));
                // 0 is unknown; else ns since boot in clock ticks (100 per second here).
                let start = u64_at(b, layout::START);
                prop_assert_eq!(parent_start, (start != 0).then_some(start / 10_000_000));
                check_comm(b, &comm)?;
            }
            other => prop_assert!(false, "kind 1 decoded as {other:?}"),
        },
        2 => match got {
            Ok(KernelEvent::Exit {
                ts_ns,
                pid,
                tgid,
                status,
                comm,
            }) => {
                prop_assert_eq!(ts_ns, ts);
                prop_assert_eq!(pid, u32_at(b, layout::PID));
                prop_assert_eq!(tgid, u32_at(b, layout::TGID));
                check_status(u32_at(b, layout::EXIT_CODE) as i32, status)?;
                check_comm(b, &comm)?;
            }
            other => prop_assert!(false, "kind 2 decoded as {other:?}"),
        },
        3 if family != 2 && family != 10 => {
            prop_assert_eq!(got, Err(DecodeError::Family(family)))
        }
        3 => match got {
            Ok(KernelEvent::Tcp {
                ts_ns,
                socket,
                old_state,
                new_state,
                owner_tgid,
                owner_comm,
                error,
            }) => {
                prop_assert_eq!(error, u32_at(b, layout::EXIT_CODE) as i32);
                prop_assert_eq!(ts_ns, ts);
                check_socket(b, &socket)?;
                prop_assert_eq!(old_state, b[layout::OLD_STATE]);
                prop_assert_eq!(new_state, b[layout::NEW_STATE]);
                prop_assert_eq!(owner_tgid, u32_at(b, layout::OWNER_TGID));
                check_comm(b, &owner_comm)?;
            }
            other => prop_assert!(false, "kind 3 decoded as {other:?}"),
        },
        4 if detail != 1 && detail != 2 => {
            prop_assert_eq!(got, Err(DecodeError::OwnerSource(detail)))
        }
        4 if family != 2 && family != 10 => {
            prop_assert_eq!(got, Err(DecodeError::Family(family)))
        }
        4 => match got {
            Ok(KernelEvent::Owner {
                ts_ns,
                socket,
                pid,
                tgid,
                fd,
                comm,
                ..
            }) => {
                prop_assert_eq!(ts_ns, ts);
                check_socket(b, &socket)?;
                prop_assert_eq!(pid, u32_at(b, layout::PID));
                prop_assert_eq!(tgid, u32_at(b, layout::TGID));
                let code = u32_at(b, layout::EXIT_CODE) as i32;
                prop_assert_eq!(fd, (detail == 1).then_some(code));
                check_comm(b, &comm)?;
            }
            other => prop_assert!(false, "kind 4 decoded as {other:?}"),
        },
        k => prop_assert_eq!(got, Err(DecodeError::Kind(k))),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(2000))]

    /// Any bytes: a size error unless exactly one record long; never a panic, and whatever
    /// decodes prints.
    #[test]
    fn ring_records_of_any_bytes_decode_or_fail_cleanly(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            prop::collection::vec(any::<u8>(), layout::LEN - 1..=layout::LEN + 1),
        ]
    ) {
        match KernelEvent::decode(&bytes) {
            Err(DecodeError::Size { got, want }) => {
                prop_assert_eq!(got, bytes.len());
                prop_assert_eq!(want, layout::LEN);
                prop_assert_ne!(got, want);
            }
            Err(e) => {
                prop_assert_eq!(bytes.len(), layout::LEN);
                prop_assert!(!e.to_string().is_empty());
            }
            Ok(ev) => {
                prop_assert_eq!(bytes.len(), layout::LEN);
                let _ = ev.to_json(0);
                let _ = ev.to_text();
            }
        }
    }

    /// Right-sized records with arbitrary field values: the kind's event with the record's
    /// own pid, tgid, ports, addresses and times, or the typed error for a bad kind, family
    /// or owner source.
    #[test]
    fn ring_records_keep_their_fields(b in record()) {
        check_record(&b)?;
        if let Ok(ev) = KernelEvent::decode(&b) {
            let j = ev.to_json(7);
            prop_assert_eq!(&j["kind"], ev.kind());
            prop_assert_eq!(j["ts_ns"].as_u64(), Some(u64_at(&b, layout::TS)));
            prop_assert!(!ev.to_text().is_empty());
        }
    }
}

// ---- 2. proc connector datagrams ----------------------------------------------------------

const NLMSG_HDR: usize = 16;
const CN_MSG_HDR: usize = 20;
const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// The shortest message that can carry an event (an exit: `what`, `cpu`, `timestamp_ns`,
/// then pid, tgid and exit code).
const SHORTEST_EVENT_MSG: usize = NLMSG_HDR + CN_MSG_HDR + 16 + 12;

/// One netlink message of a proc connector datagram.
#[derive(Debug, Clone)]
enum Msg {
    /// parent_pid, parent_tgid, child_pid, child_tgid.
    Fork([u32; 4]),
    /// process_pid, process_tgid, exit_code, exit_signal, parent_pid, parent_tgid.
    Exit([u32; 6]),
    /// An event of another kind (exec, uid, comm, ...), of any length.
    Other(u32, Vec<u32>),
    /// A fork or exit cut short of the fields the decoder reads.
    Short(u32, Vec<u32>),
    /// A netlink message too short for a connector header.
    Tiny(u32),
}

fn msg() -> impl Strategy<Value = Msg> {
    // Small pids, so a child's pid and tgid are often equal (a process, not a thread).
    let pid = || prop_oneof![1u32..4, any::<u32>()];
    prop_oneof![
        3 => (pid(), pid(), pid(), pid()).prop_map(|(a, b, c, d)| Msg::Fork([a, b, c, d])),
        3 => (pid(), pid(), any::<u32>(), any::<u32>(), pid(), pid())
            .prop_map(|(a, b, c, d, e, f)| Msg::Exit([a, b, c, d, e, f])),
        1 => (
            any::<u32>().prop_filter("not fork or exit", |w| {
                *w != PROC_EVENT_FORK && *w != PROC_EVENT_EXIT
            }),
            prop::collection::vec(any::<u32>(), 0..10),
        )
            .prop_map(|(w, d)| Msg::Other(w, d)),
        1 => prop_oneof![
            prop::collection::vec(any::<u32>(), 0..4).prop_map(|d| Msg::Short(PROC_EVENT_FORK, d)),
            prop::collection::vec(any::<u32>(), 0..3).prop_map(|d| Msg::Short(PROC_EVENT_EXIT, d)),
        ],
        1 => (NLMSG_HDR as u32..(NLMSG_HDR + CN_MSG_HDR) as u32).prop_map(Msg::Tiny),
    ]
}

/// The message's bytes, padded to 4 as netlink aligns them, with `filler` in the header
/// fields the decoder does not read; and the event it stands for.
fn encode(m: &Msg, ts: u64, filler: u8) -> (Vec<u8>, Option<KernelEvent>) {
    let (what, data, expect): (u32, &[u32], _) = match m {
        Msg::Fork(d) => (
            PROC_EVENT_FORK,
            &d[..],
            (d[2] == d[3]).then(|| KernelEvent::Fork {
                ts_ns: ts,
                pid: d[2],
                ppid: d[1],
                comm: Default::default(),
                parent_start: None,
            }),
        ),
        Msg::Exit(d) => (
            PROC_EVENT_EXIT,
            &d[..],
            Some(KernelEvent::Exit {
                ts_ns: ts,
                pid: d[0],
                tgid: d[1],
                status: ExitStatus::from_raw(d[2] as i32),
                comm: Default::default(),
            }),
        ),
        Msg::Other(w, d) | Msg::Short(w, d) => (*w, &d[..], None),
        Msg::Tiny(len) => {
            let len = *len as usize;
            let mut b = vec![filler; (len + 3) & !3];
            b[..4].copy_from_slice(&(len as u32).to_ne_bytes());
            return (b, None);
        }
    };
    let mut ev = Vec::new();
    ev.extend_from_slice(&what.to_ne_bytes());
    ev.extend_from_slice(&u32::from(filler).to_ne_bytes()); // cpu
    ev.extend_from_slice(&ts.to_ne_bytes());
    for v in data {
        ev.extend_from_slice(&v.to_ne_bytes());
    }
    let len = NLMSG_HDR + CN_MSG_HDR + ev.len();
    let mut b = vec![filler; NLMSG_HDR + CN_MSG_HDR];
    b[..4].copy_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&ev);
    b.resize((len + 3) & !3, 0);
    (b, expect)
}

fn datagram() -> impl Strategy<Value = (Vec<u8>, Vec<KernelEvent>)> {
    prop::collection::vec((msg(), any::<u64>(), any::<u8>()), 0..12).prop_map(|msgs| {
        let mut bytes = Vec::new();
        let mut events = Vec::new();
        for (m, ts, filler) in &msgs {
            let (b, e) = encode(m, *ts, *filler);
            bytes.extend(b);
            events.extend(e);
        }
        (bytes, events)
    })
}

proptest! {
    #![proptest_config(config(2000))]

    /// Any bytes: no panic, and no more events than messages that could hold them.
    #[test]
    fn connector_datagrams_of_any_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..1024)
    ) {
        let events = decode_proc_connector(&bytes);
        prop_assert!(events.len() <= bytes.len() / SHORTEST_EVENT_MSG, "{events:?}");
    }

    /// Well-formed messages, any number, of every kind: exactly the forks of processes and the
    /// exits of threads (which of them ended a process is told from /proc later), in order; any cut of the datagram decodes to a prefix of
    /// that (never more, never something else); flipped bytes never panic.
    #[test]
    fn connector_datagrams_decode_to_their_events(
        (bytes, want) in datagram(),
        cut in any::<Index>(),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 0..4),
    ) {
        let got = decode_proc_connector(&bytes);
        prop_assert_eq!(&got, &want);
        let cut = cut.index(bytes.len() + 1);
        let part = decode_proc_connector(&bytes[..cut]);
        prop_assert!(part.len() <= want.len());
        prop_assert_eq!(&part[..], &want[..part.len()], "cut at {}", cut);
        if !bytes.is_empty() {
            let mut bad = bytes.clone();
            for (at, v) in &flips {
                let i = at.index(bad.len());
                bad[i] ^= v;
            }
            let events = decode_proc_connector(&bad);
            prop_assert!(events.len() <= bad.len() / SHORTEST_EVENT_MSG);
        }
    }
}

// ---- 3. configuration files ---------------------------------------------------------------

const ORIGIN: &str = "fuzz.toml";

/// A valid file to mutate: every table, every kind of value.
const VALID: &str = r#"
[policy]
mode = "enforce"
grace = "500ms"
term_grace = "2s"
soft = 0.7
hard = 0.95
protect = ["sshd", "/usr/bin/nvidia-*"]
max_reclaims_per_minute = 10
sweep = "1s"
queue = 64

[probe]
mode = "fallback"
ring_bytes = 65536
fallback_sweep = "500ms"

[api]
watch_buffer = 16

[[service]]
name = "llm"
match = { comm = ["server"], unit = "llm.service" }
ports = [8000, 8001]
scope = "connection"
grace = "0s"

[[service]]
name = "notebooks"
match = { exe = "/opt/jupyter/*", cgroup = "/system.slice" }
mode = "report"
hook = "/usr/local/bin/drain"
hook_timeout = "3s"
"#;

/// What every configuration the parser accepts must satisfy (the checks it promises).
fn check_valid(c: &Config, text: &str) -> Result<(), TestCaseError> {
    let p = &c.policy;
    prop_assert!(p.soft.is_finite() && p.hard.is_finite());
    prop_assert!(0.0 < p.soft && p.soft <= p.hard && p.hard <= 1.0, "{p:?}");
    prop_assert!(p.max_reclaims_per_minute >= 1);
    prop_assert!(p.sweep >= Duration::from_millis(100));
    prop_assert!(p.queue >= 1);
    prop_assert!(p.protect.iter().all(|e| !e.trim().is_empty()), "{p:?}");
    prop_assert!(c.probe.ring_bytes.is_power_of_two() && c.probe.ring_bytes >= 4096);
    prop_assert!(c.probe.fallback_sweep >= Duration::from_millis(100));
    prop_assert!((1..=1 << 20).contains(&c.api.watch_buffer));
    prop_assert!(c.api.socket.is_absolute());
    prop_assert!(
        c.api.listen.is_none()
            || (c.api.tls_cert.is_some() && c.api.tls_key.is_some() && c.api.client_ca.is_some())
    );
    // Safe by default: nothing is enforced unless the file says so.
    if !text.contains("enforce") {
        prop_assert_eq!(p.mode, Mode::Report);
        prop_assert!(c.services.iter().all(|s| c.mode_of(s) == Mode::Report));
    }
    let mut names = BTreeSet::new();
    for s in &c.services {
        prop_assert!(!s.name.trim().is_empty());
        prop_assert!(names.insert(s.name.clone()), "{:?} twice", s.name);
        let m = &s.matcher;
        prop_assert!(
            !m.comm.is_empty() || m.exe.is_some() || m.cgroup.is_some() || m.unit.is_some(),
            "{s:?}"
        );
        prop_assert!(m.comm.iter().all(|x| (1..=15).contains(&x.len())), "{s:?}");
        prop_assert!(m.cgroup.as_ref().is_none_or(|g| g.starts_with('/')));
        prop_assert!(!s.ports.contains(&0));
        prop_assert!(s.scope != Scope::Connection || !s.ports.is_empty(), "{s:?}");
        prop_assert!(s.hook.as_ref().is_none_or(|h| h.is_absolute()));
    }
    Ok(())
}

/// A refusal names its file, and the key or the line at fault; a key's line is where the
/// key (or its table) is written.
fn check_refusal(e: &ConfigError, text: &str) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(msg.contains(ORIGIN), "{msg}");
    match e {
        ConfigError::Parse { message, .. } => {
            prop_assert!(message.contains("line"), "no line in {msg}")
        }
        ConfigError::Invalid { key, line, .. } => {
            prop_assert!(!key.is_empty() && msg.contains(key.as_str()), "{msg}");
            if let Some(l) = line {
                let written = text.lines().nth(l - 1).unwrap_or("");
                let parts: Vec<&str> = key
                    .split('.')
                    .map(|p| p.split('[').next().unwrap_or(p))
                    .collect();
                prop_assert!(
                    parts.iter().any(|p| written.contains(p)),
                    "{msg}: line {l} is {written:?}"
                );
            }
        }
        ConfigError::Read { .. } => prop_assert!(false, "parse read a file: {msg}"),
    }
    Ok(())
}

/// `s` as a TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\U{:08X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn pick(values: &[&'static str]) -> BoxedStrategy<String> {
    prop::sample::select(values.to_vec())
        .prop_map(str::to_owned)
        .boxed()
}

fn any_str(max: usize) -> BoxedStrategy<String> {
    prop::string::string_regex(&format!("\\PC{{0,{max}}}"))
        .unwrap()
        .prop_map(|s| toml_str(&s))
        .boxed()
}

fn duration() -> BoxedStrategy<String> {
    prop_oneof![
        4 => pick(&[
            "\"500ms\"",
            "\"10s\"",
            "\"0s\"",
            "\"100ms\"",
            "\"2m\"",
            "\"1h 30m\"",
            "\" 1s \"",
        ]),
        2 => pick(&[
            "\"1ms\"",
            "\"99ms\"",
            "\"ten seconds\"",
            "\"\"",
            "\"-1s\"",
            "\"18446744073709551616s\"",
            "\"99999999999999999999h\"",
            "\"584942417355y\"",
            "5",
            "true",
            "[\"1s\"]",
        ]),
        1 => "[0-9]{1,7}(ns|us|ms|s|m|h|d|w|y)".prop_map(|s| format!("\"{s}\"")),
        1 => any_str(12),
    ]
    .boxed()
}

fn fraction() -> BoxedStrategy<String> {
    prop_oneof![
        3 => pick(&["0.5", "0.75", "0.9", "0.95", "1.0", "1e-300"]),
        1 => pick(&[
            "1", "0", "0.0", "-0.0", "-0.1", "nan", "inf", "-inf", "1.5", "\"0.5\"",
        ]),
        2 => (-0.5f64..1.5).prop_map(|f| format!("{f:?}")),
    ]
    .boxed()
}

fn count() -> BoxedStrategy<String> {
    prop_oneof![
        4 => pick(&["1", "16", "30", "1024", "1048576"]),
        2 => pick(&[
            "0",
            "1048577",
            "-1",
            "4294967296",
            "9223372036854775807",
            "18446744073709551616",
            "\"10\"",
            "1.5",
        ]),
        1 => any::<u32>().prop_map(|n| n.to_string()),
    ]
    .boxed()
}

fn ring_bytes() -> BoxedStrategy<String> {
    prop_oneof![
        4 => (0u32..32).prop_map(|k| (1u64 << k).to_string()),
        1 => pick(&["4096", "5000", "0", "-4096", "4294967296", "\"4096\"", "4096.0"]),
        1 => any::<u32>().prop_map(|n| n.to_string()),
    ]
    .boxed()
}

fn str_array(items: BoxedStrategy<String>) -> BoxedStrategy<String> {
    prop::collection::vec(items, 0..4)
        .prop_map(|v| format!("[{}]", v.join(", ")))
        .boxed()
}

fn names(values: &[&'static str]) -> BoxedStrategy<String> {
    prop_oneof![8 => pick(values).prop_map(|s| toml_str(&s)), 1 => any_str(10)].boxed()
}

fn matcher() -> BoxedStrategy<String> {
    let comm = str_array(names(&[
        "server",
        "x",
        "server",
        "x",
        "",
        "fifteen-chars15",
        "sixteen-chars-16",
        "averyveryverylongname",
    ]))
    .prop_map(|v| format!("comm = {v}"));
    let exe = names(&["/opt/*", "/opt/[x", "*", "", "/usr/bin/python3"])
        .prop_map(|v| format!("exe = {v}"));
    let cgroup =
        names(&["/system.slice", "system.slice", "/", ""]).prop_map(|v| format!("cgroup = {v}"));
    let unit = names(&["llm.service", "llm", ""]).prop_map(|v| format!("unit = {v}"));
    let entries = (
        prop::option::weighted(0.6, comm),
        prop::option::weighted(0.3, exe),
        prop::option::weighted(0.2, cgroup),
        prop::option::weighted(0.2, unit),
        prop::option::weighted(0.03, pick(&["bogus = 1", "comm = \"server\""])),
    )
        .prop_map(|(a, b, c, d, e)| [a, b, c, d, e].into_iter().flatten().collect::<Vec<_>>())
        .prop_shuffle();
    prop_oneof![
        15 => entries.prop_map(|v| format!("{{ {} }}", v.join(", "))),
        1 => pick(&["\"server\"", "[]"]),
    ]
    .boxed()
}

fn ports() -> BoxedStrategy<String> {
    prop::collection::vec(
        prop_oneof![
            1 => pick(&["0", "8000", "65535", "65536", "-1", "70000", "\"80\""]),
            3 => (1u16..).prop_map(|p| p.to_string()),
        ],
        0..4,
    )
    .prop_map(|v| format!("[{}]", v.join(", ")))
    .boxed()
}

/// Lines of one table: each key maybe (some twice), plus maybe an unknown one, shuffled.
fn table(keys: Vec<(&'static str, f64, BoxedStrategy<String>)>) -> BoxedStrategy<Vec<String>> {
    let lines: Vec<BoxedStrategy<Vec<String>>> = keys
        .into_iter()
        .map(|(key, p, value)| {
            prop_oneof![
                400 => prop::option::weighted(p, value.clone())
                    .prop_map(move |v| v.map(|v| format!("{key} = {v}")).into_iter().collect()),
                1 => (value.clone(), value).prop_map(move |(a, b)| vec![
                    format!("{key} = {a}"),
                    format!("{key} = {b}"),
                ]),
            ]
            .boxed()
        })
        .collect();
    (
        lines,
        prop::option::weighted(0.02, pick(&["garce = \"1s\"", "bogus = 1", "[x]"])),
    )
        .prop_map(|(lines, extra)| {
            let mut all: Vec<String> = lines.into_iter().flatten().collect();
            all.extend(extra);
            all
        })
        .prop_shuffle()
        .boxed()
}

fn config_text() -> impl Strategy<Value = (String, usize)> {
    let policy = table(vec![
        (
            "mode",
            0.3,
            pick(&[
                "\"report\"",
                "\"enforce\"",
                "\"report\"",
                "\"enforce\"",
                "\"kill\"",
                "1",
            ]),
        ),
        ("grace", 0.3, duration()),
        ("term_grace", 0.2, duration()),
        ("soft", 0.3, fraction()),
        ("hard", 0.3, fraction()),
        ("sweep", 0.3, duration()),
        ("queue", 0.2, count()),
        ("max_reclaims_per_minute", 0.2, count()),
        (
            "protect",
            0.2,
            str_array(names(&[
                "sshd",
                "",
                "  ",
                "/usr/bin/nvidia-*",
                "/opt/[x",
                "/",
            ])),
        ),
    ]);
    let probe = table(vec![
        (
            "mode",
            0.3,
            pick(&[
                "\"auto\"",
                "\"ebpf\"",
                "\"fallback\"",
                "\"auto\"",
                "\"kprobe\"",
            ]),
        ),
        ("ring_bytes", 0.5, ring_bytes()),
        ("fallback_sweep", 0.4, duration()),
    ]);
    let api = table(vec![("watch_buffer", 0.6, count())]);
    let service = table(vec![
        ("name", 0.95, names(&["a", "b", "llm", "", " "])),
        ("match", 0.95, matcher()),
        ("ports", 0.4, ports()),
        (
            "scope",
            0.4,
            pick(&["\"process\"", "\"connection\"", "\"process\"", "\"socket\""]),
        ),
        (
            "mode",
            0.2,
            pick(&["\"report\"", "\"enforce\"", "\"report\"", "\"always\""]),
        ),
        ("grace", 0.2, duration()),
        (
            "hook",
            0.1,
            pick(&["\"/usr/local/bin/drain\"", "\"drain.sh\"", "\"\""]),
        ),
        ("hook_timeout", 0.1, duration()),
    ]);
    (
        prop::option::weighted(0.8, policy),
        prop::option::weighted(0.5, probe),
        prop::option::weighted(0.4, api),
        prop::collection::vec(service, 0..4),
    )
        .prop_map(|(policy, probe, api, services)| {
            let mut text = String::new();
            for (name, lines) in [("policy", policy), ("probe", probe), ("api", api)] {
                if let Some(lines) = lines {
                    text.push_str(&format!("[{name}]\n{}\n\n", lines.join("\n")));
                }
            }
            for lines in &services {
                text.push_str(&format!("[[service]]\n{}\n\n", lines.join("\n")));
            }
            (text, services.len())
        })
}

/// Edits of a valid file: a character replaced, inserted or deleted somewhere.
fn mutated() -> impl Strategy<Value = String> {
    prop::collection::vec((any::<Index>(), 0u8..3, any::<char>()), 1..6).prop_map(|edits| {
        let mut chars: Vec<char> = VALID.chars().collect();
        for (at, op, c) in edits {
            let i = at.index(chars.len());
            match op {
                0 => chars[i] = c,
                1 => chars.insert(i, c),
                _ => {
                    chars.remove(i);
                }
            }
        }
        chars.into_iter().collect()
    })
}

proptest! {
    #![proptest_config(config(1000))]

    /// Any text, or a valid file with a few characters changed: accepted only when valid, or
    /// refused with an error that names the file and the key or line.
    #[test]
    fn config_of_any_text_is_valid_or_refused_clearly(
        text in prop_oneof![any::<String>(), mutated(), "[\\[\\]a-z_ =\"0-9.{},\n]{0,200}"]
    ) {
        match Config::parse(&text, ORIGIN) {
            Ok(c) => check_valid(&c, &text)?,
            Err(e) => check_refusal(&e, &text)?,
        }
    }

    /// Generated files over the known tables and keys, with valid and invalid values mixed:
    /// what is accepted satisfies every promised check and has every service; what is refused
    /// names the key or the line.
    #[test]
    fn config_of_known_keys_is_valid_or_refused_clearly((text, services) in config_text()) {
        match Config::parse(&text, ORIGIN) {
            Ok(c) => {
                check_valid(&c, &text)?;
                prop_assert_eq!(c.services.len(), services);
            }
            Err(e) => check_refusal(&e, &text)?,
        }
    }
}

#[test]
fn the_mutated_file_starts_valid() {
    let c = Config::parse(VALID, ORIGIN).expect("VALID is valid");
    assert_eq!(c.policy.mode, Mode::Enforce);
    assert_eq!(c.services.len(), 2);
}

// ---- 4. gRPC requests against one live daemon ---------------------------------------------

#[derive(Debug, Clone)]
enum Request {
    Sessions(pb::ListSessionsRequest),
    Holders(pb::ListHoldersRequest),
    Reclaims(pb::ListReclaimsRequest),
    Reclaim(pb::ReclaimRequest),
}

/// Strings from empty to long, blank, numeric, and anything printable or not.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        2 => Just(String::new()),
        1 => "[ \t\n]{1,3}",
        1 => "[+-]?[0-9]{1,20}",
        3 => "\\PC{0,30}",
        2 => any::<String>(),
        1 => "x{2000,5000}",
    ]
    .boxed()
}

fn one_of(valid: &[&'static str]) -> BoxedStrategy<String> {
    prop_oneof![pick(valid), text()].boxed()
}

/// Requests of every method; pids are the bystander's, other real processes' that hold
/// nothing (`others`), or free ones.
fn requests(bystander: u32, others: Vec<u32>, pid_max: u32) -> impl Strategy<Value = Request> {
    let pid = prop_oneof![
        2 => Just(bystander),
        2 => prop::sample::select(others),
        1 => pid_max + 1..=u32::MAX,
    ];
    let time = || {
        prop_oneof![
            3 => Just(0i64),
            2 => 0i64..4_000_000_000_000,
            1 => any::<i64>(),
        ]
    };
    let mostly = |valid: BoxedStrategy<String>| prop_oneof![3 => Just(String::new()), 2 => valid, 1 => text()];
    let key = prop_oneof![
        "pid:[0-9]{1,7}@[0-9]{1,9}",
        "sock:0x[0-9a-f]{1,16}:[0-9.]{7,15}:[0-9]{1,5}->[0-9.]{7,15}:[0-9]{1,5}",
        text(),
    ]
    .prop_filter("a session key", |k| !k.is_empty());
    // Exactly one of pid and session key (the valid shapes), or both, or neither.
    let target = prop_oneof![
        5 => pid.clone().prop_map(|p| (p, String::new())),
        3 => key.clone().prop_map(|k| (0, k)),
        1 => (pid.clone(), key).prop_map(|(p, k)| (p, k)),
        1 => Just((0, String::new())),
    ];
    let reason = prop_oneof![
        4 => "[a-z][a-z :-]{0,30}",
        1 => "[ \t\n]{0,3}",
        1 => text(),
    ];
    prop_oneof![
        1 => (one_of(&["llm"]), any::<bool>()).prop_map(|(service, include_dead)| {
            Request::Sessions(pb::ListSessionsRequest {
                service,
                include_dead,
            })
        }),
        1 => (
            one_of(&["llm"]),
            one_of(&["live", "pending", "orphan", "unmanaged", "untrusted", "exiting"]),
        )
            .prop_map(|(service, verdict)| Request::Holders(pb::ListHoldersRequest {
                service,
                verdict
            })),
        2 => (
            (time(), time()),
            mostly(pick(&["llm", "manual"])),
            mostly(pick(&[
                "pending",
                "reclaimed",
                "failed",
                "skipped",
                "released",
                "interrupted"
            ])),
            prop_oneof![3 => Just(0u32), 2 => pid.clone(), 1 => any::<u32>()],
            prop_oneof![3 => 0u32..5, 1 => 995u32..1005, 1 => any::<u32>()],
            mostly((1i64..100).prop_map(|n| n.to_string()).boxed()),
        )
            .prop_map(
                |((since_ms, until_ms), service, outcome, pid, page_size, page_token)| {
                    Request::Reclaims(pb::ListReclaimsRequest {
                        since_ms,
                        until_ms,
                        service,
                        outcome,
                        pid,
                        page_size,
                        page_token,
                    })
                }
            ),
        3 => (target, any::<bool>(), reason).prop_map(|((pid, session_key), dry_run, reason)| {
            Request::Reclaim(pb::ReclaimRequest {
                pid,
                session_key,
                dry_run,
                reason,
            })
        }),
    ]
}

/// Whether the daemon must accept a `ListReclaims` request.
fn reclaims_valid(r: &pb::ListReclaimsRequest) -> bool {
    const OUTCOMES: [&str; 7] = [
        "",
        "pending",
        "reclaimed",
        "failed",
        "skipped",
        "released",
        "interrupted",
    ];
    r.page_size <= 1000
        && r.since_ms >= 0
        && r.until_ms >= 0
        && (r.until_ms == 0 || r.until_ms >= r.since_ms)
        && OUTCOMES.contains(&r.outcome.as_str())
        && (r.page_token.is_empty() || r.page_token.parse::<i64>().is_ok_and(|id| id > 0))
}

/// A refusal is a proper status: an expected code and a message that says something.
fn check_refusal_status(s: &tonic::Status) -> Result<(), TestCaseError> {
    prop_assert!(
        matches!(
            s.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::FailedPrecondition
                | Code::PermissionDenied
                | Code::ResourceExhausted
        ),
        "unexpected status {s:?}"
    );
    prop_assert!(!s.message().trim().is_empty(), "{s:?}");
    Ok(())
}

/// One request against the daemon, with the oracle for its answer.
async fn exercise(
    mut c: pb::reclaimd_client::ReclaimdClient<tonic::transport::Channel>,
    req: &Request,
    bystander: u32,
) -> Result<Result<(), tonic::Status>, TestCaseError> {
    let expect_code = |got: &tonic::Status, want: Code, names: &str| -> Result<(), TestCaseError> {
        prop_assert_eq!(got.code(), want, "{:?}", got);
        prop_assert!(got.message().contains(names), "{:?} names {}", got, names);
        Ok(())
    };
    Ok(match req {
        Request::Sessions(q) => {
            let r = c.list_sessions(q.clone()).await;
            match r {
                Ok(r) => {
                    for s in r.into_inner().sessions {
                        prop_assert!(q.service.is_empty() || s.service == q.service);
                        prop_assert!(q.include_dead || !s.dead);
                    }
                    Ok(())
                }
                Err(s) => return Err(TestCaseError::fail(format!("ListSessions refused: {s:?}"))),
            }
        }
        Request::Holders(q) => {
            let valid = q.verdict.is_empty()
                || reclaimd::reconcile::Verdict::NAMES.contains(&q.verdict.as_str());
            match c.list_holders(q.clone()).await {
                Ok(r) => {
                    prop_assert!(valid, "verdict {:?} accepted", q.verdict);
                    for h in r.into_inner().holders {
                        prop_assert!(q.service.is_empty() || h.service == q.service);
                        prop_assert!(q.verdict.is_empty() || h.verdict == q.verdict);
                    }
                    Ok(())
                }
                Err(s) => {
                    prop_assert!(!valid, "valid verdict {:?} refused: {s:?}", q.verdict);
                    expect_code(&s, Code::InvalidArgument, "verdict")?;
                    Err(s)
                }
            }
        }
        Request::Reclaims(q) => {
            let valid = reclaims_valid(q);
            match c.list_reclaims(q.clone()).await {
                Ok(r) => {
                    prop_assert!(valid, "accepted {q:?}");
                    let r = r.into_inner();
                    let size = if q.page_size == 0 { 100 } else { q.page_size };
                    prop_assert!(r.reclaims.len() <= size as usize);
                    let before = q.page_token.parse::<i64>().ok();
                    for x in &r.reclaims {
                        prop_assert!(q.since_ms == 0 || x.time_ms >= q.since_ms);
                        prop_assert!(q.until_ms == 0 || x.time_ms < q.until_ms);
                        prop_assert!(q.service.is_empty() || x.service == q.service);
                        prop_assert!(q.outcome.is_empty() || x.outcome == q.outcome);
                        prop_assert!(q.pid == 0 || x.pid == q.pid);
                        prop_assert!(before.is_none_or(|b| x.id < b));
                    }
                    prop_assert!(
                        r.next_page_token.is_empty()
                            || r.next_page_token.parse::<i64>().is_ok_and(|id| id > 0)
                    );
                    Ok(())
                }
                Err(s) => {
                    prop_assert!(!valid, "valid request refused: {q:?}: {s:?}");
                    prop_assert_eq!(s.code(), Code::InvalidArgument, "{:?}", s);
                    Err(s)
                }
            }
        }
        Request::Reclaim(q) => {
            let r = c.reclaim(q.clone()).await;
            if q.reason.trim().is_empty() {
                let s = r
                    .err()
                    .ok_or_else(|| TestCaseError::fail("blank reason accepted"))?;
                expect_code(&s, Code::InvalidArgument, "reason")?;
                Err(s)
            } else if (q.pid == 0) == q.session_key.is_empty() {
                let s = r
                    .err()
                    .ok_or_else(|| TestCaseError::fail("pid and session_key both or neither"))?;
                expect_code(&s, Code::InvalidArgument, "session_key")?;
                Err(s)
            } else if q.pid == bystander {
                // A holder outside every service: on record as refused, never signalled.
                match r {
                    Ok(r) => {
                        let records = r.into_inner().records;
                        prop_assert_eq!(records.len(), 1, "{:?}", records);
                        let x = &records[0];
                        prop_assert_eq!(x.pid, bystander);
                        prop_assert_eq!(&x.outcome, "skipped");
                        prop_assert!(x.reason.contains("manual request refused"), "{x:?}");
                        Ok(())
                    }
                    Err(s) => {
                        return Err(TestCaseError::fail(format!(
                            "reclaim of the bystander: {s:?}"
                        )));
                    }
                }
            } else {
                // Not a holder (no such pid, pid 1, the daemon, this test) or no such session.
                let s = r
                    .err()
                    .ok_or_else(|| TestCaseError::fail(format!("{q:?} accepted")))?;
                prop_assert_eq!(s.code(), Code::NotFound, "{:?}", s);
                Err(s)
            }
        }
    })
}

#[test]
fn api_requests_of_any_content_are_answered_or_refused_and_change_nothing() {
    let gpu = FakeGpu::new("");
    let device = gpu.device_file(0);
    let bystander = Holder::on(&device);
    gpu.set_state(&format!(
        "device 0 GPU-fuzz 16384 Fake\nproc 0 {} 64 compute\n",
        bystander.pid()
    ));
    let d = Daemon::builder(&gpu)
        .service(reclaimd_tests::llm_service())
        .start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let c = rt
        .block_on(client::connect(&Daemon::api_socket(&gpu)))
        .expect("connect to the API socket");

    // The bystander must be known before requests name it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = rt
            .block_on(c.clone().list_holders(pb::ListHoldersRequest::default()))
            .expect("ListHolders")
            .into_inner()
            .holders;
        if h.iter()
            .any(|h| h.pid == bystander.pid() && h.verdict == "unmanaged")
        {
            break;
        }
        assert!(Instant::now() < deadline, "bystander never listed: {h:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let by = bystander.pid();
    // pid 1, the daemon and this test (the daemon's parent): real, holding nothing.
    let others = vec![1, d.pid(), std::process::id()];
    let started = Instant::now();
    check(300, requests(by, others, pid_max()), |req| {
        let before = ledger_records(&d.ledger).len();
        let res = rt.block_on(exercise(c.clone(), &req, by))?;
        let after = ledger_records(&d.ledger).len();
        let failed = res.is_err();
        if let Err(s) = &res {
            check_refusal_status(s)?;
        }
        match &req {
            Request::Reclaim(q) if !failed && q.pid == by => {
                prop_assert_eq!(after, before + 1, "one decision on record")
            }
            _ => prop_assert_eq!(after, before, "the ledger changed on {:?}", req),
        }
        prop_assert!(alive(by), "the bystander was signalled by {req:?}");
        prop_assert!(alive(d.pid()), "the daemon died on {req:?}");
        Ok(())
    });
    eprintln!("api: 300 cases in {:?}", started.elapsed());

    let st = rt
        .block_on(c.clone().get_status(pb::GetStatusRequest {}))
        .expect("GetStatus after the requests")
        .into_inner();
    assert_eq!(st.policy_mode, "report");
    assert!(!st.breaker_tripped);
    assert!(alive(by));
    for r in ledger_records(&d.ledger) {
        assert_eq!(r.decision.pid, by, "{r:?}");
        assert_eq!(r.outcome, reclaimd::ledger::Outcome::Skipped, "{r:?}");
    }
    drop(c);
    drop(rt);
    d.stop();
}

// ---- 5. malformed fake-NVML state ---------------------------------------------------------

/// Up to sizes whose bytes fill a u64: the fake saturates, and the daemon's sums must too.
const HUGE_MIB: u64 = u64::MAX >> 20;

fn state_text(pids: Vec<String>) -> impl Strategy<Value = String> {
    let dev = || {
        prop_oneof![
            5 => Just("0".to_owned()),
            2 => Just("1".to_owned()),
            1 => Just("2".to_owned()),
            2 => Just("0:0".to_owned()),
            1 => Just("0:1".to_owned()),
            1 => pick(&["1:15", "64:0", "0:16", "999", "1000", "4294967296", "-1", "x"]),
        ]
    };
    let mib = || {
        prop_oneof![
            6 => (0u64..20_000).prop_map(|m| m.to_string()),
            2 => pick(&["0", "64", "16384"]),
            1 => (HUGE_MIB / 2..=HUGE_MIB).prop_map(|m| m.to_string()),
            2 => Just("na".to_owned()),
            1 => pick(&["-5", "1e3", "99999999999999999999999", "0x10"]),
        ]
    };
    let uuid = || {
        prop_oneof![
            6 => (0u8..6).prop_map(|n| format!("GPU-{n}")),
            1 => Just(format!("GPU-{}", "x".repeat(100))),
            1 => pick(&["GPU-é", "-", "GPU-0"]),
        ]
    };
    let name = || prop::collection::vec("[A-Za-z0-9]{1,8}", 0..3).prop_map(|w| w.join(" "));
    let pid = prop_oneof![
        8 => prop::sample::select(pids),
        1 => pick(&["0", "-1", "x", "4294967296"]),
    ];
    let line = prop_oneof![
        2 => (dev(), uuid(), mib(), name())
            .prop_map(|(d, u, m, n)| format!("device {d} {u} {m} {n}")),
        6 => (
            dev(),
            pid.clone(),
            mib(),
            prop_oneof![
                6 => pick(&["compute", "graphics", "mps"]),
                1 => pick(&["vram", "COMPUTE"]),
            ],
        )
            .prop_map(|(d, p, m, k)| format!("proc {d} {p} {m} {k}")),
        2 => (prop_oneof![3 => Just("0".to_owned()), 1 => dev()], 0u32..3, uuid(), mib(), name())
            .prop_map(|(d, i, u, m, n)| format!("mig {d} {i} {u} {m} {n}")),
        1 => (dev(), mib(), prop::option::of(pid))
            .prop_map(|(d, m, p)| match p {
                Some(p) => format!("unattributed {d} {m} while {p}"),
                None => format!("unattributed {d} {m}"),
            }),
        1 => (
            pick(&[
                "nvmlInit_v2",
                "nvmlShutdown",
                "nvmlSystemGetDriverVersion",
                "nvmlDeviceGetCount_v2",
                "nvmlDeviceGetHandleByIndex_v2",
                "nvmlDeviceGetUUID",
                "nvmlDeviceGetName",
                "nvmlDeviceGetMinorNumber",
                "nvmlDeviceGetMemoryInfo_v2",
                "nvmlDeviceGetMigMode",
                "nvmlDeviceGetMaxMigDeviceCount",
                "nvmlDeviceGetMigDeviceHandleByIndex",
                "nvmlDeviceGetComputeRunningProcesses_v3",
                "nvmlDeviceGetGraphicsRunningProcesses_v3",
                "nvmlDeviceGetMPSComputeRunningProcesses_v3",
                "nvmlDeviceGetComputeRunningProcesses_v2",
                "nvmlDeviceGetGraphicsRunningProcesses_v2",
                "nvmlBogus",
            ]),
            prop_oneof![
                3 => (0i32..30).prop_map(|c| c.to_string()),
                1 => any::<i32>().prop_map(|c| c.to_string()),
                1 => pick(&["x", "999"]),
            ],
        )
            .prop_map(|(f, c)| format!("fail {f} {c}")),
        1 => (dev(), pick(&["garbage_v3", "no_v3", "bogus"]))
            .prop_map(|(d, q)| format!("quirk {d} {q}")),
        1 => prop_oneof![
            pick(&["device", "proc 0", "mig", "#comment", "unattributed 0", "fail", "quirk 0", "   "]),
            "\\PC{0,20}",
        ],
    ];
    (
        prop::option::weighted(0.7, Just("device 0 GPU-main 16384 Fake H100".to_owned())),
        prop::collection::vec(line, 0..12),
    )
        .prop_map(|(first, lines): (Option<String>, Vec<String>)| {
            first
                .into_iter()
                .chain(lines)
                .collect::<Vec<_>>()
                .join("\n")
        })
}

/// What any snapshot must satisfy. `holder` holds a device file; `existing` are the pids
/// (alive throughout) that the state may name.
fn check_snapshot(s: &Inventory, holder: u32, existing: &[u32]) -> Result<(), TestCaseError> {
    // The process holding a device file is found whatever NVML says.
    let h = s
        .holders
        .get(&holder)
        .ok_or_else(|| TestCaseError::fail("the fd holder is missing"))?;
    prop_assert_eq!(h.status, HolderStatus::Live);
    prop_assert!(!h.fds.is_empty());
    for (pid, h) in &s.holders {
        prop_assert_eq!(*pid, h.pid);
        // The fake, like the driver, lists only processes that exist.
        prop_assert!(existing.contains(pid), "holder {pid} is no process of ours");
        prop_assert!(alive(*pid), "holder {pid} is not alive");
        prop_assert_ne!(h.status, HolderStatus::NotInProc, "{:?}", h);
        if h.status == HolderStatus::Live {
            prop_assert_eq!(*pid, holder, "only the fd holder is live: {:?}", h);
        }
    }
    match &s.nvml {
        NvmlStatus::Unavailable { reason } => {
            prop_assert!(!reason.is_empty());
            prop_assert!(s.devices.is_empty());
            prop_assert!(s.holders.values().all(|h| h.memory.is_empty()));
        }
        NvmlStatus::Available { .. } => {
            for d in &s.devices {
                prop_assert!(d.unattributed_bytes <= d.used_bytes, "{d:?}");
            }
            for h in s.holders.values() {
                for m in &h.memory {
                    // Only plausible entries are trusted: never more than the device has.
                    prop_assert!(
                        s.devices.iter().any(|d| d.uuid == m.device_uuid
                            && m.bytes.is_none_or(|b| b <= d.total_bytes)),
                        "{m:?} is on no device able to hold it"
                    );
                }
            }
            // Never more attributed on a device than all holders list together, even where a
            // driver repeats a UUID (a MIG instance reported with its GPU's: once counted
            // twice on the instance).
            let all_listed = s
                .holders
                .values()
                .flat_map(|h| &h.memory)
                .filter_map(|m| m.bytes)
                .fold(0u64, u64::saturating_add);
            for d in &s.devices {
                prop_assert!(d.attributed_bytes <= all_listed, "{d:?}");
            }
            // Attributed memory is what the holders list, per device (a MIG parent's is its
            // instances'), where UUIDs are unique (holders' memory is keyed by UUID).
            let uuids: BTreeSet<&str> = s.devices.iter().map(|d| d.uuid.as_str()).collect();
            if uuids.len() == s.devices.len() {
                for d in &s.devices {
                    let instances: Vec<&str> = s
                        .devices
                        .iter()
                        .filter(|x| x.parent_uuid.as_deref() == Some(d.uuid.as_str()))
                        .map(|x| x.uuid.as_str())
                        .collect();
                    let on = |u: &str| {
                        if instances.is_empty() {
                            u == d.uuid
                        } else {
                            instances.contains(&u)
                        }
                    };
                    let listed: u64 = s
                        .holders
                        .values()
                        .flat_map(|h| &h.memory)
                        .filter(|m| on(&m.device_uuid))
                        .filter_map(|m| m.bytes)
                        .sum();
                    prop_assert_eq!(d.attributed_bytes, listed, "{:?}", d);
                }
            }
        }
    }
    Ok(())
}

#[test]
fn malformed_nvml_state_never_breaks_the_inventory() {
    let gpu = FakeGpu::new("");
    let holder = Holder::on(&gpu.device_file(0));
    gpu.device_file(1);
    let me = std::process::id();
    let existing = vec![holder.pid(), me, 1];
    let pids: Vec<String> = existing
        .iter()
        .map(|p| p.to_string())
        .chain([(pid_max() + 1).to_string(), u32::MAX.to_string()])
        .collect();
    let opts = GpuOptions {
        nvml_library: Some(gpu.lib.clone()),
        device_glob: gpu.device_glob(),
    };
    // The holder is in /proc with its fd before any snapshot counts on it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_link(format!("/proc/{}/fd/0", holder.pid()))
        .is_ok_and(|p| p == gpu.device_file(0))
    {
        assert!(
            Instant::now() < deadline,
            "the holder never opened its file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    check(300, state_text(pids), |state| {
        gpu.set_state(&state);
        let mut inv = GpuInventory::new(&opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let s = inv.snapshot();
        check_snapshot(&s, holder.pid(), &existing)
            .map_err(|e| TestCaseError::fail(format!("{e}\nstate:\n{state}\nsnapshot: {s:#?}")))
    });
    eprintln!("nvml: 300 cases in {:?}", started.elapsed());
}
