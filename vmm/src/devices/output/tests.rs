use super::*;
use crate::config::ConsoleConfig;

/// Records every release call.
#[derive(Default)]
struct Rec {
    calls: Vec<Vec<Vec<u8>>>,
}

impl ReleaseSink for Arc<Mutex<Rec>> {
    fn release(&mut self, items: &[&[u8]]) -> u64 {
        lock(self)
            .calls
            .push(items.iter().map(|i| i.to_vec()).collect());
        0
    }
}

fn stream(gate: &Arc<OutputGate>, kind: StreamKind) -> (GatePort, Arc<Mutex<Rec>>) {
    let rec = Arc::new(Mutex::new(Rec::default()));
    let sink: Arc<Mutex<dyn ReleaseSink>> = Arc::new(Mutex::new(rec.clone()));
    (gate.register(kind, sink).unwrap(), rec)
}

fn flat(rec: &Arc<Mutex<Rec>>) -> Vec<u8> {
    lock(rec)
        .calls
        .iter()
        .flatten()
        .flatten()
        .copied()
        .collect()
}

fn frames(rec: &Arc<Mutex<Rec>>) -> Vec<Vec<u8>> {
    lock(rec).calls.iter().flatten().cloned().collect()
}

#[test]
fn disabled_gate_hands_output_back() {
    let gate = OutputGate::new();
    let (port, rec) = stream(&gate, StreamKind::Console);
    assert!(port.has_room());
    assert_eq!(port.hold(b"x".to_vec(), 0), Err(b"x".to_vec()));
    assert!(!port.hold_slice(b"y"));
    assert_eq!(gate.held_bytes(), 0);
    assert_eq!(gate.close_epoch(1), Err(OutputError::NotEnabled));
    assert!(lock(&rec).calls.is_empty());
}

#[test]
fn release_follows_closed_epochs_in_order() {
    let gate = OutputGate::new();
    let (con, crec) = stream(&gate, StreamKind::Console);
    let (net, nrec) = stream(&gate, StreamKind::Net);
    gate.enable();
    assert!(!gate.output_waiting());
    con.hold(b"a1 ".to_vec(), 0).unwrap();
    net.hold(b"HDRf1".to_vec(), 3).unwrap();
    assert!(con.hold_slice(b"a2 "));
    assert!(gate.output_waiting());
    let s = gate.close_epoch(5).unwrap();
    assert_eq!(
        (
            s.epoch,
            s.console_bytes,
            s.net_frames,
            s.net_bytes,
            s.held_bytes
        ),
        (5, 6, 1, 2, 8)
    );
    assert!(!gate.output_waiting());
    // An epoch without output.
    gate.close_epoch(6).unwrap();
    con.hold(b"b1 ".to_vec(), 0).unwrap();
    net.hold(b"HDRf2".to_vec(), 3).unwrap();
    net.hold(b"HDRf3".to_vec(), 3).unwrap();
    gate.close_epoch(7).unwrap();
    con.hold(b"open".to_vec(), 0).unwrap();
    assert_eq!(
        gate.close_epoch(7),
        Err(OutputError::EpochOrder { epoch: 7, last: 7 })
    );
    assert_eq!(gate.held_bytes(), 8 + 7 + 4);

    let r = gate.release(4);
    assert_eq!(r.epochs, 0);
    assert!(flat(&crec).is_empty());
    let r = gate.release(6);
    assert_eq!(
        (r.epochs, r.console_bytes, r.net_frames, r.net_bytes),
        (1, 6, 1, 2)
    );
    assert_eq!(flat(&crec), b"a1 a2 ");
    assert_eq!(frames(&nrec), vec![b"f1".to_vec()]);
    // Coalesced: one segment for the two console writes of the epoch.
    assert_eq!(lock(&crec).calls[0].len(), 1);
    let r = gate.release(100);
    assert_eq!(
        (r.epochs, r.console_bytes, r.net_frames, r.held_bytes),
        (1, 3, 2, 4)
    );
    assert_eq!(flat(&crec), b"a1 a2 b1 ");
    assert_eq!(
        frames(&nrec),
        vec![b"f1".to_vec(), b"f2".to_vec(), b"f3".to_vec()]
    );
    // The open epoch's output left only once closed and released.
    gate.close_epoch(8).unwrap();
    gate.release(8);
    assert_eq!(flat(&crec), b"a1 a2 b1 open");
    assert_eq!(gate.held_bytes(), 0);
}

#[test]
fn discard_drops_uncommitted_epochs_and_frees_their_numbers() {
    let gate = OutputGate::new();
    let (con, rec) = stream(&gate, StreamKind::Console);
    gate.enable();
    con.hold(b"1".to_vec(), 0).unwrap();
    gate.close_epoch(1).unwrap();
    con.hold(b"2".to_vec(), 0).unwrap();
    gate.close_epoch(2).unwrap();
    con.hold(b"3".to_vec(), 0).unwrap();
    gate.close_epoch(3).unwrap();
    con.hold(b"open".to_vec(), 0).unwrap();
    gate.discard_after(1);
    assert_eq!(gate.held_bytes(), 1);
    assert_eq!(gate.last_closed(), Some(1));
    assert!(!gate.output_waiting());
    // New output after the discard is a new epoch, which may reuse number 2.
    con.hold(b"N".to_vec(), 0).unwrap();
    gate.close_epoch(2).unwrap();
    gate.release(10);
    assert_eq!(flat(&rec), b"1N");
    // Discarding at or above the last close keeps closed epochs.
    con.hold(b"x".to_vec(), 0).unwrap();
    gate.close_epoch(3).unwrap();
    con.hold(b"y".to_vec(), 0).unwrap();
    gate.discard_after(3);
    gate.release(3);
    assert_eq!(flat(&rec), b"1Nx");
    assert_eq!(gate.held_bytes(), 0);
}

#[test]
fn limit_stalls_and_release_wakes() {
    let gate = OutputGate::new();
    let (con, _rec) = stream(&gate, StreamKind::Console);
    let (net, _nrec) = stream(&gate, StreamKind::Net);
    gate.enable();
    gate.set_limit(10);
    assert!(con.has_room());
    con.hold(vec![b'a'; 8], 0).unwrap();
    assert!(net.has_room());
    net.hold(vec![0; 20], 12).unwrap();
    assert_eq!(gate.held_bytes(), 16);
    assert!(!con.has_room());
    assert!(!net.has_room());
    // No wake while still full.
    assert!(con.wake.read().is_err());
    gate.close_epoch(1).unwrap();
    gate.release(1);
    assert_eq!(con.wake.read().unwrap(), 1);
    assert_eq!(net.wake.read().unwrap(), 1);
    assert!(con.has_room());
    // Discard wakes too.
    con.hold(vec![b'b'; 12], 0).unwrap();
    assert!(!net.has_room());
    gate.discard_after(1);
    assert_eq!(net.wake.read().unwrap(), 1);
    assert!(con.wake.read().is_err(), "only stalled streams are woken");
}

#[test]
fn disable_releases_everything_then_lets_output_through() {
    let gate = OutputGate::new();
    let (con, rec) = stream(&gate, StreamKind::Console);
    gate.enable();
    con.hold(b"a".to_vec(), 0).unwrap();
    gate.close_epoch(1).unwrap();
    con.hold(b"b".to_vec(), 0).unwrap();
    let r = gate.disable();
    assert_eq!(r.console_bytes, 2);
    assert_eq!(flat(&rec), b"ab");
    assert_eq!(gate.held_bytes(), 0);
    assert_eq!(con.hold(b"c".to_vec(), 0), Err(b"c".to_vec()));
}

#[test]
fn console_release_writes_a_file_sink_with_writev() {
    let path = std::env::temp_dir().join(format!("twinrun-gate-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sink = Arc::new(Mutex::new(
        ConsoleSink::new(&ConsoleConfig::File { path: path.clone() }).unwrap(),
    ));
    let gate = OutputGate::new();
    let rs: Arc<Mutex<dyn ReleaseSink>> = Arc::new(Mutex::new(ConsoleRelease(sink.clone())));
    let con = gate.register(StreamKind::Console, rs).unwrap();
    gate.enable();
    let mut want = Vec::new();
    // More than one coalescing chunk, and chains of odd sizes.
    for i in 0..20_000u32 {
        let line = format!("L {i}\n").into_bytes();
        want.extend_from_slice(&line);
        con.hold(line, 0).unwrap();
    }
    gate.close_epoch(0).unwrap();
    assert!(std::fs::read(&path).unwrap().is_empty());
    let r = gate.release(0);
    assert_eq!(r.console_bytes, want.len() as u64);
    let got = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(got, want);
}

#[test]
fn uart_bytes_are_held_until_release() {
    use crate::devices::bus::BusDevice;
    use crate::devices::legacy::serial::SerialDevice;
    use crate::devices::legacy::IrqLine;
    let path = std::env::temp_dir().join(format!("twinrun-gate-uart-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sink = ConsoleSink::new(&ConsoleConfig::File { path: path.clone() }).unwrap();
    let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut uart = SerialDevice::new(irq, sink);
    let gate = OutputGate::new();
    uart.attach_output_gate(&gate).unwrap();
    uart.write(0x3f8, 0, b"a");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"a",
        "direct while the gate is off"
    );
    gate.enable();
    gate.set_limit(1);
    for b in b"held\n" {
        uart.write(0x3f8, 0, &[*b]);
    }
    // Past the limit: the UART cannot stall, so its bytes are held anyway.
    assert_eq!(gate.held_bytes(), 5);
    assert_eq!(std::fs::read(&path).unwrap(), b"a");
    gate.close_epoch(1).unwrap();
    let r = gate.release(1);
    assert_eq!(r.console_bytes, 5);
    let got = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(got, b"aheld\n");
}

#[test]
fn epoch_console_and_positioned_release_are_idempotent() {
    let path = std::env::temp_dir().join(format!("twinrun-gate-pos-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sink = Arc::new(Mutex::new(
        ConsoleSink::new(&ConsoleConfig::File { path: path.clone() }).unwrap(),
    ));
    sink.lock().unwrap().write(b"boot\n");
    let gate = OutputGate::new();
    let rs: Arc<Mutex<dyn ReleaseSink>> = Arc::new(Mutex::new(ConsoleRelease(sink.clone())));
    let con = gate.register(StreamKind::Console, rs).unwrap();
    assert_eq!(gate.make_console_positioned(None).unwrap(), Some(5));
    gate.enable();
    con.hold(b"one\n".to_vec(), 0).unwrap();
    gate.close_epoch(0).unwrap();
    let e0 = gate.epoch_console(0).unwrap();
    assert_eq!((e0.pos, &e0.data[..]), (5, &b"one\n"[..]));
    // An epoch without console output still reports where the stream stands.
    gate.close_epoch(1).unwrap();
    let e1 = gate.epoch_console(1).unwrap();
    assert_eq!((e1.pos, e1.data.len()), (9, 0));
    assert!(
        gate.epoch_console(0).is_none(),
        "only the last closed epoch"
    );
    con.hold(b"two\n".to_vec(), 0).unwrap();
    con.hold(b"three\n".to_vec(), 0).unwrap();
    gate.close_epoch(2).unwrap();
    let e2 = gate.epoch_console(2).unwrap();
    assert_eq!((e2.pos, &e2.data[..]), (9, &b"two\nthree\n"[..]));
    assert_eq!(gate.console_position(), Some(19));
    gate.release(2);
    let once = std::fs::read(&path).unwrap();
    assert_eq!(once, b"boot\none\ntwo\nthree\n");
    // Released again at the same positions (a standby after failover): no change.
    assert!(gate.write_console_at(e2.pos, &e2.data));
    assert!(gate.write_console_at(e0.pos, &e0.data));
    assert_eq!(std::fs::read(&path).unwrap(), once);
    // Discarded output gives its positions back.
    con.hold(b"lost\n".to_vec(), 0).unwrap();
    gate.discard_after(2);
    assert_eq!(gate.console_position(), Some(19));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn epoch_frames_copies_the_last_closed_epochs_frames_per_nic() {
    let gate = OutputGate::new();
    let (con, _crec) = stream(&gate, StreamKind::Console);
    let (n0, rec0) = stream(&gate, StreamKind::Net);
    let (n1, _rec1) = stream(&gate, StreamKind::Net);
    gate.enable();
    n0.hold(b"HDRa".to_vec(), 3).unwrap();
    gate.close_epoch(0).unwrap();
    assert_eq!(gate.epoch_frames(0), vec![(0, b"a".to_vec())]);
    // An epoch with console output only has no frames.
    con.hold(b"text".to_vec(), 0).unwrap();
    gate.close_epoch(1).unwrap();
    assert!(gate.epoch_frames(1).is_empty());
    // An epoch with no output at all.
    gate.close_epoch(2).unwrap();
    assert!(gate.epoch_frames(2).is_empty());
    n1.hold(b"HDRx".to_vec(), 3).unwrap();
    n0.hold(b"HDRb".to_vec(), 3).unwrap();
    n0.hold(b"HDRc".to_vec(), 3).unwrap();
    gate.close_epoch(3).unwrap();
    // Held frames of earlier epochs (epoch 0's "a") are not part of it; per NIC in
    // emission order.
    assert_eq!(
        gate.epoch_frames(3),
        vec![(0, b"b".to_vec()), (0, b"c".to_vec()), (1, b"x".to_vec())]
    );
    assert!(
        gate.epoch_frames(0).is_empty(),
        "only the last closed epoch"
    );
    // The copies leave the held frames alone: the release still writes them.
    n0.hold(b"HDRopen".to_vec(), 3).unwrap();
    assert!(
        gate.epoch_frames(3).len() == 3,
        "open output is not part of it"
    );
    gate.release(3);
    assert_eq!(
        frames(&rec0),
        vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
    );
    assert!(gate.epoch_frames(3).is_empty(), "released");
}

#[test]
fn the_notifier_hears_of_the_first_output_of_each_epoch_only() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let gate = OutputGate::new();
    let (con, _crec) = stream(&gate, StreamKind::Console);
    let (net, _nrec) = stream(&gate, StreamKind::Net);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let g = Arc::downgrade(&gate);
    gate.set_waiting_notifier(Some(Arc::new(move || {
        // Called outside the gate's lock: the gate may be asked at once.
        if let Some(g) = g.upgrade() {
            assert!(g.output_waiting());
        }
        c.fetch_add(1, Ordering::SeqCst);
    })));
    gate.enable();
    con.hold(b"a".to_vec(), 0).unwrap();
    con.hold(b"b".to_vec(), 0).unwrap();
    net.hold(b"frame".to_vec(), 0).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    gate.close_epoch(0).unwrap();
    // An empty frame still waits (a frame is output whatever its length).
    net.hold(b"HDR".to_vec(), 3).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    gate.close_epoch(1).unwrap();
    gate.set_waiting_notifier(None);
    con.hold(b"c".to_vec(), 0).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Direct output (gate off) is not waiting output.
    gate.disable();
    let (con2, _r) = stream(&gate, StreamKind::Console);
    let c2 = calls.clone();
    gate.set_waiting_notifier(Some(Arc::new(move || {
        c2.fetch_add(1, Ordering::SeqCst);
    })));
    assert!(con2.hold(b"d".to_vec(), 0).is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
