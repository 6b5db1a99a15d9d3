//! reclaimd: gets back GPU memory left behind by dead sessions.
//!
//! See DESIGN.md for the architecture; data moves one way, kernel → probe → model →
//! reconcile → reclaim → ledger/telemetry.
pub mod clock;
pub mod event;
pub mod gpu;
pub mod human;
pub mod inventory_cmd;
pub mod probe;
pub mod trace;
