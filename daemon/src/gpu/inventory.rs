//! One snapshot of who holds GPU memory and device handles.
use std::{collections::BTreeMap, path::PathBuf};

use serde::Serialize;

/// A GPU (or a MIG instance of one) as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// Device file `/dev/nvidia<minor>`, when the driver says.
    pub minor: Option<u32>,
    pub total_bytes: u64,
    pub used_bytes: u64,
    /// Σ of the memory NVML attributes to listed processes (known amounts only).
    pub attributed_bytes: u64,
    /// `used − attributed`: memory no listed process accounts for. Reported, never acted on.
    pub unattributed_bytes: u64,
    /// For a MIG instance, the UUID of its GPU.
    pub parent_uuid: Option<String>,
}

/// Which NVML process list a process came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessKind {
    Compute,
    Graphics,
    /// An MPS client; its memory belongs to the MPS server.
    Mps,
}

/// GPU memory NVML attributes to a process on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuMemory {
    pub device_uuid: String,
    /// `None` when the driver reports "not available": unknown, never zero.
    pub bytes: Option<u64>,
    pub kind: ProcessKind,
}

/// An open file descriptor on a GPU device file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceFd {
    pub fd: u32,
    pub path: PathBuf,
    /// `N` of `/dev/nvidiaN`; `None` for shared files such as nvidiactl and nvidia-uvm.
    pub minor: Option<u32>,
}

/// What may be concluded about a pid NVML or procfs named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HolderStatus {
    /// Alive and holding at least one device fd.
    Live,
    /// NVML lists it but /proc has no such process: another pid namespace, or gone.
    NotInProc,
    /// NVML lists it and it is alive but holds no device fd: NVML may still list a dead
    /// creator whose child holds the memory, and the number may now be another process.
    NoDeviceFd,
}

impl HolderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HolderStatus::Live => "live",
            HolderStatus::NotInProc => "not-in-proc",
            HolderStatus::NoDeviceFd => "no-device-fd",
        }
    }

    /// Only a live holder with a device fd is ever a candidate for action (invariant 7).
    pub fn actionable(self) -> bool {
        self == Self::Live
    }
}

/// A process that holds GPU memory or a device handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub pid: u32,
    pub comm: Option<String>,
    pub ppid: Option<u32>,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22): with the pid,
    /// identifies the process across pid reuse.
    pub start_time: Option<u64>,
    pub memory: Vec<GpuMemory>,
    pub fds: Vec<DeviceFd>,
    pub status: HolderStatus,
}

impl Holder {
    /// A pid named by NVML or procfs, before /proc has been read for it.
    pub fn unseen(pid: u32) -> Self {
        Self {
            pid,
            comm: None,
            ppid: None,
            start_time: None,
            memory: Vec::new(),
            fds: Vec::new(),
            status: HolderStatus::NotInProc,
        }
    }

    /// Known bytes over all devices.
    pub fn known_bytes(&self) -> u64 {
        // Saturating: a broken driver may report absurd sizes.
        self.memory
            .iter()
            .filter_map(|m| m.bytes)
            .fold(0, u64::saturating_add)
    }

    /// Whether some of its memory is of unknown size.
    pub fn bytes_unknown(&self) -> bool {
        self.memory.iter().any(|m| m.bytes.is_none())
    }
}

/// Whether NVML answered this snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum NvmlStatus {
    Available { driver_version: String },
    Unavailable { reason: String },
}

/// Devices and holders at one moment. Holders are keyed by pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inventory {
    pub nvml: NvmlStatus,
    pub devices: Vec<Device>,
    pub holders: BTreeMap<u32, Holder>,
    /// Driver answers that were not trusted (malformed entries, fallbacks taken).
    pub warnings: Vec<String>,
    /// How long the NVML queries took (0 while NVML is backing off).
    #[serde(skip)]
    pub nvml_duration: std::time::Duration,
}

impl Inventory {
    pub fn device(&self, uuid: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.uuid == uuid)
    }
}
