//! Relink the programs when bpf-linker changes (it is not a cargo dependency), and ask it to
//! let LLVM expand small `memset`/`memcpy`/`memmove` of known size into stores.
//!
//! By default bpf-linker passes `--bpf-expand-memcpy-in-order`, which leaves every `memset`
//! and `memmove` a call to the linked byte-at-a-time loop (five instructions a byte): an
//! `Event` cleared that way cost 520 instructions, on the path of every change of a watched
//! socket.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
