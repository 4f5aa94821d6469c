use super::*;
use crate::config::DiskConfig;
use crate::devices::virtio::persist::{ConsoleAttachment, DeviceState, QueueState};
use crate::vstate::vcpu_state::MsrValue;

fn sample() -> VmState {
    let regs = kvm_bindings::kvm_regs {
        rip: 0x40_1234,
        ..Default::default()
    };
    VmState {
        memory: vec![(0, 64 << 20)],
        vcpus: vec![VcpuState {
            index: 0,
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                eax: 7,
                ..Default::default()
            }],
            regs,
            sregs: Default::default(),
            xsave: vec![5; 1024],
            xcrs: None,
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: vec![MsrValue {
                index: 0x10,
                data: 99,
            }],
            unreadable_msrs: vec![0x10a],
            mp_state: Default::default(),
            events: Default::default(),
            tsc_khz: Some(2_000_000),
        }],
        vm: KvmVmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        devices: vec![
            TransportState {
                device_type: 3,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 1 << 32,
                queue_sel: 1,
                interrupt_status: 0,
                status: 15,
                needs_reset: false,
                queues: vec![QueueState::default(); 2],
                device: DeviceState::Console {
                    sink: ConsoleAttachment::File("/tmp/c.log".into()),
                },
            },
            TransportState {
                device_type: 2,
                device_features_sel: 1,
                driver_features_sel: 0,
                driver_features: 1 << 32,
                queue_sel: 0,
                interrupt_status: 1,
                status: 15,
                needs_reset: false,
                queues: vec![QueueState {
                    size: 256,
                    ready: true,
                    next_avail: 7,
                    next_used: 7,
                    ..Default::default()
                }],
                device: DeviceState::Block {
                    disk: DiskConfig {
                        path: "/tmp/x.img".into(),
                        read_only: false,
                        io_engine: Default::default(),
                        serial: Some("x.img".into()),
                    },
                },
            },
        ],
        serial: Some(crate::devices::legacy::serial::SerialSnapshot {
            line_control: 3,
            in_buffer: vec![b'x'],
            ..Default::default()
        }),
    }
}

#[test]
fn round_trips_through_bytes() {
    let s = sample();
    let b = s.to_bytes().unwrap();
    let back = VmState::from_bytes(&b).unwrap();
    assert_eq!(back.vcpus[0].regs.rip, 0x40_1234);
    assert_eq!(back.vcpus[0].cpuid[0].eax, 7);
    assert_eq!(back.vcpus[0].xsave, vec![5; 1024]);
    assert_eq!(back.vcpus[0].msrs, s.vcpus[0].msrs);
    assert_eq!(back.devices, s.devices);
    assert_eq!(back.memory, s.memory);
    assert_eq!(back.serial, s.serial);
    assert_eq!(back.to_bytes().unwrap(), b);
}

#[test]
fn rejects_garbage_truncation_and_corruption() {
    let b = sample().to_bytes().unwrap();
    assert!(matches!(
        VmState::from_bytes(b"hello world, not a state at all"),
        Err(StateFormatError::BadMagic)
    ));
    assert!(matches!(
        VmState::from_bytes(&[]),
        Err(StateFormatError::Truncated { .. })
    ));
    for cut in [5, HEADER_LEN, b.len() / 2, b.len() - 1] {
        assert!(
            matches!(
                VmState::from_bytes(&b[..cut]),
                Err(StateFormatError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }
    let mut v = b.clone();
    v[8] = 9;
    assert!(matches!(
        VmState::from_bytes(&v),
        Err(StateFormatError::Version(9))
    ));
    let mut v = b.clone();
    v[HEADER_LEN + 10] ^= 0x40;
    assert!(matches!(
        VmState::from_bytes(&v),
        Err(StateFormatError::Checksum { .. })
    ));
    let mut v = b.clone();
    v.push(0);
    assert!(matches!(
        VmState::from_bytes(&v),
        Err(StateFormatError::TrailingBytes(1))
    ));
    // A huge length field must not overflow or allocate.
    let mut v = b.clone();
    v[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        VmState::from_bytes(&v),
        Err(StateFormatError::Truncated { .. })
    ));
    // A payload that passes the checksum but is not a state.
    let junk = [0xffu8; 16];
    let mut v = Vec::new();
    v.extend_from_slice(&STATE_MAGIC);
    v.extend_from_slice(&STATE_VERSION.to_le_bytes());
    v.extend_from_slice(&(junk.len() as u64).to_le_bytes());
    v.extend_from_slice(&junk);
    v.extend_from_slice(&crc32(&junk).to_le_bytes());
    assert!(matches!(
        VmState::from_bytes(&v),
        Err(StateFormatError::Decode(_))
    ));
}

#[test]
fn crc32_matches_zlib() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    assert_eq!(crc32(b""), 0);
}
