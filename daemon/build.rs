//! Builds the eBPF programs (crate `reclaimd-ebpf`) for the bpf target and leaves the object
//! in OUT_DIR, where `daemon::probe` embeds it; and compiles the gRPC API's proto (with the
//! vendored `protoc`, so no system package is needed) and its descriptor set for reflection.
//!
//! One toolchain serves both builds: the programs need `-Z build-std=core`, which the stable
//! toolchain allows once RUSTC_BOOTSTRAP=1 is set. It is set here, in the build script's own
//! environment, so it reaches the inner cargo and nothing else.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    proto()?;
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

fn proto() -> anyhow::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path().context("vendored protoc")?;
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("reclaimd_v1_descriptor.bin"))
        // reclaimctl --json prints the messages as they are.
        .type_attribute(".reclaimd.v1", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/reclaimd/v1/reclaimd.proto"], &["proto"])
        .context("compiling proto/reclaimd/v1/reclaimd.proto")
}
