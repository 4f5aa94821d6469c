//! Epoch pages copied after the pause (`EpochCopy::WriteProtect`, issue 17 item 2):
//! every page an epoch sends holds its bytes as they were at the cut, although the
//! guest runs, and writes those very pages, while they are copied. Checked on real KVM
//! against a copy of all guest memory taken in the pause.

#[path = "../../vmm/tests/support/flat_dirty_guest.rs"]
#[allow(dead_code)]
mod flat;

use std::sync::atomic::Ordering;

use checkpoint::messages::PAGE_SIZE;
use checkpoint::primary::{Captured, Capturer, EpochCopy};
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const MEM_MIB: u64 = 64;
/// Pages the guest writes per round.
const N: u32 = 3000;
const EPOCHS: u64 = 20;

/// All of guest memory (one region below 3 GiB at this size).
fn snapshot(mem: &vmm::vstate::memory::GuestMemoryMmap) -> Vec<u8> {
    let len: u64 = mem.iter().map(|r| r.len()).sum();
    assert_eq!(
        mem.iter().count(),
        1,
        "one region expected at {MEM_MIB} MiB"
    );
    let mut v = vec![0u8; len as usize];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

#[test]
fn pages_copied_after_the_pause_hold_the_cut_s_bytes() {
    let (mut vmm, ctl) = flat::build(MEM_MIB);
    let mut cap = Capturer::new(&vmm).unwrap();
    cap.set_epoch_copy(&vmm, EpochCopy::WriteProtect)
        .expect("userfaultfd write protection of guest memory");
    assert_eq!(cap.epoch_copy(), EpochCopy::WriteProtect);
    ctl.n.store(N, Ordering::SeqCst);
    vmm.start().unwrap();
    flat::wait_done(&ctl, 1);
    cap.sync_round(&vmm, 0).unwrap();
    let half = u64::from(N / 2) * PAGE_SIZE as u64;
    let (mut checked, mut overwritten) = (0u64, 0u64);
    for e in 0..EPOCHS {
        // The guest finished round g = e + 1 and waits; pause and keep what memory
        // holds at the cut.
        let g = e as u32 + 1;
        flat::wait_done(&ctl, g);
        vmm.pause().unwrap();
        let reference = snapshot(vmm.guest_memory());
        // Round g + 1 starts half-way into the pages of round g (alternately): its
        // first writes hit pages the copier reaches last.
        let base = if g % 2 == 1 {
            flat::DIRTY_BASE + half
        } else {
            flat::DIRTY_BASE
        };
        ctl.base.store(base, Ordering::SeqCst);
        ctl.go.store(g, Ordering::SeqCst);
        // Cut, protect, resume (the guest runs round g + 1 now), copy.
        let Captured { parts, pages, .. } = cap
            .capture_epoch(&vmm, e, 1, e.checked_sub(1), true, false)
            .unwrap();
        vmm.release_output(e).unwrap();
        if e > 0 {
            assert!(pages >= u64::from(N), "epoch {e}: {pages} pages");
        }
        if e < 4 {
            eprintln!("epoch {e}: {pages} pages (the guest wrote {N})");
        }
        let mut sent = Vec::new();
        for p in &parts {
            let mut bytes = Vec::new();
            for chunk in p.payload.iter().skip(3) {
                bytes.extend_from_slice(chunk);
            }
            let mut at = 0;
            for r in &p.head.runs {
                for k in 0..u64::from(r.pages) {
                    let gpa = r.gpa + k * PAGE_SIZE as u64;
                    let want = &reference[gpa as usize..gpa as usize + PAGE_SIZE];
                    let got = &bytes[at..at + PAGE_SIZE];
                    assert!(
                        got == want,
                        "epoch {e}: page {gpa:#x} sent as {:?}, was {:?} at the cut",
                        &got[..8],
                        &want[..8]
                    );
                    sent.push(gpa);
                    at += PAGE_SIZE;
                    checked += 1;
                }
            }
            assert_eq!(at, bytes.len(), "epoch {e}: payload size");
        }
        assert_eq!(sent.len() as u64, pages);
        // The race was real: once round g + 1 is done, the epoch's pages it wrote hold
        // other bytes than were sent.
        flat::wait_done(&ctl, g + 1);
        let mut v = [0u8; 8];
        for &gpa in &sent {
            vmm.guest_memory()
                .read_slice(&mut v, GuestAddress(gpa))
                .unwrap();
            if v[..] != reference[gpa as usize..gpa as usize + 8] {
                overwritten += 1;
            }
        }
    }
    let st = cap.epoch_copy_stats();
    eprintln!(
        "{checked} pages checked over {EPOCHS} epochs; {overwritten} of them rewritten by the \
         guest's next round; copied by the fault handler first: {}, other faults {}",
        st.handler_copies, st.other_faults
    );
    assert!(checked >= (EPOCHS - 1) * u64::from(N));
    assert!(overwritten >= (EPOCHS - 1) * u64::from(N / 2));
    assert!(
        st.handler_copies > 0,
        "the guest never wrote a page before the copier reached it: the race is not exercised"
    );
    vmm.stopper().stop();
    let _ = vmm.wait_timeout(std::time::Duration::from_secs(10));
}
