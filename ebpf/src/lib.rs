//! Exists so the daemon can list this crate as a build-dependency: cargo then rebuilds the
//! daemon whenever the programs change. The programs themselves are in `main.rs`.
#![no_std]
