//! Reclaiming orphans: the policy screen (what may never be signalled), the breaker, the
//! optional hook, and the executor that signals through a pidfd and verifies.
pub mod breaker;
pub mod executor;
pub mod hook;
pub mod policy;
pub mod pool;

pub use self::{
    executor::{Done, Executor, Job, Manual},
    policy::{Refusal, Untouchable},
};
