//! The edge on real files: a writer waits for the acknowledgement, the standby's loss
//! releases it with its blocks marked, the gate holds writers while a resync ends.

use super::*;
use crate::BlockSet;
use std::path::PathBuf;
use std::sync::mpsc;

struct Img(PathBuf);

impl Drop for Img {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn image() -> (Img, PathBuf) {
    let dir =
        std::env::temp_dir().join(format!("twinrun-sync-{}-{}", std::process::id(), rand_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    (Img(dir), p)
}

fn rand_id() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

fn recording() -> (SyncSend, mpsc::Receiver<(HaToStandby, Vec<u8>)>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    (
        Box::new(move |m: &HaToStandby, p: Vec<u8>| {
            tx.lock().unwrap().send((m.clone(), p)).is_ok()
        }),
        rx,
    )
}

#[test]
fn without_a_standby_writes_complete_at_once_and_are_marked() {
    let (_g, p) = image();
    let s = SyncDisks::new(PrimaryDisks::open(&[p]).unwrap());
    s.before_writes(0, &[(8192, 512)]).unwrap();
    s.completed(0, &[(8192, &[7u8; 512])]).unwrap();
    assert!(s.disks.lock(0).bitmap.is_set(2));
}

#[test]
fn a_write_completes_only_once_acknowledged() {
    let (_g, p) = image();
    let s = SyncDisks::new(PrimaryDisks::open(&[p]).unwrap());
    let (send, rx) = recording();
    s.attach(send);
    s.before_writes(0, &[(0, 4)]).unwrap();
    let done = AtomicU64::new(0);
    std::thread::scope(|t| {
        t.spawn(|| {
            s.completed(0, &[(0, b"abcd")]).unwrap();
            done.store(1, Ordering::SeqCst);
        });
        let (m, payload) = rx.recv().unwrap();
        assert_eq!(
            m,
            HaToStandby::Writes {
                seq: 1,
                writes: vec![(0, 0, 4)]
            }
        );
        assert_eq!(payload, b"abcd");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(done.load(Ordering::SeqCst), 0, "completed before the ack");
        s.on_ack(1).unwrap();
    });
    assert_eq!(done.load(Ordering::SeqCst), 1);
    assert_eq!(s.stats.batches_acked.load(Ordering::SeqCst), 1);
}

#[test]
fn losing_the_standby_releases_the_writer_with_its_blocks_marked() {
    let (_g, p) = image();
    let s = SyncDisks::new(PrimaryDisks::open(&[p]).unwrap());
    let (send, rx) = recording();
    s.attach(send);
    s.before_writes(0, &[(65536, 4096)]).unwrap();
    std::thread::scope(|t| {
        let w = t.spawn(|| s.completed(0, &[(65536, &[1u8; 4096])]));
        rx.recv().unwrap();
        s.peer_lost();
        w.join().unwrap().unwrap();
    });
    assert_eq!(s.stats.batches_alone.load(Ordering::SeqCst), 1);
    assert!(s.disks.lock(0).bitmap.is_set(16));
    assert!(!s.attached());
}

#[test]
fn an_ack_out_of_order_is_an_error() {
    let (_g, p) = image();
    let s = SyncDisks::new(PrimaryDisks::open(&[p]).unwrap());
    let (send, _rx) = recording();
    s.attach(send);
    assert!(s.on_ack(3).is_err());
}

#[test]
fn ending_a_resync_waits_for_writes_in_flight_and_sends_the_marked_blocks() {
    let (_g, p) = image();
    std::fs::write(&p, vec![9u8; 1 << 20]).unwrap();
    let s = SyncDisks::new(PrimaryDisks::open(&[p]).unwrap());
    let (send, rx) = recording();
    s.disks
        .perform(&crate::primary::SessionAction::BeginResync, &mut Vec::new());
    s.attach(send);
    // A batch is open (before_writes seen, not completed): the gate waits for it.
    s.before_writes(0, &[(4096, 4096)]).unwrap();
    s.close_gate();
    assert!(!s.drained(), "a batch is open");
    std::thread::scope(|t| {
        let w = t.spawn(|| s.completed(0, &[(4096, &[9u8; 4096])]));
        let (m, _) = rx.recv().unwrap();
        assert!(matches!(m, HaToStandby::Writes { seq: 1, .. }));
        // A new batch waits at the gate.
        let blocked = t.spawn(|| s.before_writes(0, &[(0, 512)]));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!blocked.is_finished(), "a new batch passed the closed gate");
        assert!(!s.drained());
        s.on_ack(1).unwrap();
        w.join().unwrap().unwrap();
        assert!(s.drained());
        let (heads, payload) = s.end_resync().unwrap();
        assert_eq!(heads, vec![(0, 4096, 4096)]);
        assert_eq!(payload, vec![9u8; 4096]);
        assert!(s.send_end_resync(vec![], vec![]));
        let (m, _) = rx.recv().unwrap();
        assert_eq!(
            m,
            HaToStandby::EndResync {
                seq: 2,
                writes: vec![]
            }
        );
        s.on_ack(2).unwrap();
        s.in_sync();
        // The gate is open again: the waiting batch goes on.
        blocked.join().unwrap().unwrap();
    });
    assert_eq!(
        s.disks.lock(0).mode(),
        crate::primary::Mode::Protected,
        "in sync after epoch 0"
    );
}

/// The quorum's rule on the I/O path: the standby vanishes with a write in flight;
/// without leave to act alone (no lease) neither it nor a later write completes; with
/// it, both do. A fenced node fails the held write.
#[test]
fn without_the_quorums_leave_no_write_completes_alone() {
    use std::sync::atomic::AtomicBool;
    let (_g, p) = image();
    let s = SyncDisks::new(PrimaryDisks::open(&[p]).unwrap());
    let lease = Arc::new(AtomicBool::new(false));
    let l = lease.clone();
    s.set_alone_gate(Some(Box::new(move || l.load(Ordering::SeqCst))));
    let (send, rx) = recording();
    s.attach(send);
    s.before_writes(0, &[(65536, 4096)]).unwrap();
    let done = AtomicU64::new(0);
    std::thread::scope(|t| {
        let w = t.spawn(|| {
            let r = s.completed(0, &[(65536, &[1u8; 4096])]);
            done.fetch_add(1, Ordering::SeqCst);
            r
        });
        rx.recv().unwrap();
        // The standby vanishes (never acknowledged).
        s.peer_lost();
        let w2 = t.spawn(|| {
            s.before_writes(0, &[(0, 512)]).unwrap();
            let r = s.completed(0, &[(0, &[2u8; 512])]);
            done.fetch_add(1, Ordering::SeqCst);
            r
        });
        // Whatever the timing, nothing may complete while the gate is shut.
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(10));
            assert_eq!(
                done.load(Ordering::SeqCst),
                0,
                "a write completed with no lease"
            );
        }
        assert_eq!(s.stats.batches_held.load(Ordering::SeqCst), 2);
        // Their blocks are marked for the standby's return all the same.
        assert!(s.disks.lock(0).bitmap.is_set(16) && s.disks.lock(0).bitmap.is_set(0));
        lease.store(true, Ordering::SeqCst);
        w.join().unwrap().unwrap();
        w2.join().unwrap().unwrap();
    });
    assert_eq!(done.load(Ordering::SeqCst), 2);
    // The lease is gone again and the node is then fenced: the held write fails.
    lease.store(false, Ordering::SeqCst);
    std::thread::scope(|t| {
        let w = t.spawn(|| {
            s.before_writes(0, &[(8192, 512)]).unwrap();
            s.completed(0, &[(8192, &[3u8; 512])])
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(!w.is_finished(), "completed with no lease");
        s.fence();
        assert!(
            w.join().unwrap().is_err(),
            "a fenced node completed a write"
        );
    });
}

/// A write held by a shut gate (no lease) is not stuck forever once the standby is
/// back: the resync's drain does not wait for it (its data is on the image, marked),
/// the closing commit carries its block, and once the standby is in sync it completes.
#[test]
fn a_held_write_completes_when_a_returning_standby_is_in_sync() {
    let (_g, p) = image();
    let s = SyncDisks::new(PrimaryDisks::open(std::slice::from_ref(&p)).unwrap());
    s.set_alone_gate(Some(Box::new(|| false)));
    std::thread::scope(|t| {
        // No standby ever attached: the write is alone, its completion held.
        s.before_writes(0, &[(8192, 4096)]).unwrap();
        let w = t.spawn(|| {
            let image = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            image.write_all_at(&[7u8; 4096], 8192).unwrap();
            s.completed(0, &[(8192, &[7u8; 4096])])
        });
        while s.stats.batches_held.load(Ordering::SeqCst) == 0 {
            assert!(!w.is_finished(), "the write was not held");
            std::thread::sleep(Duration::from_millis(2));
        }
        // The standby returns: its resync begins, ends with the marked blocks.
        let (send, rx) = recording();
        s.disks
            .perform(&crate::primary::SessionAction::BeginResync, &mut Vec::new());
        s.attach(send);
        s.close_gate();
        assert!(s.drained(), "the held write kept the resync from draining");
        let (heads, payload) = s.end_resync().unwrap();
        assert!(heads.contains(&(0, 8192, 4096)), "{heads:?}");
        let at = heads
            .iter()
            .take_while(|h| **h != (0, 8192, 4096))
            .map(|h| h.2 as usize)
            .sum::<usize>();
        assert_eq!(&payload[at..at + 4096], &[7u8; 4096]);
        std::thread::sleep(Duration::from_millis(30));
        assert!(!w.is_finished(), "completed before the standby was in sync");
        assert!(s.send_end_resync(heads, payload));
        let (m, _) = rx.recv().unwrap();
        assert!(matches!(m, HaToStandby::EndResync { seq: 1, .. }), "{m:?}");
        s.on_ack(1).unwrap();
        s.in_sync();
        w.join().unwrap().unwrap();
    });
}

/// A standby attached and in sync (resync begun, closing commit acknowledged): the
/// disks are protected, their generation shared with it.
fn in_sync_standby(s: &SyncDisks) -> mpsc::Receiver<(HaToStandby, Vec<u8>)> {
    let (send, rx) = recording();
    s.disks
        .perform(&crate::primary::SessionAction::BeginResync, &mut Vec::new());
    s.attach(send);
    s.close_gate();
    assert!(s.drained());
    let (heads, payload) = s.end_resync().unwrap();
    assert!(s.send_end_resync(heads, payload));
    let (m, _) = rx.recv().unwrap();
    let HaToStandby::EndResync { seq, .. } = m else {
        panic!("{m:?}")
    };
    s.on_ack(seq).unwrap();
    s.in_sync();
    assert_eq!(s.disks.lock(0).mode(), crate::primary::Mode::Protected);
    assert_eq!(s.disks.lock(0).meta.bitmap_base_gen, 0);
    rx
}

/// A stop (requested, or the VM ended) while a writer waits for its acknowledgement:
/// the writer is released with an error at once (the runtime joins the VM's threads
/// only after this) and the disks begin NO generation: the standby (or a standby that
/// took over, whose generation is based on this one) resyncs by a delta.
#[test]
fn stopping_fails_the_waiting_writer_and_begins_no_generation() {
    let (_g, p) = image();
    let s = SyncDisks::new(PrimaryDisks::open(&[p]).unwrap());
    let rx = in_sync_standby(&s);
    let gen = s.disks.lock(0).meta.current_gen;
    s.before_writes(0, &[(65536, 4096)]).unwrap();
    std::thread::scope(|t| {
        let w = t.spawn(|| s.completed(0, &[(65536, &[1u8; 4096])]));
        let (m, _) = rx.recv().unwrap();
        assert!(matches!(m, HaToStandby::Writes { .. }), "{m:?}");
        s.stop();
        assert!(w.join().unwrap().is_err(), "completed without the standby");
    });
    // Later writes fail too, and nothing more is sent.
    s.before_writes(0, &[(0, 512)]).unwrap();
    assert!(s.completed(0, &[(0, &[2u8; 512])]).is_err());
    assert!(rx.try_recv().is_err());
    s.disks.clean_shutdown();
    let d = s.disks.lock(0);
    assert_eq!(d.meta.current_gen, gen, "a stop began a new generation");
    assert_eq!(d.meta.bitmap_base_gen, 0);
    // The unacknowledged write's extent stays marked for the delta.
    assert!(d.bitmap.is_set(16));
    assert!(!d.meta.unclean_primary);
}

/// The stop of the maintenance test's HA primary (SIGTERM): a writer was inside its
/// send (the A-Link full) when the runtime stopped the disks and then cut the send;
/// its failed send must not count as the standby's loss: the stop begins no
/// generation (else finalize finds both replicas on new generations: split brain).
#[test]
fn a_send_cut_by_a_stop_begins_no_generation() {
    let (_g, p) = image();
    let s = SyncDisks::new(PrimaryDisks::open(&[p]).unwrap());
    let (rec, rx) = recording();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (cut_tx, cut_rx) = mpsc::channel::<()>();
    let (entered_tx, cut_rx) = (Mutex::new(entered_tx), Mutex::new(cut_rx));
    let send: SyncSend = Box::new(move |m: &HaToStandby, p: Vec<u8>| {
        if matches!(m, HaToStandby::Writes { .. }) {
            // No room on the link until the runtime cuts the send: it fails.
            entered_tx.lock().unwrap().send(()).unwrap();
            let _ = cut_rx.lock().unwrap().recv();
            return false;
        }
        rec(m, p)
    });
    s.disks
        .perform(&crate::primary::SessionAction::BeginResync, &mut Vec::new());
    s.attach(send);
    s.close_gate();
    let (heads, payload) = s.end_resync().unwrap();
    assert!(s.send_end_resync(heads, payload));
    let (m, _) = rx.recv().unwrap();
    let HaToStandby::EndResync { seq, .. } = m else {
        panic!("{m:?}")
    };
    s.on_ack(seq).unwrap();
    s.in_sync();
    let gen = s.disks.lock(0).meta.current_gen;
    s.before_writes(0, &[(65536, 4096)]).unwrap();
    std::thread::scope(|t| {
        let w = t.spawn(|| s.completed(0, &[(65536, &[1u8; 4096])]));
        entered_rx.recv().unwrap();
        // The runtime's order: the stop first, then the cut.
        s.stop();
        cut_tx.send(()).unwrap();
        assert!(w.join().unwrap().is_err(), "completed without the standby");
    });
    // A loss seen after the stop (the session ending PeerLost as the stop came) is a
    // stop too.
    s.peer_lost();
    s.disks.clean_shutdown();
    let d = s.disks.lock(0);
    assert_eq!(d.meta.current_gen, gen, "a stop began a new generation");
    assert!(d.bitmap.is_set(16), "the unacknowledged write is marked");
}

/// A standby that stays attached (heartbeats fine) but never acknowledges: once the
/// oldest batch waited the bound, the runtime declares it failed; the writer completes
/// alone only under the quorum's gate, its blocks marked, a new generation begun, the
/// reason kept for the status until a standby is in sync again.
#[test]
fn a_standby_that_stops_acknowledging_is_declared_failed_after_the_bound() {
    use std::sync::atomic::AtomicBool;
    let (_g, p) = image();
    let s = SyncDisks::new(PrimaryDisks::open(&[p]).unwrap());
    let lease = Arc::new(AtomicBool::new(false));
    let l = lease.clone();
    s.set_alone_gate(Some(Box::new(move || l.load(Ordering::SeqCst))));
    let rx = in_sync_standby(&s);
    let gen = s.disks.lock(0).meta.current_gen;
    let bound = Duration::from_millis(50);
    assert_eq!(s.ack_overdue(bound), None, "nothing out yet");
    s.before_writes(0, &[(65536, 4096)]).unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|t| {
        let w = t.spawn(|| {
            let r = s.completed(0, &[(65536, &[1u8; 4096])]);
            done.store(true, Ordering::SeqCst);
            r
        });
        let (m, _) = rx.recv().unwrap();
        let HaToStandby::Writes { seq, .. } = m else {
            panic!("{m:?}")
        };
        // Not before the bound (an hour: surely not reached), then surely after it.
        assert_eq!(s.ack_overdue(Duration::from_secs(3600)), None);
        let t0 = std::time::Instant::now();
        let (late, waited) = loop {
            if let Some(o) = s.ack_overdue(bound) {
                break o;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "never overdue");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(late, seq);
        assert!(waited >= bound);
        assert!(!done.load(Ordering::SeqCst), "completed without an ack");
        s.standby_failed("stopped acknowledging".into());
        assert_eq!(s.ack_overdue(bound), None);
        assert_eq!(
            s.disks.standby_failed().as_deref(),
            Some("stopped acknowledging")
        );
        {
            let d = s.disks.lock(0);
            assert_eq!(d.mode(), crate::primary::Mode::Degraded);
            assert_ne!(d.meta.current_gen, gen, "going on alone: a new generation");
            assert_eq!(d.meta.bitmap_base_gen, gen);
            assert!(d.bitmap.is_set(16));
        }
        // Held while the quorum says this node may not act alone.
        std::thread::sleep(Duration::from_millis(30));
        assert!(!done.load(Ordering::SeqCst), "completed with no lease");
        lease.store(true, Ordering::SeqCst);
        w.join().unwrap().unwrap();
        // A late acknowledgement of the failed standby changes nothing.
        s.on_ack(seq).unwrap();
    });
    // It answers again: a new session (a delta: based on the generation it holds)
    // brings it in sync, and the reason is cleared.
    let _rx = in_sync_standby(&s);
    assert_eq!(s.disks.standby_failed(), None);
}
