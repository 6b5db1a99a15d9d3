//! The GPU inventory: who holds GPU memory (NVML) and GPU device handles (procfs), joined
//! per pid into one snapshot.
//!
//! A pid that NVML lists is only a number: it is trusted as a holder only while /proc shows
//! that process holding a device fd (invariant 7), since the driver frees memory on the last
//! close of the device file, not when its creator dies.
pub mod inventory;
mod nvml;
pub mod procfs;
mod walk;

use std::{collections::BTreeMap, path::PathBuf};

pub use self::{
    inventory::{
        Device, DeviceFd, GpuMemory, Holder, HolderStatus, Inventory, NvmlStatus, ProcessKind,
    },
    nvml::{NvmlSource, ProcessEntry, Report},
    procfs::{DeviceFiles, LiveProc, ProcStat, fd_links, in_host_pid_namespace, process_alive},
};

pub use crate::config::DEFAULT_DEVICE_GLOB;

#[derive(Debug, Clone)]
pub struct GpuOptions {
    /// `libnvidia-ml.so.1` to load; `None` for the system's.
    pub nvml_library: Option<PathBuf>,
    /// Open files matching this are GPU device handles.
    pub device_glob: String,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            nvml_library: None,
            device_glob: DEFAULT_DEVICE_GLOB.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("[gpu] device_glob {glob:?} is not a valid glob: {source}")]
    Glob {
        glob: String,
        #[source]
        source: glob::PatternError,
    },
}

/// Takes inventory snapshots. Blocking (NVML calls and a /proc walk): run it off the async
/// executor.
pub struct GpuInventory {
    nvml: NvmlSource,
    files: DeviceFiles,
    walk: walk::FdWalk,
    own_pid: u32,
}

impl GpuInventory {
    pub fn new(opts: &GpuOptions) -> Result<Self, GpuError> {
        let files = DeviceFiles::new(&opts.device_glob).map_err(|source| GpuError::Glob {
            glob: opts.device_glob.clone(),
            source,
        })?;
        Ok(Self {
            nvml: NvmlSource::new(opts.nvml_library.clone()),
            files,
            walk: walk::FdWalk::default(),
            own_pid: std::process::id(),
        })
    }

    pub fn device_files(&self) -> &DeviceFiles {
        &self.files
    }

    /// NVML's view joined with the device files /proc shows held, every process's files read.
    pub fn snapshot(&mut self) -> Inventory {
        self.take(true)
    }

    /// The same, reading the files only of the processes that can have changed since the
    /// last read (`walk`'s comment says which): between resyncs.
    pub fn refresh(&mut self) -> Inventory {
        self.take(false)
    }

    fn take(&mut self, full: bool) -> Inventory {
        let mut inv = self.memory_view();
        let listed: Vec<u32> = inv.holders.keys().copied().collect();
        let fds = self.walk.read(&self.files, full, listed, self.own_pid);
        add_procfs(&mut inv.holders, fds, &self.files);
        inv
    }

    /// What NVML alone says (devices, and the memory of the processes it lists), without
    /// the /proc walk: enough to see a holder's memory come back, at a cost that does not
    /// grow with the host's processes. Holders carry no fds or status.
    pub fn memory_view(&mut self) -> Inventory {
        let t0 = std::time::Instant::now();
        let report = self.nvml.query();
        let nvml_duration = t0.elapsed();
        let mut inv = join_nvml(report);
        inv.nvml_duration = nvml_duration;
        inv
    }
}

/// NVML's memory views shared by the reclaims in progress: one query at a time, and a view
/// taken after the moment a caller names is good for every caller that names an earlier
/// one. Parallel verifications then cost about one NVML pass per poll, not one each (NVML
/// calls are slow on real drivers, and serialised inside them anyway).
pub struct SharedViews {
    inner: std::sync::Mutex<ViewState>,
}

struct ViewState {
    gpu: GpuInventory,
    last: Option<(std::time::Instant, std::sync::Arc<Inventory>)>,
}

impl SharedViews {
    pub fn new(gpu: GpuInventory) -> Self {
        Self {
            inner: std::sync::Mutex::new(ViewState { gpu, last: None }),
        }
    }

    /// A memory view (see [`GpuInventory::memory_view`]) whose NVML pass began at or after
    /// `since`.
    pub fn since(&self, since: std::time::Instant) -> std::sync::Arc<Inventory> {
        // A poisoned lock: a query panicked; the state is a cache, still sound to use.
        let mut st = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, inv)) = &st.last
            && *at >= since
        {
            return inv.clone();
        }
        let at = std::time::Instant::now();
        let inv = std::sync::Arc::new(st.gpu.memory_view());
        st.last = Some((at, inv.clone()));
        inv
    }
}

/// NVML's report as an inventory of devices and listed processes only, with per-device
/// attribution.
fn join_nvml(report: Result<Report, String>) -> Inventory {
    let (nvml, devices, warnings) = match report {
        Ok(r) => (
            NvmlStatus::Available {
                driver_version: r.driver_version,
            },
            r.devices,
            r.warnings,
        ),
        Err(reason) => (NvmlStatus::Unavailable { reason }, Vec::new(), Vec::new()),
    };
    let mut holders: BTreeMap<u32, Holder> = BTreeMap::new();
    let mut devices = attribute(devices, &mut holders);
    attribute_mig_parents(&mut devices);
    Inventory {
        nvml,
        devices,
        holders,
        warnings,
        nvml_duration: std::time::Duration::ZERO,
    }
}

/// Each device's attributed memory (what NVML lists per process) and the rest; each listed
/// process becomes a holder of its memory.
fn attribute(
    devices: Vec<(Device, Vec<ProcessEntry>)>,
    holders: &mut BTreeMap<u32, Holder>,
) -> Vec<Device> {
    let mut out_devices = Vec::with_capacity(devices.len());
    for (mut device, procs) in devices {
        device.attributed_bytes = procs
            .iter()
            .filter_map(|p| p.bytes)
            .fold(0u64, u64::saturating_add);
        device.unattributed_bytes = device.used_bytes.saturating_sub(device.attributed_bytes);
        for p in procs {
            let holder = holders
                .entry(p.pid)
                .or_insert_with(|| Holder::unseen(p.pid));
            holder.memory.push(GpuMemory {
                device_uuid: device.uuid.clone(),
                bytes: p.bytes,
                kind: p.kind,
            });
        }
        out_devices.push(device);
    }
    out_devices
}

/// A MIG parent's memory is its instances' (where the processes are listed) plus what no
/// instance holds: count each byte once, on the instance when there is one.
fn attribute_mig_parents(out_devices: &mut [Device]) {
    let parents: Vec<String> = out_devices
        .iter()
        .filter_map(|d| d.parent_uuid.clone())
        .collect();
    for i in 0..out_devices.len() {
        // Only a physical device is a parent, even where a (broken) driver repeats its UUID
        // on an instance.
        if out_devices[i].parent_uuid.is_some() || !parents.contains(&out_devices[i].uuid) {
            continue;
        }
        let uuid = out_devices[i].uuid.clone();
        let (attributed, used) = out_devices
            .iter()
            .enumerate()
            .filter(|(j, d)| *j != i && d.parent_uuid.as_deref() == Some(uuid.as_str()))
            .fold((0u64, 0u64), |(a, u), (_, d)| {
                (
                    a.saturating_add(d.attributed_bytes),
                    u.saturating_add(d.used_bytes),
                )
            });
        let parent = &mut out_devices[i];
        parent.attributed_bytes = attributed;
        parent.unattributed_bytes = parent.used_bytes.saturating_sub(used);
    }
}

/// What /proc says of each holder: its device files and whether it is alive. Processes
/// holding device files that NVML does not list (e.g. a child that inherited the fds of its
/// dead creator) become holders too.
fn add_procfs(
    holders: &mut BTreeMap<u32, Holder>,
    mut fds: std::collections::HashMap<u32, Vec<DeviceFd>>,
    files: &DeviceFiles,
) {
    for pid in fds.keys() {
        holders.entry(*pid).or_insert_with(|| Holder::unseen(*pid));
    }
    for holder in holders.values_mut() {
        holder.fds = fds.remove(&holder.pid).unwrap_or_default();
        let stat = LiveProc::find(files.proc_root(), holder.pid).map(|p| p.stat);
        holder.status = match (&stat, holder.fds.is_empty()) {
            (None, _) => HolderStatus::NotInProc,
            (Some(_), true) => HolderStatus::NoDeviceFd,
            (Some(_), false) => HolderStatus::Live,
        };
        if let Some(s) = stat {
            holder.comm = Some(s.comm);
            holder.ppid = Some(s.ppid);
            holder.start_time = Some(s.start_time);
        }
    }
}
