//! `reclaimd inventory`: one GPU inventory snapshot, for operators and scripts.
use std::io::{self, Write};

use crate::{
    gpu::{GpuInventory, GpuOptions, Inventory, NvmlStatus, in_host_pid_namespace},
    human,
};

pub fn run(opts: &GpuOptions, json: bool) -> anyhow::Result<()> {
    if in_host_pid_namespace() == Some(false) {
        tracing::warn!(
            "not in the host pid namespace: NVML reports pids of the host (older drivers) or \
             skips what it cannot map; run reclaimd with hostPID"
        );
    }
    let mut inv = GpuInventory::new(opts)?;
    let snapshot = inv.snapshot();
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &snapshot)?;
        writeln!(out)?;
    } else {
        write_text(&mut out, &snapshot)?;
    }
    out.flush()?;
    Ok(())
}

fn write_text(out: &mut impl Write, inv: &Inventory) -> io::Result<()> {
    match &inv.nvml {
        NvmlStatus::Available { driver_version } => {
            writeln!(out, "NVML: available, driver {driver_version}")?
        }
        NvmlStatus::Unavailable { reason } => writeln!(out, "NVML: unavailable: {reason}")?,
    }
    if !inv.devices.is_empty() {
        writeln!(
            out,
            "\n{:<4} {:<42} {:<24} {:>20} {:>12} {:>12}",
            "IDX", "UUID", "NAME", "USED / TOTAL", "ATTRIBUTED", "UNATTRIB."
        )?;
    }
    for d in &inv.devices {
        // A MIG instance shows as GPU:instance, under its GPU.
        let index = match d.parent_uuid.as_deref().and_then(|p| inv.device(p)) {
            Some(parent) => format!("{}:{}", parent.index, d.index),
            None => d.index.to_string(),
        };
        writeln!(
            out,
            "{:<4} {:<42} {:<24} {:>20} {:>12} {:>12}",
            index,
            d.uuid,
            d.name,
            human::used_of(d.used_bytes, d.total_bytes),
            human::bytes(d.attributed_bytes),
            human::bytes(d.unattributed_bytes),
        )?;
    }
    writeln!(
        out,
        "\n{:>8} {:<16} {:<12} {:>12}  DEVICE FILES",
        "PID", "COMM", "STATUS", "GPU MEMORY"
    )?;
    for h in inv.holders.values() {
        let status = h.status.as_str();
        let mem = if h.memory.is_empty() {
            "-".to_owned()
        } else if h.bytes_unknown() {
            format!("{}+?", human::bytes(h.known_bytes()))
        } else {
            human::bytes(h.known_bytes())
        };
        let files: Vec<String> = h.fds.iter().map(|f| f.path.display().to_string()).collect();
        writeln!(
            out,
            "{:>8} {:<16} {:<12} {:>12}  {}",
            h.pid,
            h.comm.as_deref().unwrap_or("?"),
            status,
            mem,
            files.join(",")
        )?;
    }
    for w in &inv.warnings {
        writeln!(out, "warning: {w}")?;
    }
    Ok(())
}
