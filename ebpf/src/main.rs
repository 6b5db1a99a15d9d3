//! reclaimd's kernel side: process lineage and deaths, and the TCP lifecycle of sockets on
//! watched ports, filtered in the kernel and sent to user space through one ring buffer.
//!
//! Only tracepoints are used (classic and raw): kprobes and fentry are not available on every
//! host reclaimd runs on. Kernel structure offsets come from user space (see
//! `reclaimd_common::KernelOffsets`), so no CO-RE is needed.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so `AtomicU64::fetch_add` is not offered; the
// intrinsic with its result unused compiles to the atomic add every kernel's verifier
// takes (built with RUSTC_BOOTSTRAP=1, as `-Z build-std` already requires).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::debug;
use reclaimd_common::{
    AF_INET, AF_INET6, COMM_LEN, Event, EventKind, IPPROTO_TCP, KernelOffsets, OwnerSource,
    ProbeSettings, SockInfo, TcpState, exit_filter,
    layout::{SOCK_LENGTH_PROTOCOL, SOCK_LENGTH_SK, SYS_EXIT_RET, set_state},
    ports, report, tcp_state,
};

/// Default size; user space may resize it before load (`EbpfLoader::map_max_entries`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Events that could not be reserved in `EVENTS`, per CPU.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Local ports whose sockets are reported, a bitmap (`reclaimd_common::ports`). Filled by
/// user space; all zero means no TCP events.
#[map]
static WATCHED_PORTS: Array<u64> = Array::with_max_entries(ports::WORDS, 0);

/// Watched sockets by `struct sock` address. LRU so that a socket whose CLOSE transition
/// was never seen cannot fill the map for ever.
#[map]
static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(65536, 0);

/// Sockets bound to GPU holders, by `struct sock` address (user space keeps it): their
/// deaths wake user space at once. A socket is forgotten here when it closes.
#[map]
static BOUND: HashMap<u64, u8> = HashMap::with_max_entries(65536, 0);

/// Non-zero while the daemon's reader waits without its batch timer (it found the ring
/// empty): a batched event then wakes it, so an idle daemon needs no timer to be prompt.
#[map]
static READER: Array<u32> = Array::with_max_entries(1, 0);

/// Bumped whenever an I/O program's memory of a socket (`IO_SEEN`) may have become untrue:
/// a watched socket is born (its address may be a freed socket's, remembered as unwatched
/// or owned), a watched socket's owner changes, or user space watches another port.
#[map]
static IO_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// What the I/O programs last found for a socket on this CPU: not on a watched port
/// (`watched` 0), or watched and owned by `owner` already. Valid while `IO_EPOCH` still
/// reads `epoch`. It spares the sends and receives of an established connection
/// (keep-alive: every request) the port read and the `SOCKS` lookup; direct-mapped by the
/// socket's address. It only names owners: holders are bound to sockets through their fds.
#[repr(C)]
#[derive(Clone, Copy)]
struct IoSeen {
    sk: u64,
    epoch: u64,
    owner: u32,
    watched: u32,
}

const IO_SEEN_SLOTS: u32 = 256;

#[map]
static IO_SEEN: PerCpuArray<IoSeen> = PerCpuArray::with_max_entries(IO_SEEN_SLOTS, 0);

/// A process across pid reuse: its tgid and its leader's start time.
#[repr(C)]
#[derive(Clone, Copy)]
struct ProcessKey {
    tgid: u32,
    _pad: u32,
    start_ns: u64,
}

/// Processes whose death was reported through `signal->live`, where several threads that
/// die together can each find the count at zero: the first report stands. LRU: the
/// duplicates come within microseconds, so old entries may go.
#[map]
static EXITED: LruHashMap<ProcessKey, u8> = LruHashMap::with_max_entries(4096, 0);

/// `BPF_NOEXIST`: insert only a new key (atomic against the other CPUs).
const BPF_NOEXIST: u64 = 1;

#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets::zeroed();

#[unsafe(no_mangle)]
static SETTINGS: ProbeSettings = ProbeSettings::zeroed();

#[inline(always)]
fn every_change() -> bool {
    // SAFETY: as for OFFSETS.
    unsafe { core::ptr::read_volatile(&SETTINGS) }.report == report::EVERY_CHANGE
}

/// `bpf_ringbuf_output` flags (`linux/bpf.h`).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// `bpf_ringbuf_query` flags.
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_RING_SIZE: u64 = 1;

#[inline(always)]
fn offsets() -> KernelOffsets {
    // SAFETY: a global the loader may overwrite before load; volatile stops the compiler from
    // folding in the zeroed initial value.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// Reads a `T` at `base + off` in kernel memory.
#[inline(always)]
fn read<T>(base: *const u8, off: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel faults safely on bad addresses.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize).cast::<T>()) }.map_err(i64::from)
}

/// Field `T` of a tracepoint's record at the constant `off`, loaded straight from the
/// context: the verifier allows aligned loads inside the record, where
/// `TracePointContext::read_at` makes a `bpf_probe_read_kernel` call per field (about half
/// of inet_sock_set_state's run time, and it runs for every TCP state change of the host).
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, off: u32) -> T {
    // SAFETY: `off` comes from `layout`, checked against this kernel's format file by user
    // space before load; the verifier rejects a load outside the record or unaligned.
    unsafe {
        ctx.as_ptr()
            .cast::<u8>()
            .add(off as usize)
            .cast::<T>()
            .read()
    }
}

/// A 16-byte field (an IPv6 address) at the 8-aligned `off`, as two aligned loads.
#[inline(always)]
fn field_16(ctx: &TracePointContext, off: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&field::<u64>(ctx, off).to_ne_bytes());
    out[8..].copy_from_slice(&field::<u64>(ctx, off + 8).to_ne_bytes());
    out
}

#[inline(always)]
fn count_drop() {
    if let Some(p) = DROPS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

/// Whether an event wakes its reader: `Urgent` ones at once; `Batched` ones only when the
/// ring is a quarter full (user space also reads it on a short timer), so churn that needs
/// no action costs user space a wake-up per batch, not per event.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    Urgent,
    Batched,
}

#[inline(always)]
fn reader_parked() -> bool {
    READER.get(0).is_some_and(|v| *v != 0)
}

#[inline(always)]
fn emit(ev: &Event, wake: Wake) {
    let flags = if every_change() {
        0 // the kernel's own policy: wake a reader that has caught up
    } else if wake == Wake::Urgent
        || reader_parked()
        || EVENTS.query(BPF_RB_AVAIL_DATA) >= EVENTS.query(BPF_RB_RING_SIZE) / 4
    {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<Event>(ev, flags).is_err() {
        count_drop();
    }
}

/// The current task's name, written into `comm` by the helper itself (which zeroes it on
/// failure): no buffer to clear first.
#[inline(always)]
fn current_comm_into(comm: &mut [u8; COMM_LEN]) {
    // SAFETY: the helper writes at most COMM_LEN bytes into the buffer it is given.
    unsafe { generated::bpf_get_current_comm(comm.as_mut_ptr().cast(), COMM_LEN as u32) };
}

#[inline(always)]
fn current_ids() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    (pid_tgid as u32, (pid_tgid >> 32) as u32)
}

// ---- processes ---------------------------------------------------------------------------

/// `sched_process_fork` as a raw tracepoint: the classic record carries thread ids only, the
/// raw one the two `task_struct`s, so threads can be told from processes here in the kernel.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    let _ = try_fork(&ctx);
    0
}

fn try_fork(ctx: &RawTracePointContext) -> Result<(), i64> {
    let off = offsets();
    if off.valid == 0 {
        return Ok(());
    }
    let child: *const u8 = ctx.arg(1);
    let pid: u32 = read(child, off.task_pid)?;
    let tgid: u32 = read(child, off.task_tgid)?;
    if pid != tgid {
        return Ok(()); // a new thread, not a new process
    }
    let (ppid, parent_start) = match read::<*const u8>(child, off.task_real_parent) {
        Ok(parent) => (
            read::<u32>(parent, off.task_tgid).unwrap_or(0),
            process_start(parent, &off),
        ),
        Err(_) => {
            debug!(ctx, "fork {}: real_parent unreadable", pid);
            (0, 0)
        }
    };
    let mut ev = Event::zeroed();
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.kind = EventKind::Fork as u8;
    ev.pid = pid;
    ev.tgid = tgid;
    ev.ppid = ppid;
    ev.start_ns = parent_start;
    current_comm_into(&mut ev.comm);
    // At once: user space reads a parent's name from /proc at its first fork (set after
    // exec, by prctl), which a parent killed a moment later would take with it.
    emit(&ev, Wake::Urgent);
    Ok(())
}

/// When the process of `task` started, as `/proc/PID/stat` derives it: its leader's
/// `start_boottime` (ns since boot). With the parent's name in the fork record, user space
/// knows a parent killed before it could read `/proc`. 0 when unknown.
fn process_start(task: *const u8, off: &KernelOffsets) -> u64 {
    if off.task_start_boottime == 0 || off.task_group_leader == 0 {
        return 0;
    }
    read::<*const u8>(task, off.task_group_leader)
        .and_then(|leader| read::<u64>(leader, off.task_start_boottime))
        .unwrap_or(0)
}

/// The death of a process: the exit of its last thread, which need not be its leader (a
/// leader may exit first while other threads run on: no death, DESIGN invariant 9).
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_exit(&ctx);
    0
}

/// Whether the exiting thread is the last of its process, and the first to say so.
#[inline(always)]
fn last_of_its_process(
    ctx: &TracePointContext,
    off: &KernelOffsets,
    tgid: u32,
) -> Result<bool, i64> {
    match off.exit_filter {
        exit_filter::GROUP_DEAD => {
            // SAFETY: offset taken from this kernel's tracepoint format.
            let group_dead: u8 = unsafe { ctx.read_at(off.exit_group_dead as usize) }?;
            Ok(group_dead != 0)
        }
        exit_filter::SIGNAL_LIVE => {
            // SAFETY: the current task is alive for the whole tracepoint.
            let task = unsafe { bpf_get_current_task() } as *const u8;
            let signal: *const u8 = read(task, off.task_signal)?;
            let live: i32 = read(signal, off.signal_live)?;
            if live != 0 {
                return Ok(false); // other threads of the process run on
            }
            let leader: *const u8 = read(task, off.task_group_leader)?;
            let key = ProcessKey {
                tgid,
                _pad: 0,
                start_ns: read(leader, off.task_start_time)?,
            };
            // Fails when another thread of the same process reported first.
            Ok(EXITED.insert(key, 1, BPF_NOEXIST).is_ok())
        }
        _ => Ok(false),
    }
}

fn try_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let (pid, tgid) = current_ids();
    let off = offsets();
    if !last_of_its_process(ctx, &off, tgid)? {
        return Ok(());
    }
    let exit_code = if off.valid != 0 {
        // SAFETY: the current task is alive for the whole tracepoint.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        read::<i32>(task, off.task_exit_code).unwrap_or(0)
    } else {
        0
    };
    let mut ev = Event::zeroed();
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.kind = EventKind::Exit as u8;
    ev.pid = pid;
    ev.tgid = tgid;
    ev.exit_code = exit_code;
    current_comm_into(&mut ev.comm);
    emit(&ev, Wake::Urgent);
    Ok(())
}

// ---- TCP ---------------------------------------------------------------------------------

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_set_state(&ctx);
    0
}

/// Whether sockets on local port `port` are reported (`WATCHED_PORTS`).
#[inline(always)]
fn watched_port(port: u16) -> bool {
    let (word, bit) = ports::slot(port);
    WATCHED_PORTS.get(word).copied().unwrap_or(0) & bit != 0
}

/// A state change of a socket on a watched port, as the record gives it.
struct Change {
    sk: u64,
    sport: u16,
    old_state: u8,
    new_state: u8,
}

/// The change this record reports, when it is one of a TCP socket on a watched port.
#[inline(always)]
fn watched_change(ctx: &TracePointContext) -> Option<Change> {
    use set_state::*;
    if field::<u16>(ctx, PROTOCOL) != IPPROTO_TCP {
        return None;
    }
    let sport: u16 = field(ctx, SPORT);
    if !watched_port(sport) {
        return None;
    }
    Some(Change {
        sk: field(ctx, SKADDR),
        sport,
        old_state: field::<i32>(ctx, OLDSTATE) as u8,
        new_state: field::<i32>(ctx, NEWSTATE) as u8,
    })
}

/// What the record says of the socket: its ports and addresses, no owner. None for a
/// family that is neither IPv4 nor IPv6.
#[inline(always)]
fn from_record(ctx: &TracePointContext, change: &Change) -> Option<SockInfo> {
    use set_state::*;
    let mut info = SockInfo::zeroed();
    let family: u16 = field(ctx, FAMILY);
    if family == AF_INET as u16 {
        info.saddr[..4].copy_from_slice(&field::<u32>(ctx, SADDR).to_ne_bytes());
        info.daddr[..4].copy_from_slice(&field::<u32>(ctx, DADDR).to_ne_bytes());
    } else if family == AF_INET6 as u16 {
        info.saddr = field_16(ctx, SADDR_V6);
        info.daddr = field_16(ctx, DADDR_V6);
    } else {
        return None;
    }
    info.family = family as u8;
    info.sport = change.sport;
    info.dport = field(ctx, DPORT);
    info.state = change.new_state;
    Some(info)
}

/// Keeps a socket's state in `SOCKS`, in place once known (an LRU insert costs more than a
/// lookup), and sends user space only its birth and death, as libbpf-tools tcplife
/// aggregates: the closing moves after the death change nothing user space decides on.
fn try_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let Some(change) = watched_change(ctx) else {
        return Ok(());
    };
    let Some(mut seen) = from_record(ctx, &change) else {
        return Ok(());
    };
    // A life starts (connect, listen, or a listener's new child): what `SOCKS` may hold at
    // this address is a freed socket's whose CLOSE went unseen, owner and all.
    let known = if tcp_state::starts_a_life(change.old_state, change.new_state) {
        // What an I/O program remembers of this address is a freed socket's.
        bump_io_epoch();
        None
    } else {
        SOCKS.get_ptr_mut(change.sk)
    };
    let info: &mut SockInfo = match known {
        Some(p) => {
            // SAFETY: the map value stays valid for this program run; another CPU's write
            // races only with another real change or owner of the same socket.
            let info = unsafe { &mut *p };
            // Every change takes the record's ports and addresses: a listener's child is
            // traced first (LISTEN to SYN_RECV) with its listener's, before the kernel sets
            // its own (`inet_csk_clone_lock`).
            seen.owner_tgid = info.owner_tgid;
            seen.owner_comm = info.owner_comm;
            seen.birth_pending = info.birth_pending;
            seen.born_ns = info.born_ns;
            *info = seen;
            info
        }
        None => &mut seen,
    };
    // Packet-driven transitions run in softirq (or, on loopback, in the peer's context), so
    // the current task is the owner only for states its own syscalls enter.
    if tcp_state::entered_by_owner(change.new_state) {
        let (_, tgid) = current_ids();
        if info.owner_tgid != tgid {
            info.owner_tgid = tgid;
            current_comm_into(&mut info.owner_comm);
            bump_io_epoch();
        }
    }
    let open = |s: u8| TcpState::from_raw(s).is_open();
    let born = change.new_state == tcp_state::ESTABLISHED;
    let died = open(change.old_state) && !open(change.new_state);
    let closed = change.new_state == tcp_state::CLOSE;
    if every_change() {
        emit(&change_event(&change, info, closed), Wake::Batched);
    } else {
        report_life(&change, info, born, died, closed);
    }
    if closed {
        // A lookup takes no lock; a removal locks the bucket even for a key it lacks, and
        // hardly any socket is bound.
        // SAFETY: as above.
        if unsafe { BOUND.get(change.sk) }.is_some() {
            let _ = BOUND.remove(change.sk);
        }
        let _ = SOCKS.remove(change.sk);
    } else if known.is_none() {
        let _ = SOCKS.insert(change.sk, *info, 0);
    }
    Ok(())
}

/// What user space hears of a socket's life, as tcplife aggregates it: its birth with its
/// owner, and its death. A listener's child is established in softirq, where its owner is
/// unknown: its birth waits for the owner's accept or first I/O (`set_owner`), so a
/// connection costs user space two records, not three (birth, owner, death); a death that
/// comes first brings the waiting birth out before it.
#[inline(always)]
fn report_life(change: &Change, info: &mut SockInfo, born: bool, died: bool, closed: bool) {
    if born {
        info.born_ns = unsafe { bpf_ktime_get_ns() };
        if info.owner_tgid == 0 {
            info.birth_pending = 1;
        } else {
            emit(&change_event(change, info, closed), Wake::Batched);
        }
    }
    if died {
        if info.birth_pending != 0 {
            info.birth_pending = 0;
            emit(&birth_event(change.sk, info), Wake::Batched);
        }
        // SAFETY: the value is a plain u8, only tested for presence.
        let bound = unsafe { BOUND.get(change.sk) }.is_some();
        let wake = if bound { Wake::Urgent } else { Wake::Batched };
        emit(&change_event(change, info, closed), wake);
    }
}

/// The birth of a listener's child, reported after the fact: stamped with the moment it was
/// established, naming the owner known now (0 when it dies first).
#[inline(always)]
fn birth_event(sk: u64, info: &SockInfo) -> Event {
    let change = Change {
        sk,
        sport: info.sport,
        old_state: tcp_state::SYN_RECV,
        new_state: tcp_state::ESTABLISHED,
    };
    let mut ev = change_event(&change, info, false);
    ev.ts_ns = info.born_ns;
    ev
}

/// The record user space gets for a change of a watched socket.
#[inline(always)]
fn change_event(change: &Change, info: &SockInfo, closed: bool) -> Event {
    let mut ev = Event::zeroed();
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.kind = EventKind::Tcp as u8;
    ev.sock = change.sk;
    ev.sport = info.sport;
    ev.dport = info.dport;
    ev.family = info.family;
    ev.old_state = change.old_state;
    ev.new_state = change.new_state;
    ev.saddr = info.saddr;
    ev.daddr = info.daddr;
    ev.owner_tgid = info.owner_tgid;
    ev.pid = info.owner_tgid;
    ev.tgid = info.owner_tgid;
    ev.comm = info.owner_comm;
    if closed {
        // Why the kernel closed it: set before the CLOSE transition by tcp_reset
        // (ECONNRESET) and tcp_write_err (ETIMEDOUT).
        let off = offsets();
        if off.valid != 0 && off.sock_sk_err != 0 {
            ev.exit_code = read::<i32>(change.sk as *const u8, off.sock_sk_err).unwrap_or(0);
        }
    }
    ev
}

/// The I/O programs' epoch now (see `IO_EPOCH`).
#[inline(always)]
fn io_epoch() -> u64 {
    IO_EPOCH.get(0).copied().unwrap_or(0)
}

/// Makes every CPU's `IO_SEEN` stale. Atomic: two bumps at once must not write the same
/// value, or a memory taken between them would outlive the second.
#[inline(always)]
fn bump_io_epoch() {
    if let Some(p) = IO_EPOCH.get_ptr_mut(0) {
        use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};
        // SAFETY: a map value, valid for this run and 8-aligned.
        let _ = unsafe { atomic_xadd::<u64, u64, { Relaxed }>(p, 1) };
    }
}

/// This CPU's `IO_SEEN` slot for `sk`.
#[inline(always)]
fn io_seen_slot(sk: u64) -> Option<*mut IoSeen> {
    // Fibonacci hashing: slab addresses share their low bits.
    let slot = (sk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u32 % IO_SEEN_SLOTS;
    IO_SEEN.get_ptr_mut(slot)
}

/// Records `tgid` as the owner of a watched socket and reports the change. Returns whether
/// the socket is watched (in `SOCKS`).
#[inline(always)]
fn set_owner(sk: u64, source: OwnerSource, fd: i32) -> bool {
    let Some(info) = SOCKS.get_ptr_mut(sk) else {
        return false; // not a watched socket
    };
    let (pid, tgid) = current_ids();
    // SAFETY: map value pointer valid for this program run; races with another CPU only
    // overwrite the owner with another real owner.
    let info = unsafe { &mut *info };
    if info.owner_tgid == tgid {
        return true;
    }
    info.owner_tgid = tgid;
    bump_io_epoch();
    current_comm_into(&mut info.owner_comm);
    if info.birth_pending != 0 {
        // Its first owner: the birth user space was not told yet says it.
        info.birth_pending = 0;
        emit(&birth_event(sk, info), Wake::Batched);
        return true;
    }
    let mut ev = Event::zeroed();
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.kind = EventKind::Owner as u8;
    ev.detail = source as u8;
    ev.sock = sk;
    ev.pid = pid;
    ev.tgid = tgid;
    ev.owner_tgid = tgid;
    ev.exit_code = fd;
    ev.sport = info.sport;
    ev.dport = info.dport;
    ev.family = info.family;
    ev.old_state = info.state;
    ev.new_state = info.state;
    ev.saddr = info.saddr;
    ev.daddr = info.daddr;
    ev.comm = info.owner_comm;
    emit(&ev, Wake::Batched);
    true
}

/// `accept` returned fd `ret` to the current process: find its `struct sock` through the fd
/// table (task → files → fdt → fd[ret] → file → socket → sk). This is the one moment the
/// accepting process is known for a socket that is never read or written.
fn try_accept_exit<C: EbpfContext>(ctx: &C, ret: i64) -> Result<(), i64> {
    if ret < 0 {
        return Ok(());
    }
    let off = offsets();
    if off.valid == 0 {
        return Ok(());
    }
    let fd = ret as u32;
    // SAFETY: the current task is alive for the whole tracepoint.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let files: *const u8 = read(task, off.task_files)?;
    let fdt: *const u8 = read(files, off.files_fdt)?;
    let max_fds: u32 = read(fdt, off.fdtable_max_fds)?;
    if fd >= max_fds {
        debug!(ctx, "accept fd {} beyond max_fds {}", fd, max_fds);
        return Ok(());
    }
    let fd_array: *const u8 = read(fdt, off.fdtable_fd)?;
    let file: *const u8 = read(fd_array, fd.wrapping_mul(8))?;
    let socket: *const u8 = read(file, off.file_private_data)?;
    let sk: u64 = read(socket, off.socket_sk)?;
    let _ = set_owner(sk, OwnerSource::Accept, fd as i32);
    Ok(())
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    let _ = try_accept_exit(&ctx, field(&ctx, SYS_EXIT_RET));
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    let _ = try_accept_exit(&ctx, field(&ctx, SYS_EXIT_RET));
    0
}

/// Names the owner of a watched socket from its I/O. Every send and receive of the host
/// runs this: only TCP sockets on a watched local port reach the `SOCKS` lookup, so the
/// host's other sockets (a client's ephemeral port, a Unix socket) cost a field test and a
/// two-byte read instead of a hash lookup that misses; and a socket this CPU already found
/// unwatched, or owned by the current process, costs neither (`IO_SEEN`).
#[inline(always)]
fn io_owner(ctx: &TracePointContext) {
    if field::<u16>(ctx, SOCK_LENGTH_PROTOCOL) != IPPROTO_TCP {
        return;
    }
    let sk: u64 = field(ctx, SOCK_LENGTH_SK);
    let (_, tgid) = current_ids();
    // Read before anything is looked at: a change after it makes what is remembered stale.
    let epoch = io_epoch();
    let Some(seen) = io_seen_slot(sk) else {
        return;
    };
    // SAFETY: this CPU's slot, valid for this run; no other program writes it meanwhile
    // (tracepoint programs run with preemption off and are not nested on a CPU).
    let seen = unsafe { &mut *seen };
    if seen.sk == sk && seen.epoch == epoch && (seen.watched == 0 || seen.owner == tgid) {
        return;
    }
    let off = offsets();
    if off.valid != 0 && off.sock_num != 0 {
        // `skc_num`: the local port, the record's sport in inet_sock_set_state; fixed for
        // the socket's life. Unreadable, the lookup decides.
        if let Ok(port) = read::<u16>(sk as *const u8, off.sock_num)
            && !watched_port(port)
        {
            *seen = IoSeen {
                sk,
                epoch,
                owner: 0,
                watched: 0,
            };
            return;
        }
    }
    // A socket on a watched port missing from `SOCKS` (opened before the programs were
    // loaded, or evicted) is not remembered: each of its I/O looks it up, as before.
    if set_owner(sk, OwnerSource::Io, -1) {
        *seen = IoSeen {
            sk,
            epoch,
            owner: tgid,
            watched: 1,
        };
    }
}

#[tracepoint(category = "sock", name = "sock_send_length")]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    io_owner(&ctx);
    0
}

#[tracepoint(category = "sock", name = "sock_recv_length")]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    io_owner(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
