//! Reaps every child and hands exit statuses to the threads that wait for
//! them.
//!
//! As PID 1 the agent inherits every orphan in the guest, and a zombie that
//! nobody waits for stays forever. One thread calls `waitpid(-1)` for all
//! children; a status whose pid an exec thread registered is kept for that
//! thread, every other one (an orphan) is dropped.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

#[derive(Default)]
struct State {
    watched: HashSet<libc::pid_t>,
    exited: HashMap<libc::pid_t, libc::c_int>,
    /// Bumped on every spawn so an idle reaper wakes up.
    spawns: u64,
}

struct Reaper {
    state: Mutex<State>,
    changed: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| Reaper {
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
    })
}

pub fn start() {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(reap_forever)
        .expect("spawning the reaper thread failed");
}

fn reap_forever() {
    let reaper = reaper();
    loop {
        // Read the spawn count before waiting: a spawn between an ECHILD
        // and the sleep below then changes the count, so its child is not
        // left unreaped until some later spawn.
        let seen = reaper.state.lock().unwrap().spawns;
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            let mut state = reaper.state.lock().unwrap();
            if state.watched.remove(&pid) {
                state.exited.insert(pid, status);
                reaper.changed.notify_all();
            }
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => {}
            // No children: sleep until the next spawn.
            _ => {
                let state = reaper.state.lock().unwrap();
                let _unused = reaper
                    .changed
                    .wait_while(state, |s| s.spawns == seen)
                    .unwrap();
            }
        }
    }
}

/// A lock on the reaper's state, held across a spawn so the new pid is
/// registered before the reaper can see it exit.
pub struct SpawnGuard(MutexGuard<'static, State>);

pub fn lock_for_spawn() -> SpawnGuard {
    SpawnGuard(reaper().state.lock().unwrap())
}

impl SpawnGuard {
    pub fn watch(mut self, pid: libc::pid_t) {
        self.0.watched.insert(pid);
        self.0.spawns += 1;
        drop(self);
        reaper().changed.notify_all();
    }
}

/// Waits for a watched child until `deadline`; returns its raw wait status,
/// or `None` when the deadline passed first.
pub fn wait(pid: libc::pid_t, deadline: Option<Instant>) -> Option<libc::c_int> {
    let reaper = reaper();
    let mut state = reaper.state.lock().unwrap();
    loop {
        if let Some(status) = state.exited.remove(&pid) {
            return Some(status);
        }
        state = match deadline {
            None => reaper.changed.wait(state).unwrap(),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return None;
                }
                reaper
                    .changed
                    .wait_timeout(state, deadline - now)
                    .unwrap()
                    .0
            }
        };
    }
}
