//! A pod's VM size from what kubelet asks: the sum of its containers' limits
//! (`PodSandboxConfig.linux.resources`) plus the RuntimeClass overhead
//! (`linux.overhead`), bounded by the handler's default (the least a VM gets, also what a
//! pod without limits gets) and its maximum.
//!
//! Memory is rounded up to a size class, a power of two MiB (at most the handler's
//! maximum), so that pods share a few VM templates (one per class and vCPU count, built
//! when first wanted) rather than one per exact size. The rounding costs guest address
//! space, not host memory: the host backs only the pages the guest touches, and kubelet's
//! pod cgroup limit (the exact sum) bounds those.

use super::error::PodError;
use super::spec::Resources;
use crate::config::Handler;

/// The size of one pod's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB (a size class).
    pub memory_mib: u64,
}

/// What a pod asks for (zero fields are unset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodAsk {
    /// The containers' memory limits together, bytes.
    pub memory_bytes: u64,
    /// The containers' CPU limits together, in millicores.
    pub cpu_millis: u64,
    /// The RuntimeClass overhead's memory, bytes.
    pub overhead_memory_bytes: u64,
    /// The RuntimeClass overhead's CPU, millicores.
    pub overhead_cpu_millis: u64,
}

impl PodAsk {
    /// From the sandbox's resources and overhead as CRI gives them.
    pub fn new(resources: &Resources, overhead: &Resources) -> Self {
        Self {
            memory_bytes: positive(resources.memory_limit_bytes),
            cpu_millis: millicores(resources),
            overhead_memory_bytes: positive(overhead.memory_limit_bytes),
            overhead_cpu_millis: millicores(overhead),
        }
    }
}

fn positive(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A CFS quota as millicores (0 when unset).
fn millicores(r: &Resources) -> u64 {
    let quota = positive(r.cpu_quota);
    if quota == 0 || r.cpu_period == 0 {
        return 0;
    }
    (quota.saturating_mul(1000)).div_ceil(r.cpu_period)
}

/// The VM for `ask` under `handler`.
pub fn vm_size(handler: &Handler, ask: PodAsk) -> Result<VmSize, PodError> {
    let max_mib = handler.max_memory_mib;
    let mut memory_mib = handler.memory_mib;
    if ask.memory_bytes > 0 {
        let want = ask
            .memory_bytes
            .saturating_add(ask.overhead_memory_bytes)
            .div_ceil(1 << 20);
        if want > max_mib {
            return Err(PodError::InvalidArgument(format!(
                "the pod asks for {want} MiB of memory (limits and overhead), more than the \
                 {max_mib} MiB handler {} gives a VM",
                handler.name
            )));
        }
        memory_mib = memory_mib.max(want);
    }
    let memory_mib = memory_mib.next_power_of_two().min(max_mib);
    let mut vcpus = handler.vcpus;
    if ask.cpu_millis > 0 {
        let want = ask
            .cpu_millis
            .saturating_add(ask.overhead_cpu_millis)
            .div_ceil(1000);
        if want > u64::from(handler.max_vcpus) {
            return Err(PodError::InvalidArgument(format!(
                "the pod asks for {want} CPUs (limits and overhead), more than the {} vCPUs \
                 handler {} gives a VM",
                handler.max_vcpus, handler.name
            )));
        }
        vcpus = vcpus.max(u8::try_from(want).unwrap_or(u8::MAX));
    }
    Ok(VmSize { vcpus, memory_mib })
}

/// Every size class `handler` can give (for keeping their templates).
pub fn classes(handler: &Handler) -> Vec<VmSize> {
    let mut mems = Vec::new();
    let mut m = handler
        .memory_mib
        .next_power_of_two()
        .min(handler.max_memory_mib);
    loop {
        mems.push(m);
        if m >= handler.max_memory_mib {
            break;
        }
        m = (m * 2).min(handler.max_memory_mib);
    }
    (handler.vcpus..=handler.max_vcpus)
        .flat_map(|vcpus| {
            mems.iter()
                .map(move |&memory_mib| VmSize { vcpus, memory_mib })
        })
        .collect()
}

/// A container asking for more memory than its pod's VM has is refused: it could never get
/// it (the VM does not grow).
pub fn check_fits(vm_memory_mib: u64, r: &Resources) -> Result<(), PodError> {
    let limit = positive(r.memory_limit_bytes);
    if vm_memory_mib > 0 && limit > vm_memory_mib << 20 {
        return Err(PodError::InvalidArgument(format!(
            "a memory limit of {} MiB does not fit the pod's VM of {vm_memory_mib} MiB (a VM \
             does not grow; the pod's limits are summed when it is made)",
            limit.div_ceil(1 << 20)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler() -> Handler {
        crate::config::Config::parse(
            "[handlers.podvisor]\nvcpus = 1\nmemory_mib = 256\nmax_vcpus = 4\nmax_memory_mib = 3000\n",
        )
        .unwrap()
        .handler("")
        .unwrap()
        .clone()
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn limits_and_overhead_make_the_size() {
        let h = handler();
        let size = |ask| vm_size(&h, ask).unwrap();
        assert_eq!(
            size(PodAsk::default()),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        let ask = PodAsk {
            memory_bytes: 600 * MIB,
            ..Default::default()
        };
        assert_eq!(
            size(ask),
            VmSize {
                vcpus: 1,
                memory_mib: 1024
            }
        );
        let ask = PodAsk {
            memory_bytes: 600 * MIB,
            overhead_memory_bytes: 500 * MIB,
            cpu_millis: 1500,
            overhead_cpu_millis: 250,
        };
        assert_eq!(
            size(ask),
            VmSize {
                vcpus: 2,
                memory_mib: 2048
            }
        );
        let ask = PodAsk {
            memory_bytes: 2100 * MIB,
            ..Default::default()
        };
        assert_eq!(
            size(ask).memory_mib,
            3000,
            "the maximum, not a power of two above it"
        );
        let ask = PodAsk {
            memory_bytes: 10 * MIB,
            ..Default::default()
        };
        assert_eq!(
            size(ask).memory_mib,
            256,
            "never below the handler's default"
        );
        for ask in [
            PodAsk {
                memory_bytes: 3001 * MIB,
                ..Default::default()
            },
            PodAsk {
                cpu_millis: 4001,
                ..Default::default()
            },
        ] {
            assert!(matches!(
                vm_size(&h, ask),
                Err(PodError::InvalidArgument(_))
            ));
        }
    }

    #[test]
    fn quota_is_millicores() {
        let r = Resources {
            cpu_quota: 150_000,
            cpu_period: 100_000,
            memory_limit_bytes: 5,
            ..Default::default()
        };
        let ask = PodAsk::new(&r, &Resources::default());
        assert_eq!((ask.cpu_millis, ask.memory_bytes), (1500, 5));
        let unset = Resources {
            cpu_quota: -1,
            memory_limit_bytes: -1,
            ..Default::default()
        };
        assert_eq!(PodAsk::new(&unset, &unset), PodAsk::default());
    }

    #[test]
    fn classes_cover_every_size() {
        let h = handler();
        let all = classes(&h);
        assert_eq!(all.len(), 4 * 5, "{all:?}");
        for ask in [0, 300, 700, 1500, 2500] {
            let s = vm_size(
                &h,
                PodAsk {
                    memory_bytes: ask * MIB,
                    cpu_millis: 3500,
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(all.contains(&s), "{s:?}");
        }
    }

    #[test]
    fn a_limit_over_the_vm_is_refused() {
        let r = |mib: u64| Resources {
            memory_limit_bytes: i64::try_from(mib * MIB).unwrap(),
            ..Default::default()
        };
        check_fits(512, &r(512)).unwrap();
        check_fits(512, &Resources::default()).unwrap();
        assert!(check_fits(512, &r(513)).is_err());
    }
}
