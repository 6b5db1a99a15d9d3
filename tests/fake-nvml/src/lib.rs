//! A stand-in for NVIDIA's `libnvidia-ml.so.1`, loaded by the real nvml-wrapper code path, so
//! reclaimd's GPU code is tested on machines without a GPU.
//!
//! Every call re-reads its state file, so a test changes the GPUs' state while the code under
//! test runs (write the file atomically: a temp file, then rename). The file is named by the
//! environment variable `FAKE_NVML_STATE`, or else sits beside the library as
//! `<library path>.state`, so tests in one process each load their own copy of the library
//! with their own state. Lines:
//!
//! ```text
//! device <index> <uuid> <total_mib> <name...>
//! proc <device_index> <pid> <used_mib|na> compute|graphics|mps
//! mig <device_index> <instance> <uuid> <total_mib> <name...>
//! unattributed <device_index> <mib> [while <pid>]
//! fail <nvml function> <nvml return code>
//! quirk <device_index> garbage_v3|no_v3
//! ```
//!
//! A `mig` line puts its device in MIG mode with that instance (handles through
//! `nvmlDeviceGetMigDeviceHandleByIndex`); `proc` and `unattributed` lines name an instance as
//! `<device_index>:<instance>`, and a MIG parent's used memory includes its instances'.
//!
//! A `proc` line is reported only while `/proc/<pid>` exists and a thread of it runs,
//! as the driver frees memory when a process's device files close. Device used memory is the
//! reported processes' memory plus `unattributed` (with `while <pid>`, only while that process
//! lives: memory a driver keeps for a holder it does not list, e.g. a child that inherited
//! the fds of a dead creator). `quirk garbage_v3` makes the `_v3` process
//! lists return malformed entries (as the 535.43–535.86 drivers did); `no_v3` makes them
//! answer "function not found" (as 535.98 did); the `_v2` lists stay right. Unknown lines are
//! reported on stderr once and otherwise ignored.
#![allow(non_snake_case, non_camel_case_types, clippy::missing_safety_doc)]

use std::{
    collections::HashSet,
    ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void},
    path::PathBuf,
    sync::{Mutex, OnceLock},
};

type nvmlReturn_t = c_int;
type nvmlDevice_t = *mut c_void;

const SUCCESS: nvmlReturn_t = 0;
const ERROR_INVALID_ARGUMENT: nvmlReturn_t = 2;
const ERROR_NOT_SUPPORTED: nvmlReturn_t = 3;
const ERROR_NOT_FOUND: nvmlReturn_t = 6;
const ERROR_INSUFFICIENT_SIZE: nvmlReturn_t = 7;
const ERROR_FUNCTION_NOT_FOUND: nvmlReturn_t = 13;
const ERROR_ARGUMENT_VERSION_MISMATCH: nvmlReturn_t = 25;

/// `usedGpuMemory` when the driver cannot tell.
const VALUE_NOT_AVAILABLE: u64 = u64::MAX;
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Compute,
    Graphics,
    Mps,
}

/// MIG instances get internal indexes from here on (never enumerated as GPUs).
const MIG_BASE: u32 = 1000;

/// `N` names GPU N; `N:M` names MIG instance M of GPU N.
fn device_key(s: &str) -> Option<u32> {
    match s.split_once(':') {
        None => s.parse().ok(),
        Some((gpu, mig)) => {
            let (gpu, mig): (u32, u32) = (gpu.parse().ok()?, mig.parse().ok()?);
            (gpu < 64 && mig < 16).then_some(MIG_BASE + gpu * 16 + mig)
        }
    }
}

#[derive(Clone, Debug)]
struct Device {
    /// The GPU index, or `MIG_BASE + gpu * 16 + instance` for a MIG instance.
    index: u32,
    /// For a MIG instance: the GPU's index and the instance's.
    mig_of: Option<(u32, u32)>,
    uuid: String,
    name: String,
    total: u64,
    unattributed: u64,
    /// Unattributed memory held only while the pid lives.
    unattributed_while: Vec<(u64, u32)>,
    garbage_v3: bool,
    no_v3: bool,
}

impl Device {
    fn new(index: u32, mig_of: Option<(u32, u32)>, uuid: &str, name: String, mib: u64) -> Self {
        Self {
            index,
            mig_of,
            uuid: uuid.to_owned(),
            name,
            total: mib.saturating_mul(MIB),
            unattributed: 0,
            unattributed_while: Vec::new(),
            garbage_v3: false,
            no_v3: false,
        }
    }
}

#[derive(Clone, Debug)]
struct Proc {
    device: u32,
    pid: u32,
    used: Option<u64>,
    kind: Kind,
}

#[derive(Default, Debug)]
struct State {
    devices: Vec<Device>,
    procs: Vec<Proc>,
    fails: Vec<(String, nvmlReturn_t)>,
}

fn warn_once(msg: String) {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Ok(mut seen) = seen.lock()
        && seen.insert(msg.clone())
    {
        eprintln!("fake-nvml: {msg}");
    }
}

/// This library's own path, for the state file beside it.
fn own_path() -> Option<PathBuf> {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: any address inside this library identifies it.
    let ok = unsafe { libc::dladdr(own_path as *const c_void, &mut info) };
    if ok == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr returns a NUL-terminated path that lives as long as the library.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(name.to_string_lossy().into_owned()))
}

fn state_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FAKE_NVML_STATE") {
        return Some(PathBuf::from(p));
    }
    own_path().map(|p| {
        let mut s = p.into_os_string();
        s.push(".state");
        PathBuf::from(s)
    })
}

fn parse(text: &str) -> State {
    let mut st = State::default();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        let bad = || warn_once(format!("state line {}: cannot parse {line:?}", no + 1));
        match w.as_slice() {
            ["device", index, uuid, total, name @ ..] if !name.is_empty() => {
                match (index.parse(), total.parse::<u64>()) {
                    (Ok(index), Ok(total)) if index < MIG_BASE => {
                        st.devices
                            .push(Device::new(index, None, uuid, name.join(" "), total))
                    }
                    _ => bad(),
                }
            }
            ["mig", gpu, instance, uuid, total, name @ ..] if !name.is_empty() => {
                let key = device_key(&format!("{gpu}:{instance}"));
                match (
                    key,
                    gpu.parse::<u32>(),
                    instance.parse::<u32>(),
                    total.parse::<u64>(),
                ) {
                    (Some(index), Ok(g), Ok(m), Ok(total))
                        if st.devices.iter().any(|d| d.index == g) =>
                    {
                        st.devices.push(Device::new(
                            index,
                            Some((g, m)),
                            uuid,
                            name.join(" "),
                            total,
                        ))
                    }
                    _ => bad(),
                }
            }
            ["proc", device, pid, used, kind] => {
                let kind = match *kind {
                    "compute" => Some(Kind::Compute),
                    "graphics" => Some(Kind::Graphics),
                    "mps" => Some(Kind::Mps),
                    _ => None,
                };
                let used = match *used {
                    "na" => Some(None),
                    n => n.parse::<u64>().ok().map(|m| Some(m.saturating_mul(MIB))),
                };
                match (device_key(device), pid.parse(), used, kind) {
                    (Some(device), Ok(pid), Some(used), Some(kind)) => st.procs.push(Proc {
                        device,
                        pid,
                        used,
                        kind,
                    }),
                    _ => bad(),
                }
            }
            ["unattributed", device, mib] => match (device_key(device), mib.parse::<u64>()) {
                (Some(d), Ok(m)) => match st.devices.iter_mut().find(|x| x.index == d) {
                    Some(dev) => dev.unattributed = m.saturating_mul(MIB),
                    None => bad(),
                },
                _ => bad(),
            },
            ["unattributed", device, mib, "while", pid] => {
                match (device_key(device), mib.parse::<u64>(), pid.parse::<u32>()) {
                    (Some(d), Ok(m), Ok(p)) => match st.devices.iter_mut().find(|x| x.index == d) {
                        Some(dev) => dev.unattributed_while.push((m.saturating_mul(MIB), p)),
                        None => bad(),
                    },
                    _ => bad(),
                }
            }
            ["fail", function, code] => match code.parse() {
                Ok(code) => st.fails.push(((*function).to_owned(), code)),
                Err(_) => bad(),
            },
            ["quirk", device, quirk] => match device.parse::<u32>() {
                Ok(d) => match (st.devices.iter_mut().find(|x| x.index == d), *quirk) {
                    (Some(dev), "garbage_v3") => dev.garbage_v3 = true,
                    (Some(dev), "no_v3") => dev.no_v3 = true,
                    _ => bad(),
                },
                Err(_) => bad(),
            },
            _ => bad(),
        }
    }
    st
}

fn state() -> State {
    let Some(path) = state_path() else {
        warn_once("cannot locate the state file".to_owned());
        return State::default();
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text),
        Err(e) => {
            warn_once(format!("state file {}: {e}", path.display()));
            State::default()
        }
    }
}

/// Like the driver: memory is reported only for processes that are alive, that is while any
/// of their threads runs (a leader that exited before its threads shows as `Z`).
fn alive(pid: u32) -> bool {
    let running = |stat: &str| {
        // The state follows the command, which is in parentheses and may contain anything.
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X")
    };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    if running(&stat) {
        return true;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .filter_map(|e| e.ok())
        .any(|e| std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| running(&s)))
}

impl State {
    fn failure(&self, function: &str) -> Option<nvmlReturn_t> {
        self.fails
            .iter()
            .find(|(f, _)| f == function)
            .map(|(_, c)| *c)
    }

    fn device(&self, handle: nvmlDevice_t) -> Option<&Device> {
        let index = (handle as usize).checked_sub(1)? as u32;
        self.devices.iter().find(|d| d.index == index)
    }

    fn live_procs(&self, device: u32, kind: Option<Kind>) -> Vec<&Proc> {
        self.procs
            .iter()
            .filter(|p| p.device == device && kind.is_none_or(|k| p.kind == k) && alive(p.pid))
            .collect()
    }

    /// Saturating: test states may name absurd sizes, and a panic here would abort the
    /// process that loaded the library.
    fn used(&self, d: &Device) -> u64 {
        let procs = self
            .live_procs(d.index, None)
            .iter()
            .filter_map(|p| p.used)
            .fold(0u64, u64::saturating_add);
        let held = d
            .unattributed_while
            .iter()
            .filter(|(_, pid)| alive(*pid))
            .map(|(m, _)| *m)
            .fold(0u64, u64::saturating_add);
        let instances = self
            .instances(d.index)
            .map(|m| self.used(m))
            .fold(0u64, u64::saturating_add);
        procs
            .saturating_add(d.unattributed)
            .saturating_add(held)
            .saturating_add(instances)
            .min(d.total)
    }

    fn instances(&self, gpu: u32) -> impl Iterator<Item = &Device> {
        self.devices
            .iter()
            .filter(move |d| d.mig_of.is_some_and(|(g, _)| g == gpu))
    }

    fn gpus(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().filter(|d| d.mig_of.is_none())
    }
}

/// Returns early with the failure configured for `$name`, else binds the state.
macro_rules! begin {
    ($name:expr) => {{
        let st = state();
        if let Some(code) = st.failure($name) {
            return code;
        }
        st
    }};
}

unsafe fn write_str(s: &str, buf: *mut c_char, len: c_uint) -> nvmlReturn_t {
    if buf.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len as usize {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller gave a buffer of `len` bytes, checked above.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    SUCCESS
}

// ---- library ------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    let _ = begin!("nvmlInit_v2");
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    let _ = begin!("nvmlInitWithFlags");
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    let _ = begin!("nvmlShutdown");
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let s: &'static CStr = match result {
        SUCCESS => c"Success",
        ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        ERROR_NOT_SUPPORTED => c"Not Supported",
        ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        9 => c"Driver Not Loaded",
        ERROR_FUNCTION_NOT_FOUND => c"Function Not Found",
        15 => c"GPU is lost",
        ERROR_ARGUMENT_VERSION_MISMATCH => c"Argument Version Mismatch",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(buf: *mut c_char, len: c_uint) -> nvmlReturn_t {
    let _ = begin!("nvmlSystemGetDriverVersion");
    // SAFETY: caller's buffer of `len` bytes.
    unsafe { write_str("999.99-fake", buf, len) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    let st = begin!("nvmlDeviceGetCount_v2");
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null.
    unsafe { *count = st.gpus().count() as c_uint };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let st = begin!("nvmlDeviceGetHandleByIndex_v2");
    if device.is_null() || !st.gpus().any(|d| d.index == index) {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null. Handles are index + 1 and never dereferenced by callers.
    unsafe { *device = (index as usize + 1) as nvmlDevice_t };
    SUCCESS
}

// ---- device facts -------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    buf: *mut c_char,
    len: c_uint,
) -> nvmlReturn_t {
    let st = begin!("nvmlDeviceGetUUID");
    let Some(d) = st.device(device) else {
        return ERROR_INVALID_ARGUMENT;
    };
    // SAFETY: caller's buffer of `len` bytes.
    unsafe { write_str(&d.uuid, buf, len) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    buf: *mut c_char,
    len: c_uint,
) -> nvmlReturn_t {
    let st = begin!("nvmlDeviceGetName");
    let Some(d) = st.device(device) else {
        return ERROR_INVALID_ARGUMENT;
    };
    // SAFETY: caller's buffer of `len` bytes.
    unsafe { write_str(&d.name, buf, len) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    let st = begin!("nvmlDeviceGetIndex");
    match st.device(device) {
        Some(d) if !index.is_null() => {
            // SAFETY: checked non-null.
            unsafe { *index = d.index };
            SUCCESS
        }
        _ => ERROR_INVALID_ARGUMENT,
    }
}

/// The device file is `/dev/nvidia<minor>`; the fake's minor is its index.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(
    device: nvmlDevice_t,
    minor: *mut c_uint,
) -> nvmlReturn_t {
    let st = begin!("nvmlDeviceGetMinorNumber");
    match st.device(device) {
        // MIG instances have no /dev/nvidia<N> of their own.
        Some(d) if d.mig_of.is_some() => ERROR_NOT_SUPPORTED,
        Some(d) if !minor.is_null() => {
            // SAFETY: checked non-null.
            unsafe { *minor = d.index };
            SUCCESS
        }
        _ => ERROR_INVALID_ARGUMENT,
    }
}

#[repr(C)]
pub struct nvmlMemory_t {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

#[repr(C)]
pub struct nvmlMemory_v2_t {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

const MEMORY_V2_VERSION: c_uint = (size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    let st = begin!("nvmlDeviceGetMemoryInfo_v2");
    let Some(d) = st.device(device) else {
        return ERROR_INVALID_ARGUMENT;
    };
    if memory.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null; the caller owns a v2 struct.
    let m = unsafe { &mut *memory };
    if m.version != MEMORY_V2_VERSION {
        return ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    let used = st.used(d);
    m.total = d.total;
    m.reserved = 0;
    m.used = used;
    m.free = d.total - used;
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    let st = begin!("nvmlDeviceGetMemoryInfo");
    let Some(d) = st.device(device) else {
        return ERROR_INVALID_ARGUMENT;
    };
    if memory.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let used = st.used(d);
    // SAFETY: checked non-null.
    unsafe {
        (*memory).total = d.total;
        (*memory).used = used;
        (*memory).free = d.total - used;
    }
    SUCCESS
}

/// MIG mode is on for a GPU with `mig` lines; a GPU without them does not support MIG.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    let st = begin!("nvmlDeviceGetMigMode");
    let Some(d) = st.device(device) else {
        return ERROR_INVALID_ARGUMENT;
    };
    if st.instances(d.index).next().is_none() {
        return ERROR_NOT_SUPPORTED;
    }
    if current.is_null() || pending.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null.
    unsafe {
        *current = 1;
        *pending = 1;
    }
    SUCCESS
}

/// Like a real GPU, the maximum: one past the highest instance; absent ones are NOT_FOUND.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    let st = begin!("nvmlDeviceGetMaxMigDeviceCount");
    let Some(d) = st.device(device) else {
        return ERROR_INVALID_ARGUMENT;
    };
    let Some(max) = st
        .instances(d.index)
        .filter_map(|m| m.mig_of)
        .map(|(_, i)| i + 1)
        .max()
    else {
        return ERROR_NOT_SUPPORTED;
    };
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null.
    unsafe { *count = max };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let st = begin!("nvmlDeviceGetMigDeviceHandleByIndex");
    let Some(d) = st.device(device) else {
        return ERROR_INVALID_ARGUMENT;
    };
    if mig.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    match st
        .instances(d.index)
        .find(|m| m.mig_of == Some((d.index, index)))
    {
        Some(m) => {
            // SAFETY: checked non-null; handles are internal index + 1.
            unsafe { *mig = (m.index as usize + 1) as nvmlDevice_t };
            SUCCESS
        }
        None => ERROR_NOT_FOUND,
    }
}

// ---- running processes --------------------------------------------------------------------

/// `nvmlProcessInfo_t` of the `_v2` and `_v3` calls: 24 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct nvmlProcessInfo_t {
    pid: c_uint,
    usedGpuMemory: c_ulonglong,
    gpuInstanceId: c_uint,
    computeInstanceId: c_uint,
}

/// The NVML convention: `*count` in, the number of entries out; with too small a buffer
/// (a count of 0 and NULL asks for the count) INSUFFICIENT_SIZE and the count needed.
unsafe fn list(
    st: &State,
    device: nvmlDevice_t,
    kind: Kind,
    v3: bool,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    let Some(d) = st.device(device) else {
        return ERROR_INVALID_ARGUMENT;
    };
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    if v3 && d.no_v3 {
        return ERROR_FUNCTION_NOT_FOUND;
    }
    let procs = st.live_procs(d.index, Some(kind));
    // SAFETY: checked non-null.
    let room = unsafe { *count } as usize;
    unsafe { *count = procs.len() as c_uint };
    if procs.is_empty() {
        return SUCCESS;
    }
    if room < procs.len() || infos.is_null() {
        return ERROR_INSUFFICIENT_SIZE;
    }
    for (i, p) in procs.iter().enumerate() {
        let entry = if v3 && d.garbage_v3 {
            // What a 24-byte reader sees of 32-byte entries: shifted fields.
            nvmlProcessInfo_t {
                pid: if i % 2 == 0 { 0 } else { p.pid },
                usedGpuMemory: d.total.saturating_mul(4) + i as u64,
                gpuInstanceId: p.pid,
                computeInstanceId: 0,
            }
        } else {
            nvmlProcessInfo_t {
                pid: p.pid,
                usedGpuMemory: p.used.unwrap_or(VALUE_NOT_AVAILABLE),
                gpuInstanceId: u32::MAX,
                computeInstanceId: u32::MAX,
            }
        };
        // SAFETY: `room` entries available, checked above.
        unsafe { *infos.add(i) = entry };
    }
    SUCCESS
}

macro_rules! process_list {
    ($name:ident, $kind:expr, $v3:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            device: nvmlDevice_t,
            count: *mut c_uint,
            infos: *mut nvmlProcessInfo_t,
        ) -> nvmlReturn_t {
            let st = begin!(stringify!($name));
            // SAFETY: forwarded caller pointers.
            unsafe { list(&st, device, $kind, $v3, count, infos) }
        }
    };
}

process_list!(nvmlDeviceGetComputeRunningProcesses_v3, Kind::Compute, true);
process_list!(
    nvmlDeviceGetGraphicsRunningProcesses_v3,
    Kind::Graphics,
    true
);
process_list!(nvmlDeviceGetMPSComputeRunningProcesses_v3, Kind::Mps, true);
process_list!(
    nvmlDeviceGetComputeRunningProcesses_v2,
    Kind::Compute,
    false
);
process_list!(
    nvmlDeviceGetGraphicsRunningProcesses_v2,
    Kind::Graphics,
    false
);
process_list!(nvmlDeviceGetMPSComputeRunningProcesses_v2, Kind::Mps, false);

/// Anything else a caller might try behaves like a driver without that feature.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetPciInfo_v3(
    _device: nvmlDevice_t,
    _pci: *mut c_void,
) -> nvmlReturn_t {
    ERROR_NOT_SUPPORTED
}
