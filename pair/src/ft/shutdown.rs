//! Stopping one end of the pair: a flag the drivers poll and, once a VM runs on its own
//! (after the driver returned or after a failover), that VM's stopper. Set by
//! SIGTERM/SIGINT ([`Shutdown::install`]) or by a caller ([`Shutdown::request`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use twinrun_lock::MutexExt;

use crate::signals;
use log::{info, warn};
use vmm::Stopper;

#[derive(Default)]
struct Inner {
    stop: AtomicBool,
    /// Stopper of the VM that runs undriven; taken under the lock with `stop` so a
    /// signal and a registration cannot miss each other.
    vm: Mutex<Option<Stopper>>,
}

#[derive(Clone, Default)]
pub struct Shutdown(Arc<Inner>);

impl Shutdown {
    /// A shutdown only [`Shutdown::request`] sets (in-process use, tests).
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts the signal thread (signals must be blocked already).
    pub fn install() -> Shutdown {
        let s = Shutdown::new();
        let t = s.clone();
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || match signals::wait() {
                Ok(name) => {
                    info!("received {name}: stopping");
                    t.request();
                }
                Err(e) => warn!("waiting for signals failed: {e}"),
            });
        if let Err(e) = spawned {
            warn!("cannot start the signal thread ({e}); SIGTERM/SIGINT stay blocked");
        }
        s
    }

    /// Stops whatever runs: the drivers see the flag, a VM running on its own is
    /// stopped (at once if one is registered, else when it is).
    pub fn request(&self) {
        let vm = self.0.vm.lock_or_recover();
        self.0.stop.store(true, Ordering::SeqCst);
        if let Some(st) = vm.as_ref() {
            st.stop();
        }
    }

    /// The flag the checkpoint drivers poll.
    pub fn flag(&self) -> &AtomicBool {
        &self.0.stop
    }

    pub fn requested(&self) -> bool {
        self.0.stop.load(Ordering::SeqCst)
    }

    /// From now on a signal stops this VM (at once if one came already).
    pub fn hand_vm(&self, stopper: Stopper) {
        let mut vm = self.0.vm.lock_or_recover();
        if self.0.stop.load(Ordering::SeqCst) {
            stopper.stop();
        }
        *vm = Some(stopper);
    }
}
