//! The ledger's one owner: a thread that holds the [`Ledger`] and runs, in order, what the
//! runtime, the executor and the API ask of it. Nobody else touches the database, so there
//! is no lock to poison; a request that panics fails alone, with an error its caller sees
//! (the executor then leaves the holder undecided and the next sweep asks again), and the
//! ledger goes on serving.
use std::{
    panic::AssertUnwindSafe,
    sync::mpsc::{self, Receiver, Sender},
    thread::JoinHandle,
};

use crate::ledger::{Ledger, LedgerError};

type Request = Box<dyn FnOnce(&Ledger) + Send>;

/// Why a request did not reach the ledger, or failed there.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("the ledger's thread has stopped")]
    Stopped,
    #[error("the ledger request panicked: {0}")]
    Panicked(String),
}

/// A handle on the ledger's thread; clones share it. The thread ends when the last handle
/// is dropped, after what was already asked.
#[derive(Clone)]
pub struct LedgerWriter {
    tx: Sender<Request>,
}

impl LedgerWriter {
    pub fn spawn(ledger: Ledger) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || serve(&ledger, &rx))?;
        Ok((Self { tx }, thread))
    }

    /// Runs `f` on the ledger's thread and waits for its result (for the executor's thread,
    /// and the runtime's writes that must be done before it goes on).
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, WriterError> {
        let (reply, rx) = mpsc::channel();
        self.send(f, move |r| {
            let _ = reply.send(r);
        })?;
        rx.recv().map_err(|_| WriterError::Stopped)?
    }

    /// Runs `f` on the ledger's thread; `then` gets its result there. Does not wait.
    pub fn send<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
        then: impl FnOnce(Result<T, WriterError>) + Send + 'static,
    ) -> Result<(), WriterError> {
        self.tx
            .send(Box::new(move |l: &Ledger| {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(l)));
                then(match r {
                    Ok(r) => r.map_err(WriterError::from),
                    Err(panic) => Err(WriterError::Panicked(panic_text(&panic))),
                });
            }))
            .map_err(|_| WriterError::Stopped)
    }

    /// Runs `f` on the ledger's thread and awaits its result (for the API's tasks).
    pub async fn ask<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, WriterError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(f, move |r| {
            let _ = reply.send(r);
        })?;
        rx.await.map_err(|_| WriterError::Stopped)?
    }
}

fn serve(ledger: &Ledger, rx: &Receiver<Request>) {
    while let Ok(request) = rx.recv() {
        // A `then` that panics must not take the ledger down with it either.
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| request(ledger))) {
            tracing::error!(panic = %panic_text(&panic), "ledger request panicked");
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(name: &str) -> (LedgerWriter, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("reclaimd-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ledger = Ledger::open(&dir.join("ledger.db")).unwrap();
        (LedgerWriter::spawn(ledger).unwrap().0, dir)
    }

    #[test]
    fn a_request_that_panics_fails_alone_and_the_next_one_is_served() {
        let (w, dir) = writer("panic");
        let err = w
            .call(|_| -> Result<(), LedgerError> { panic!("disk on fire") })
            .unwrap_err();
        assert!(
            matches!(&err, WriterError::Panicked(m) if m == "disk on fire"),
            "{err}"
        );
        // What the executor's retry at the next sweep would do: it is served.
        let counts = w.call(|l| l.counts()).unwrap();
        assert!(counts.iter().all(|(_, n)| *n == 0), "{counts:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn requests_run_in_the_order_they_were_sent() {
        let (w, dir) = writer("order");
        let (tx, rx) = mpsc::channel();
        for i in 0..50 {
            let tx = tx.clone();
            w.send(move |_| Ok(i), move |r| tx.send(r.unwrap()).unwrap())
                .unwrap();
        }
        let got: Vec<i32> = rx.iter().take(50).collect();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(dir);
    }
}
