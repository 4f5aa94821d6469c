//! The guest's parameter block, from the VM config.

use twinrun_guest_abi::{self as abi, DeviceDesc, Params};

use crate::config::{parse_cidr, parse_ipv4, VmConfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    #[error("{0} devices; at most {max} fit in the parameter block", max = abi::MAX_DEVICES)]
    TooManyDevices(usize),
    #[error("{field} = {value:?}: {why}")]
    Address {
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

/// What the VMM knows only after building the VM.
#[derive(Clone, Debug, Default)]
pub struct BootFacts {
    pub tsc_khz: u64,
    pub ram_low_end: u64,
    pub ram_high_end: u64,
    pub free_base: u64,
    pub devices: Vec<DeviceDesc>,
}

pub fn build(cfg: &VmConfig, facts: &BootFacts) -> Result<Params, ParamsError> {
    let mut p = Params::new();
    p.tsc_khz = facts.tsc_khz;
    p.ram_low_end = facts.ram_low_end;
    p.ram_high_end = facts.ram_high_end;
    p.free_base = facts.free_base;
    p.vcpus = u32::from(cfg.vcpus);
    if facts.devices.len() > abi::MAX_DEVICES {
        return Err(ParamsError::TooManyDevices(facts.devices.len()));
    }
    p.device_count = facts.devices.len() as u32;
    p.devices[..facts.devices.len()].copy_from_slice(&facts.devices);

    // A Linux payload gets no Params block; default workloads (none) keep this total.
    let none = crate::config::Workloads::default();
    let w = cfg.payload.workloads().unwrap_or(&none);
    let bit = |on: bool, b: u32| if on { b } else { 0 };
    p.workloads = bit(w.counter, abi::WORKLOAD_COUNTER)
        | bit(w.dirty, abi::WORKLOAD_DIRTY)
        | bit(w.disk, abi::WORKLOAD_DISK)
        | bit(w.kv, abi::WORKLOAD_KV)
        | bit(w.blkbench, abi::WORKLOAD_BLKBENCH);
    p.counter_rate = w.counter_rate;
    p.counter_limit = w.counter_limit;
    p.dirty_rate = w.dirty_rate;
    p.dirty_pages = w.dirty_pages;
    p.dirty_seed = w.dirty_seed;
    p.dirty_passes = w.dirty_passes;
    p.dirty_fill = u32::from(w.dirty_fill);
    p.disk_rate = w.disk_rate;
    p.disk_flush_every = w.disk_flush_every.max(1);
    p.disk_limit = w.disk_limit;
    p.kv_port = w.kv_port;
    p.blkbench_bytes = w.blkbench_bytes;
    p.blkbench_req_bytes = w.blkbench_req_kib.saturating_mul(1024);
    p.blkbench_depth = w.blkbench_depth;
    if w.kv {
        let (ip, prefix) = parse_cidr(&w.kv_addr).map_err(|why| ParamsError::Address {
            field: "kv_addr",
            value: w.kv_addr.clone(),
            why,
        })?;
        p.kv_ipv4 = ip;
        p.kv_prefix = prefix;
        if let Some(g) = &w.kv_gateway {
            p.kv_gateway = parse_ipv4(g).map_err(|why| ParamsError::Address {
                field: "kv_gateway",
                value: g.clone(),
                why,
            })?;
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConsoleConfig, Payload, Workloads};

    #[test]
    fn fills_workloads_and_facts() {
        let cfg = VmConfig {
            mem_mib: 64,
            vcpus: 2,
            payload: Payload::TestGuest {
                elf: "g".into(),
                workloads: Workloads {
                    counter: true,
                    counter_limit: 5,
                    kv: true,
                    kv_gateway: Some("10.0.0.1".into()),
                    blkbench: true,
                    blkbench_bytes: 1 << 20,
                    blkbench_req_kib: 64,
                    blkbench_depth: 2,
                    dirty_fill: true,
                    ..Workloads::default()
                },
            },
            disks: vec![],
            nets: vec![],
            console: ConsoleConfig::Stdout,
        };
        let facts = BootFacts {
            tsc_khz: 2_000_000,
            ram_low_end: 64 << 20,
            free_base: 0x60_0000,
            devices: vec![DeviceDesc {
                mmio_base: abi::MMIO_BASE,
                device_id: abi::VIRTIO_ID_CONSOLE,
                _pad: 0,
            }],
            ..Default::default()
        };
        let p = build(&cfg, &facts).unwrap();
        assert!(p.is_valid());
        assert_eq!(p.dirty_fill, 1);
        assert_eq!(
            p.workloads,
            abi::WORKLOAD_COUNTER | abi::WORKLOAD_KV | abi::WORKLOAD_BLKBENCH
        );
        assert_eq!(
            (p.blkbench_bytes, p.blkbench_req_bytes, p.blkbench_depth),
            (1 << 20, 64 << 10, 2)
        );
        assert_eq!(p.counter_limit, 5);
        assert_eq!(p.vcpus, 2);
        assert_eq!(p.device_count, 1);
        assert_eq!(p.devices[0].device_id, abi::VIRTIO_ID_CONSOLE);
        assert_eq!(p.kv_ipv4, [10, 0, 0, 2]);
        assert_eq!(p.kv_prefix, 24);
        assert_eq!(p.kv_gateway, [10, 0, 0, 1]);
        assert_eq!(p.tsc_khz, 2_000_000);
    }
}
