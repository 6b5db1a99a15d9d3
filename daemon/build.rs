//! Builds the eBPF programs (crate `reclaimd-ebpf`) for the bpf target and leaves the object
//! in OUT_DIR, where `daemon::probe` embeds it.
//!
//! One toolchain serves both builds: the programs need `-Z build-std=core`, which the stable
//! toolchain allows once RUSTC_BOOTSTRAP=1 is set. It is set here, in the build script's own
//! environment, so it reaches the inner cargo and nothing else.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "reclaimd-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF programs failed; run `cargo xtask setup` (installs rust-src and \
         bpf-linker), then build again",
    )
}
