//! reclaimd: gets back GPU memory left behind by dead sessions.
//!
//! See DESIGN.md for the architecture; data moves one way, kernel → probe → model →
//! reconcile → reclaim → ledger/telemetry.
pub mod api;
pub mod clock;
pub mod config;
pub mod conn_tally;
pub mod engine;
pub mod event;
pub mod gpu;
pub mod heartbeat;
pub mod human;
pub mod ids;
pub mod inventory_cmd;
pub mod kube;
pub mod ledger;
pub mod ledger_writer;
pub mod model;
pub mod probe;
pub mod reclaim;
pub mod reconcile;
pub mod record;
pub mod runtime;
pub mod scan;
pub mod sockdiag;
pub mod telemetry;
pub mod trace;
