//! What the daemon tells the world: sandboxes added and removed, their properties
//! changed, containers' exits and OOM kills. The daemon sends an [`Event`]; the D-Bus
//! face (`api::publish`) turns each into objects and signals, one at a time in the
//! order sent. The daemon never calls into the D-Bus face, and another face (a test's,
//! systemd units' later) can take the events instead.

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

use crate::daemon::Sandbox;

/// Which of a sandbox's properties changed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Changed {
    pub state: bool,
    pub containers: bool,
    pub components: bool,
    pub health: bool,
}

pub enum Event {
    /// A sandbox to publish (made, or adopted from a previous bulkheadd).
    SandboxAdded(Arc<Sandbox>),
    /// A sandbox gone, and why.
    SandboxRemoved {
        sb: Arc<Sandbox>,
        reason: String,
    },
    Changed {
        sb: Arc<Sandbox>,
        what: Changed,
    },
    /// A container's init exited with this status (128 + signal when killed).
    ContainerExited {
        sb: Arc<Sandbox>,
        id: String,
        status: i32,
    },
    /// The guest's OOM killer killed a process of this container.
    ContainerOom {
        sb: Arc<Sandbox>,
        id: String,
    },
}

/// An event and the word its publisher sends back once it is out.
pub type Sent = (Event, oneshot::Sender<()>);

/// Where events go. Until a publisher takes them (no bus yet), they are dropped.
#[derive(Default)]
pub struct Events {
    tx: OnceLock<mpsc::UnboundedSender<Sent>>,
}

impl Events {
    /// The one publisher's end; `None` once taken.
    pub fn take(&self) -> Option<mpsc::UnboundedReceiver<Sent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.tx.set(tx).ok().map(|()| rx)
    }

    /// Send `e` and wait until it is published: a sandbox's object is on the bus before
    /// `CreateSandbox` answers, and signals keep the order of the changes.
    pub async fn emit(&self, e: Event) {
        let Some(tx) = self.tx.get() else { return };
        let (ack, published) = oneshot::channel();
        if tx.send((e, ack)).is_ok() {
            let _ = published.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn events_wait_for_their_publisher_and_none_go_without_one() {
        let ev = Events::default();
        // No publisher: emitting returns at once.
        ev.emit(Event::ContainerOom {
            sb: crate::daemon::Sandbox::for_tests("a"),
            id: "c".into(),
        })
        .await;
        let mut rx = ev.take().expect("the first take");
        assert!(ev.take().is_none(), "one publisher only");
        let publisher = tokio::spawn(async move {
            let mut seen = vec![];
            while let Some((e, ack)) = rx.recv().await {
                if let Event::ContainerExited { status, .. } = e {
                    seen.push(status);
                }
                let _ = ack.send(());
                if seen.len() == 3 {
                    break;
                }
            }
            seen
        });
        for status in [1, 2, 3] {
            ev.emit(Event::ContainerExited {
                sb: crate::daemon::Sandbox::for_tests("a"),
                id: "c".into(),
                status,
            })
            .await;
        }
        assert_eq!(publisher.await.unwrap(), vec![1, 2, 3]);
    }
}
