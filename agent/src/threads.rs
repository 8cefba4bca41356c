//! The agent's threads, kept apart from the clones that start containers.
//!
//! libcontainer starts a container by cloning this process. Its intermediate child ends
//! in `std::process::exit`, and Rust's runtime cleanup there takes a process-wide lock:
//! std's record of thread stacks. A thread of this process holds that lock for a moment
//! while it starts and while it ends. A clone made in that moment hands the child the lock
//! held, and the child hangs for good, and the create with it. This was seen once in 400
//! host-mode runs (docs/testing.md). Two rules close the window:
//! - **threads never end**: a job's thread waits for the next job ([`spawn`]), so after
//!   the busiest moment no thread starts or ends again;
//! - **a thread starts only through the gate**: [`clone_section`] waits until no thread
//!   is starting and holds new ones back while it clones.

use std::io;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

type Job = (String, Box<dyn FnOnce() + Send>);

/// Threads starting, and clones under way.
struct GateState {
    starting: usize,
    cloning: usize,
}

struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

static GATE: Gate = Gate {
    state: Mutex::new(GateState {
        starting: 0,
        cloning: 0,
    }),
    changed: Condvar::new(),
};

/// Workers waiting for a job: the sender that reaches each.
static IDLE: Mutex<Vec<Sender<Job>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gate {
    fn wait_while(
        &self,
        mut s: MutexGuard<'static, GateState>,
        busy: impl Fn(&GateState) -> bool,
    ) -> MutexGuard<'static, GateState> {
        while busy(&s) {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s
    }

    /// Count a thread as starting once no clone is under way.
    fn enter_start(&'static self) {
        let mut s = self.wait_while(lock(&self.state), |s| s.cloning > 0);
        s.starting += 1;
    }

    /// The thread runs our code: std's start-up, and its hold on the lock, is behind it.
    fn started(&self) {
        let mut s = lock(&self.state);
        s.starting -= 1;
        if s.starting == 0 {
            self.changed.notify_all();
        }
    }
}

/// Run `clone` (a libcontainer build) while no thread of this process starts or ends.
pub fn clone_section<T>(clone: impl FnOnce() -> T) -> T {
    {
        let mut s = lock(&GATE.state);
        // Hold new threads back first, then let those already starting finish.
        s.cloning += 1;
        drop(GATE.wait_while(s, |s| s.starting > 0));
    }
    let out = clone();
    let mut s = lock(&GATE.state);
    s.cloning -= 1;
    if s.cloning == 0 {
        GATE.changed.notify_all();
    }
    out
}

/// Run `f` on a thread of the agent's: an idle one, or a new one started through the
/// gate. The thread is named `name` while it runs `f`, and waits for the next job after.
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let mut job: Job = (name.to_owned(), Box::new(f));
    loop {
        let Some(worker) = lock(&IDLE).pop() else {
            break;
        };
        match worker.send(job) {
            Ok(()) => return Ok(()),
            // Only a worker that is gone refuses; none ends, but the job is kept anyway.
            Err(e) => job = e.0,
        }
    }
    let (me, rx) = channel::<Job>();
    // Queued before the thread exists: the receiver holds it.
    let _ = me.send(job);
    GATE.enter_start();
    let started = std::thread::Builder::new()
        .name("agent-worker".into())
        .spawn(move || {
            GATE.started();
            // `me` keeps the channel open, so this waits for jobs for ever.
            while let Ok((name, f)) = rx.recv() {
                set_name(&name);
                f();
                set_name("idle");
                lock(&IDLE).push(me.clone());
            }
        });
    if started.is_err() {
        GATE.started();
    }
    started.map(drop)
}

/// The name `ps -T` and gdb show for this thread (15 bytes at most).
fn set_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `buf`.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn finished_jobs_leave_their_threads_for_the_next() {
        let mut tids = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let (tx, rx) = channel();
            // SAFETY: gettid has no arguments and cannot fail.
            spawn("seq", move || tx.send(unsafe { libc::gettid() }).unwrap()).unwrap();
            tids.insert(rx.recv().unwrap());
            // The worker puts itself back after the job; give it that moment.
            std::thread::sleep(Duration::from_millis(2));
        }
        // A thread per job would show 50. Other tests in this binary may take the idle
        // worker in between, each time costing this loop a new one: allow for many.
        assert!(
            tids.len() < 25,
            "50 jobs one after another ran on {} threads",
            tids.len()
        );
    }

    #[test]
    fn jobs_that_block_each_get_a_thread_and_are_named() {
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = channel();
        for i in 0..4 {
            let (release, tx) = (release.clone(), tx.clone());
            spawn(&format!("blocker-{i}"), move || {
                let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
                tx.send(comm.trim().to_owned()).unwrap();
                let (m, cv) = &*release;
                let mut done = lock(m);
                while !*done {
                    done = cv.wait(done).unwrap();
                }
            })
            .unwrap();
        }
        let mut names: Vec<String> = (0..4).map(|_| rx.recv().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["blocker-0", "blocker-1", "blocker-2", "blocker-3"]);
        let (m, cv) = &*release;
        *lock(m) = true;
        cv.notify_all();
    }

    #[test]
    fn a_clone_waits_for_a_starting_thread_and_holds_new_ones_back() {
        // A thread counted as starting holds the clone back.
        GATE.enter_start();
        let (tx, rx) = sync_channel(1);
        let cloner = std::thread::spawn(move || clone_section(|| tx.send(()).unwrap()));
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "cloned while a thread started"
        );
        GATE.started();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the clone never ran");
        cloner.join().unwrap();

        // While a clone runs, a new thread waits for it to end.
        let (in_clone, clone_waits) = sync_channel(0);
        let (let_go, go) = sync_channel::<()>(0);
        let cloner = std::thread::spawn(move || {
            clone_section(|| {
                in_clone.send(()).unwrap();
                go.recv().unwrap();
            })
        });
        clone_waits.recv().unwrap();
        let (tx, rx) = sync_channel(1);
        let starter = std::thread::spawn(move || {
            GATE.enter_start();
            tx.send(()).unwrap();
            GATE.started();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "a thread started mid-clone"
        );
        let_go.send(()).unwrap();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the thread never started");
        cloner.join().unwrap();
        starter.join().unwrap();
    }
}
