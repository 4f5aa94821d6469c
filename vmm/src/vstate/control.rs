//! Run control shared by the VMM and its vCPU threads: pause, resume, stop, and the
//! first reason the VM ended.
//!
//! Kicking a vCPU out of `KVM_RUN`: the controller sets `kvm_run.immediate_exit` for
//! the vCPU and then sends its thread a real-time signal with an empty handler. If the
//! signal lands while the thread is inside `KVM_RUN`, the ioctl returns `EINTR`; if it
//! lands just before the thread enters, `immediate_exit` makes the next `KVM_RUN`
//! return `EINTR` at once. Either way the thread comes back to its loop, sees the
//! request flag and parks or exits. Only a parked thread clears `immediate_exit`, and
//! it does so under the control lock while no request is pending, so a kick can never
//! be lost.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use twinrun_lock::{CondvarExt, MutexExt};

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::exit::VmExit;
use crate::spin::{spin_until, HANDOFF_SPIN};

/// Offset of the kick signal from `SIGRTMIN`.
const KICK_SIGNAL_OFFSET: i32 = 0;

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Empty: the signal exists only to interrupt KVM_RUN.
}

/// Installs the (process-wide) kick signal handler once.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static RESULT: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    *RESULT.get_or_init(|| register_signal_handler(kick_signal(), kick_handler))
}

/// A second mapping of one vCPU's `kvm_run` page, so another thread can set
/// `immediate_exit` without borrowing the `VcpuFd` the vCPU thread owns. The mapping
/// keeps the vCPU file alive inside the kernel, so it stays valid whatever happens to
/// the `VcpuFd`.
pub struct RunPage {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is shared memory; the only access through it is an atomic byte
// store/load to `immediate_exit`, which is sound from any thread.
unsafe impl Send for RunPage {}
// SAFETY: as above.
unsafe impl Sync for RunPage {}

impl RunPage {
    pub fn map(vcpu: &VcpuFd, len: usize) -> std::io::Result<RunPage> {
        // SAFETY: maps `len` bytes (the size KVM reports for kvm_run) of the vCPU fd,
        // shared, at an address the kernel chooses; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RunPage { base, len })
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        let off = std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit);
        // SAFETY: `off` is inside the mapping (kvm_run is its first bytes), the mapping
        // lives as long as `self`, and `AtomicU8` has the layout of `u8`. The kernel reads
        // the byte with READ_ONCE, so a concurrent atomic store is fine.
        unsafe { &*(self.base.cast::<u8>().add(off) as *const AtomicU8) }
    }

    pub fn set_immediate_exit(&self, on: bool) {
        self.immediate_exit().store(u8::from(on), Ordering::SeqCst);
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping created in `map`, unmapped once.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

struct Kick {
    run: RunPage,
    thread: Option<libc::pthread_t>,
}

impl Kick {
    fn kick(&self) {
        self.run.set_immediate_exit(true);
        if let Some(t) = self.thread {
            // SAFETY: `t` is the id of a vCPU thread that has not been joined yet (kicks are
            // disabled under the lock before the owner joins), so the id is valid.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

/// Work a parked vCPU thread runs on its own `VcpuFd` (state capture), posted by
/// [`RunControl::run_parked`].
type VcpuJob = Box<dyn FnOnce(&mut VcpuFd) + Send>;

#[derive(Default)]
struct State {
    paused: bool,
    stopping: bool,
    /// vCPU threads parked in `park`.
    parked: usize,
    /// vCPU threads that have left their loop for good.
    exited: usize,
    /// First reason the VM ended.
    exit: Option<VmExit>,
    kicks: Vec<Kick>,
    kicks_enabled: bool,
    /// One pending job per vCPU index, run by that vCPU's thread while it is parked.
    jobs: Vec<Option<VcpuJob>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("the VM is not running")]
    NotRunning,
    #[error("vCPUs did not pause within {0:?} ({1} of {2} parked)")]
    PauseTimeout(Duration, usize, usize),
    #[error("the VM is not paused")]
    NotPaused,
    #[error("vCPU {0} did not run the requested work within {1:?} (its thread is gone or stuck)")]
    JobTimeout(usize, Duration),
}

/// What a vCPU thread should do after checking in.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Run,
    Exit,
}

pub struct RunControl {
    state: Mutex<State>,
    /// vCPU threads wait here while paused.
    resume_cv: Condvar,
    /// The controller waits here for parked counts and the VM's end.
    ctl_cv: Condvar,
    /// Set whenever a pause or stop is pending: vCPU threads read it before each
    /// `KVM_RUN` without taking the lock.
    request: AtomicBool,
    /// `parked + exited`, readable without the lock (the controller spins on it and
    /// `host_waits`).
    settled: AtomicUsize,
    /// vCPU threads blocked in a host-side wait ([`host_wait`]): they run no guest
    /// instruction before they check in, so a pause counts them as paused. Changed
    /// without the lock (an HA disk hook enters and leaves a wait around every mirrored
    /// write batch): only a pending pause needs to hear of it (see `host_wait_begin`).
    host_waits: AtomicUsize,
    /// Bumped whenever parked threads have something new to look at (resume, stop, a
    /// job): they spin on it before sleeping on `resume_cv`.
    wake_seq: AtomicU64,
    vcpus: usize,
}

impl RunControl {
    pub fn new(vcpus: usize) -> Self {
        RunControl {
            state: Mutex::new(State::default()),
            resume_cv: Condvar::new(),
            ctl_cv: Condvar::new(),
            request: AtomicBool::new(false),
            settled: AtomicUsize::new(0),
            host_waits: AtomicUsize::new(0),
            wake_seq: AtomicU64::new(0),
            vcpus,
        }
    }

    /// Wakes parked vCPU threads, spinning or sleeping. Called with the lock held.
    fn wake_parked(&self) {
        self.wake_seq.fetch_add(1, Ordering::SeqCst);
        self.resume_cv.notify_all();
    }

    /// Publishes `parked + exited` and wakes the controller. Called with the lock held.
    fn settled_changed(&self, s: &State) {
        self.settled.store(s.parked + s.exited, Ordering::SeqCst);
        self.ctl_cv.notify_all();
    }

    /// vCPUs that count as paused: parked, exited or in a host wait.
    fn paused_count(&self, s: &State) -> usize {
        s.parked + s.exited + self.host_waits.load(Ordering::SeqCst)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking vCPU thread must not wedge the VMM: the state stays consistent
        // because every update is a few plain assignments.
        self.state.lock_or_recover()
    }

    /// Registers vCPU `index`'s kick target. Called by the owner for each vCPU in order
    /// before any thread starts; `set_thread` adds the thread id once it exists.
    pub fn add_vcpu(&self, run: RunPage) {
        self.lock().kicks.push(Kick { run, thread: None });
    }

    pub fn set_thread(&self, index: usize, thread: libc::pthread_t) {
        let mut s = self.lock();
        s.kicks_enabled = true;
        let pending = s.paused || s.stopping;
        if let Some(k) = s.kicks.get_mut(index) {
            k.thread = Some(thread);
            // The thread may already be inside KVM_RUN: it starts running before its
            // spawner gets here. A request made in between (another vCPU ending the VM
            // at once, an early pause) set only `immediate_exit`, which KVM reads on
            // entry, not while a vCPU waiting for INIT/SIPI is blocked in the kernel;
            // the signal is what wakes that one, so send it now.
            if pending {
                k.kick();
            }
        }
    }

    fn kick_all(&self, s: &State) {
        if s.kicks_enabled {
            for k in &s.kicks {
                k.kick();
            }
        }
    }

    /// Fast check for the vCPU loop.
    pub fn pending(&self) -> bool {
        self.request.load(Ordering::SeqCst)
    }

    /// Called by vCPU thread `index` when [`pending`](Self::pending) is set: parks while
    /// the VM is paused, running any job posted for this vCPU on `fd`, and says whether
    /// to keep running.
    pub fn check_in(&self, index: usize, fd: &mut VcpuFd) -> Next {
        let mut s = self.lock();
        if s.paused && !s.stopping {
            s.parked += 1;
            self.settled_changed(&s);
            // Spin once before each sleep (see `crate::spin`): the capture job and the
            // resume usually follow within the pause's few hundred microseconds.
            let mut spun = false;
            while s.paused && !s.stopping {
                if let Some(job) = s.jobs.get_mut(index).and_then(Option::take) {
                    // Without the lock: the job makes ioctls, and other vCPUs' jobs
                    // run at the same time.
                    drop(s);
                    job(fd);
                    s = self.lock();
                    spun = false;
                    continue;
                }
                if !spun {
                    spun = true;
                    let seq = self.wake_seq.load(Ordering::SeqCst);
                    drop(s);
                    spin_until(HANDOFF_SPIN, || self.wake_seq.load(Ordering::SeqCst) != seq);
                    s = self.lock();
                    continue;
                }
                s = self.resume_cv.wait_or_recover(s);
            }
            s.parked -= 1;
            self.settled.store(s.parked + s.exited, Ordering::SeqCst);
        }
        if s.stopping {
            return Next::Exit;
        }
        // No request is pending (we hold the lock and neither flag is set), so clearing
        // immediate_exit cannot swallow a kick.
        if let Some(k) = s.kicks.get(index) {
            k.run.set_immediate_exit(false);
        }
        Next::Run
    }

    /// A vCPU thread enters a host wait. Lock-free unless a pause or stop is pending:
    /// the count is raised first, then `request` read (both SeqCst). A controller that
    /// set `request` and then counts under the lock either sees this count, or set
    /// `request` before this read, and then this thread takes the lock to wake it: it
    /// is either still before its count (and sees ours) or already waiting on `ctl_cv`.
    fn host_wait_begin(&self) {
        self.host_waits.fetch_add(1, Ordering::SeqCst);
        if self.request.load(Ordering::SeqCst) {
            let _s = self.lock();
            self.ctl_cv.notify_all();
        }
    }

    /// A vCPU thread leaves its host wait: lock-free. Nobody waits for the count to
    /// fall; the thread then checks in (it looks at `request` before any `KVM_RUN`), so
    /// under a pause it parks before running a guest instruction.
    fn host_wait_end(&self) {
        self.host_waits.fetch_sub(1, Ordering::SeqCst);
    }

    /// Ends the VM (first reason wins) and kicks every vCPU out.
    pub fn end(&self, exit: VmExit) {
        let mut s = self.lock();
        if s.exit.is_none() {
            s.exit = Some(exit);
        }
        s.stopping = true;
        self.request.store(true, Ordering::SeqCst);
        self.kick_all(&s);
        self.wake_parked();
        self.ctl_cv.notify_all();
    }

    /// A vCPU thread left its loop for good.
    pub fn vcpu_exited(&self) {
        let mut s = self.lock();
        s.exited += 1;
        self.settled_changed(&s);
    }

    /// Pauses every vCPU; returns once all are parked (or blocked in a [`host_wait`],
    /// after which they park before running a guest instruction), with the time it
    /// took, or `NotRunning` when the VM ended meanwhile.
    pub fn pause(&self, limit: Duration) -> Result<Duration, ControlError> {
        let t0 = Instant::now();
        let mut s = self.lock();
        if s.stopping || !s.kicks_enabled {
            return Err(ControlError::NotRunning);
        }
        s.paused = true;
        self.request.store(true, Ordering::SeqCst);
        self.kick_all(&s);
        drop(s);
        spin_until(HANDOFF_SPIN, || {
            self.settled.load(Ordering::SeqCst) + self.host_waits.load(Ordering::SeqCst)
                >= self.vcpus
        });
        let mut s = self.lock();
        let mut rekick = Duration::from_millis(5);
        while self.paused_count(&s) < self.vcpus {
            let elapsed = t0.elapsed();
            if elapsed >= limit {
                let parked = self.paused_count(&s);
                // Leave the VM running rather than half paused.
                s.paused = false;
                self.request.store(s.stopping, Ordering::SeqCst);
                self.wake_parked();
                return Err(ControlError::PauseTimeout(limit, parked, self.vcpus));
            }
            let (g, timeout) = self
                .ctl_cv
                .wait_timeout_or_recover(s, rekick.min(limit - elapsed));
            s = g;
            if timeout.timed_out() {
                // A signal cannot be lost given immediate_exit, but a thread may be busy
                // in a slow device handler; re-kicking is cheap and harmless.
                self.kick_all(&s);
                rekick = rekick.saturating_mul(2);
            }
        }
        if s.stopping {
            // The VM ended while pausing (a vCPU that exits counts as settled): say
            // so now rather than let the caller find out at resume.
            s.paused = false;
            self.wake_parked();
            return Err(ControlError::NotRunning);
        }
        Ok(t0.elapsed())
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        let mut s = self.lock();
        if s.stopping {
            return Err(ControlError::NotRunning);
        }
        s.paused = false;
        self.request.store(false, Ordering::SeqCst);
        self.wake_parked();
        Ok(())
    }

    /// Runs `f` on the thread of vCPU `index` with its `VcpuFd`, while every vCPU is
    /// parked, and returns its result. The vCPU thread owns its fd (it needs `&mut` for
    /// `KVM_RUN`), so this is how state is read from a paused, started VM.
    pub fn run_parked<T, F>(&self, index: usize, f: F, limit: Duration) -> Result<T, ControlError>
    where
        T: Send + 'static,
        F: FnOnce(&mut VcpuFd) -> T + Send + 'static,
    {
        self.submit_parked(index, f)?.wait(limit)
    }

    /// Hands `f` to the thread of vCPU `index` (as [`RunControl::run_parked`]) without
    /// waiting: the caller does other work meanwhile (the VM-wide state, the other
    /// vCPUs' jobs) and collects the result with [`ParkedJob::wait`].
    pub fn submit_parked<T, F>(&self, index: usize, f: F) -> Result<ParkedJob<'_, T>, ControlError>
    where
        T: Send + 'static,
        F: FnOnce(&mut VcpuFd) -> T + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut s = self.lock();
            if !s.paused || s.stopping || s.parked + s.exited < self.vcpus {
                return Err(ControlError::NotPaused);
            }
            if s.jobs.len() <= index {
                s.jobs.resize_with(index + 1, || None);
            }
            s.jobs[index] = Some(Box::new(move |fd: &mut VcpuFd| {
                // The receiver may have given up; nothing to do then.
                let _ = tx.send(f(fd));
            }));
            self.wake_parked();
        }
        Ok(ParkedJob {
            control: self,
            index,
            rx,
        })
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Waits until the VM has ended (up to `timeout` when given); returns the reason.
    pub fn wait_end(&self, timeout: Option<Duration>) -> Option<VmExit> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.lock();
        while s.exit.is_none() {
            match deadline {
                None => s = self.ctl_cv.wait_or_recover(s),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    s = self.ctl_cv.wait_timeout_or_recover(s, d - now).0;
                }
            }
        }
        s.exit.clone()
    }

    /// Stops kicking: called by the owner before it joins the vCPU threads, after which
    /// their thread ids are no longer valid.
    pub fn disable_kicks(&self) {
        self.lock().kicks_enabled = false;
    }
}

/// A job handed to a parked vCPU's thread ([`RunControl::submit_parked`]).
pub struct ParkedJob<'a, T> {
    control: &'a RunControl,
    index: usize,
    rx: mpsc::Receiver<T>,
}

impl<T> ParkedJob<'_, T> {
    /// The job's result, waiting up to `limit` (spinning briefly first: a parked vCPU
    /// thread answers within microseconds, and sleeping would cost a wake-up).
    pub fn wait(self, limit: Duration) -> Result<T, ControlError> {
        let mut early = None;
        spin_until(HANDOFF_SPIN, || match self.rx.try_recv() {
            Ok(v) => {
                early = Some(v);
                true
            }
            Err(mpsc::TryRecvError::Empty) => false,
            Err(mpsc::TryRecvError::Disconnected) => true,
        });
        if let Some(v) = early {
            return Ok(v);
        }
        match self.rx.recv_timeout(limit) {
            Ok(v) => Ok(v),
            Err(_) => {
                // Take the job back if it never ran, so it cannot run later.
                let mut s = self.control.lock();
                if let Some(j) = s.jobs.get_mut(self.index) {
                    *j = None;
                }
                Err(ControlError::JobTimeout(self.index, limit))
            }
        }
    }
}

thread_local! {
    /// The run control of the VM whose vCPU this thread runs (None on other threads).
    static VCPU_CONTROL: std::cell::RefCell<Option<std::sync::Arc<RunControl>>> =
        const { std::cell::RefCell::new(None) };
}

/// Called by a vCPU thread before its loop: [`host_wait`] on it reports to `control`.
pub(crate) fn set_vcpu_control(control: std::sync::Arc<RunControl>) {
    VCPU_CONTROL.with(|c| *c.borrow_mut() = Some(control));
}

/// Runs `f`, a wait that may last long (a disk hook holding a guest write until a
/// peer acknowledges it or a quorum allows it), with the calling vCPU counted as
/// paused meanwhile: a pause need not wait for it. Sound because a vCPU thread
/// runs no guest instruction between `f` and its next check-in (the vCPU loop
/// looks at a pending pause before every `KVM_RUN`, and completes the pending
/// MMIO exit without entering the guest), so a paused guest stays paused; what `f`'s
/// caller finishes afterwards (the device's completion in guest memory) does happen
/// while paused, so a caller that captures guest state while paused must not use it
/// (an FT VM's hooks never wait). Off a vCPU thread it only runs `f`.
///
/// Cheap when no pause is pending (it runs around every HA write batch's wait and
/// completion): two atomic operations and a read of the pause request, no lock, no
/// reference count (the thread-local control is borrowed for the call).
pub fn host_wait<R>(f: impl FnOnce() -> R) -> R {
    VCPU_CONTROL.with(|c| {
        // A shared borrow for the call: only `set_vcpu_control` borrows mutably, once,
        // before the vCPU loop, never from inside a wait.
        let control = c.borrow();
        let Some(control) = control.as_deref() else {
            return f();
        };
        struct Leave<'a>(&'a RunControl);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.host_wait_end();
            }
        }
        control.host_wait_begin();
        let _leave = Leave(control);
        f()
    })
}
