//! NVML through nvml-wrapper: devices, memory, and per-process memory, with the driver's
//! known faults handled, and a backoff when NVML is missing or failing.
use std::{
    ffi::OsStr,
    path::PathBuf,
    time::{Duration, Instant},
};

use nvml_wrapper::{
    Device as NvmlDevice, Nvml, enums::device::UsedGpuMemory, error::NvmlError,
    struct_wrappers::device::ProcessInfo,
};

use super::inventory::{Device, ProcessKind};

/// One process entry of one device's lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEntry {
    pub pid: u32,
    pub bytes: Option<u64>,
    pub kind: ProcessKind,
}

/// What NVML said in one pass.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub driver_version: String,
    pub devices: Vec<(Device, Vec<ProcessEntry>)>,
    pub warnings: Vec<String>,
}

const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// The NVML handle, re-initialised with exponential backoff after failures. Failures are
/// logged when NVML goes away and when it comes back, not on every retry.
pub struct NvmlSource {
    library: Option<PathBuf>,
    nvml: Option<Nvml>,
    retry_at: Instant,
    retry_delay: Duration,
    reason: Option<String>,
}

impl NvmlSource {
    /// `library`: the path of `libnvidia-ml.so.1`; `None` for the system's.
    pub fn new(library: Option<PathBuf>) -> Self {
        Self {
            library,
            nvml: None,
            retry_at: Instant::now(),
            retry_delay: FIRST_RETRY,
            reason: None,
        }
    }

    fn init(&self) -> Result<Nvml, NvmlError> {
        let mut b = Nvml::builder();
        if let Some(lib) = &self.library {
            b.lib_path(OsStr::new(lib.as_os_str()));
        }
        b.init()
    }

    fn fail(&mut self, what: String) {
        // Dropping the handle shuts NVML down; the next query starts afresh.
        self.nvml = None;
        if self.reason.as_deref() != Some(what.as_str()) {
            tracing::warn!(reason = %what, retry_in = ?self.retry_delay,
                "NVML unavailable: GPU state unknown, session tracking goes on");
        }
        self.reason = Some(what);
        self.retry_at = Instant::now() + self.retry_delay;
        self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY);
    }

    /// Queries every device, or says why NVML cannot be asked now.
    pub fn query(&mut self) -> Result<Report, String> {
        if self.nvml.is_none() {
            if Instant::now() < self.retry_at {
                return Err(self.reason.clone().unwrap_or_default());
            }
            match self.init() {
                Ok(nvml) => self.nvml = Some(nvml),
                Err(e) => {
                    let what = self.describe(&e);
                    self.fail(what.clone());
                    return Err(what);
                }
            }
        }
        let Some(nvml) = self.nvml.as_ref() else {
            return Err("NVML not initialised".to_owned());
        };
        match query_all(nvml) {
            Ok(report) => {
                if self.reason.take().is_some() {
                    tracing::info!(devices = report.devices.len(), "NVML available again");
                }
                self.retry_delay = FIRST_RETRY;
                Ok(report)
            }
            Err(e) => {
                let what = self.describe(&e);
                self.fail(what.clone());
                Err(what)
            }
        }
    }

    fn describe(&self, e: &NvmlError) -> String {
        let lib = self
            .library
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "libnvidia-ml.so.1".to_owned());
        match e {
            NvmlError::LibloadingError(inner) => {
                format!("cannot load {lib} (no NVIDIA driver?): {inner}")
            }
            NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded".to_owned(),
            NvmlError::GpuLost => "a GPU has fallen off the bus".to_owned(),
            other => format!("NVML error: {other}"),
        }
    }
}

fn query_all(nvml: &Nvml) -> Result<Report, NvmlError> {
    let mut report = Report {
        driver_version: nvml.sys_driver_version().unwrap_or_default(),
        ..Report::default()
    };
    for index in 0..nvml.device_count()? {
        let dev = nvml.device_by_index(index)?;
        let device = describe(&dev, index, None)?;
        // MIG instances carry their own memory and processes; the parent's aggregate
        // per-process data needs privileges and would double count.
        let migs = mig_instances(&dev);
        if migs.is_empty() {
            let procs = processes(&dev, &device, &mut report.warnings)?;
            report.devices.push((device, procs));
        } else {
            let parent = device.uuid.clone();
            report.devices.push((device, Vec::new()));
            for (i, mig) in &migs {
                let d = describe(mig, *i, Some(parent.clone()))?;
                let procs = processes(mig, &d, &mut report.warnings)?;
                report.devices.push((d, procs));
            }
        }
    }
    Ok(report)
}

fn describe(dev: &NvmlDevice, index: u32, parent: Option<String>) -> Result<Device, NvmlError> {
    let mem = dev.memory_info()?;
    Ok(Device {
        index,
        uuid: dev.uuid()?,
        name: dev.name().unwrap_or_default(),
        minor: dev.minor_number().ok(),
        total_bytes: mem.total,
        used_bytes: mem.used,
        attributed_bytes: 0,
        unattributed_bytes: 0,
        parent_uuid: parent,
    })
}

/// The MIG instances of a GPU in MIG mode, with their indexes (slots may be empty).
fn mig_instances<'n>(dev: &NvmlDevice<'n>) -> Vec<(u32, NvmlDevice<'n>)> {
    match dev.mig_mode() {
        Ok(mode) if mode.current == 1 => {}
        _ => return Vec::new(),
    }
    let count = dev.mig_device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| dev.mig_device_by_index(i).ok().map(|m| (i, m)))
        .collect()
}

/// A list is trusted only if every entry is plausible: garbage from a driver that wrote
/// entries of another size shows as pid 0 or more memory than the device has.
fn plausible(list: &[ProcessInfo], total: u64) -> bool {
    list.iter().all(|p| {
        p.pid != 0
            && match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => b <= total,
                UsedGpuMemory::Unavailable => true,
            }
    })
}

/// The symbol is missing or the driver lacks the call: try the older one.
fn missing(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound
    )
}

/// One list: the `_v3` call, or the `_v2` one where `_v3` is missing or returned garbage.
fn one_list(
    kind: ProcessKind,
    device: &Device,
    v3: Result<Vec<ProcessInfo>, NvmlError>,
    v2: impl FnOnce() -> Option<Result<Vec<ProcessInfo>, NvmlError>>,
    warnings: &mut Vec<String>,
) -> Result<Vec<ProcessInfo>, NvmlError> {
    let why = match v3 {
        Ok(list) if plausible(&list, device.total_bytes) => return Ok(list),
        Ok(_) => "malformed entries",
        Err(e) if missing(&e) => "call missing",
        Err(NvmlError::NotSupported) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let msg = match v2() {
        Some(Ok(list)) if plausible(&list, device.total_bytes) => {
            warnings.push(format!(
                "{}: {kind:?} process list _v3 {why}; used _v2",
                device.uuid
            ));
            return Ok(list);
        }
        Some(Ok(_)) => format!("{kind:?} process list _v3 {why}, _v2 malformed too; ignored"),
        Some(Err(e)) => format!("{kind:?} process list _v3 {why}, _v2 failed ({e}); ignored"),
        None => format!("{kind:?} process list _v3 {why}, no older call; ignored"),
    };
    tracing::warn!(device = %device.uuid, "{msg}");
    warnings.push(format!("{}: {msg}", device.uuid));
    Ok(Vec::new())
}

fn processes(
    dev: &NvmlDevice,
    device: &Device,
    warnings: &mut Vec<String>,
) -> Result<Vec<ProcessEntry>, NvmlError> {
    let lists = [
        (
            ProcessKind::Compute,
            one_list(
                ProcessKind::Compute,
                device,
                dev.running_compute_processes(),
                || Some(dev.running_compute_processes_v2()),
                warnings,
            )?,
        ),
        (
            ProcessKind::Graphics,
            one_list(
                ProcessKind::Graphics,
                device,
                dev.running_graphics_processes(),
                || Some(dev.running_graphics_processes_v2()),
                warnings,
            )?,
        ),
        (
            ProcessKind::Mps,
            one_list(
                ProcessKind::Mps,
                device,
                dev.mps_running_compute_processes(),
                || None,
                warnings,
            )?,
        ),
    ];
    Ok(lists
        .into_iter()
        .flat_map(|(kind, list)| {
            list.into_iter().map(move |p| ProcessEntry {
                pid: p.pid,
                bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                },
                kind,
            })
        })
        .collect())
}
