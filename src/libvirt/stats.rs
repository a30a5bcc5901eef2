//! Pure arithmetic from libvirt's counters to Nomad's task resource usage:
//! CPU percent from cumulative CPU-time deltas, MHz "ticks", and memory in
//! bytes (libvirt reports KiB; the Go original reported KiB as bytes).

use virt::domain::MemoryStat;
use virt::sys;

/// One reading of a domain's cumulative CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSample {
    /// Cumulative CPU time of the domain in ns (`virDomainGetInfo` cpuTime).
    pub cpu_time_ns: u64,
    /// When it was read, in ns on a monotonic clock of the caller's choosing.
    pub at_ns: u64,
    /// Virtual CPUs of the domain; bounds the percent (0 = no bound).
    pub vcpus: u32,
}

/// CPU use between two samples in percent of ONE host core (as Docker and
/// Nomad's executors report it: 2 busy vCPUs read 200 %).
///
/// Returns 0 when the wall clock did not advance or the counter went back
/// (the domain restarted). Clamped to `vcpus × 100` because the counter and
/// the clock are not read at the same instant.
pub fn cpu_percent(prev: &CpuSample, now: &CpuSample) -> f64 {
    let (Some(cpu_delta), Some(wall_delta)) = (
        now.cpu_time_ns.checked_sub(prev.cpu_time_ns),
        now.at_ns.checked_sub(prev.at_ns),
    ) else {
        return 0.0;
    };
    if wall_delta == 0 {
        return 0.0;
    }
    let percent = cpu_delta as f64 / wall_delta as f64 * 100.0;
    if now.vcpus > 0 {
        percent.min(f64::from(now.vcpus) * 100.0)
    } else {
        percent
    }
}

/// MHz consumed, Nomad's "total ticks": percent of one core × MHz per core
/// (Docker's driver: percent/100 × node MHz / cores). 0 for nonsense input.
pub fn total_ticks(percent: f64, host_mhz_per_core: f64) -> f64 {
    let ticks = percent / 100.0 * host_mhz_per_core;
    if ticks.is_finite() && ticks > 0.0 {
        ticks
    } else {
        0.0
    }
}

/// A domain's memory figures in KiB, as libvirt reports them. The balloon
/// figures exist only when the guest has a virtio balloon (and, for unused
/// and available, a guest driver reporting stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemorySample {
    /// Resident set of the hypervisor process (`VIR_DOMAIN_MEMORY_STAT_RSS`).
    pub rss_kib: Option<u64>,
    /// Current balloon size (`..._ACTUAL_BALLOON`).
    pub actual_kib: Option<u64>,
    /// Memory the guest leaves unused (`..._UNUSED`).
    pub unused_kib: Option<u64>,
    /// Memory the guest sees (`..._AVAILABLE`).
    pub available_kib: Option<u64>,
    /// The domain's maximum memory (`virDomainGetInfo` maxMem).
    pub max_kib: u64,
}

impl MemorySample {
    /// From `dom.memory_stats(0)` and the domain's maximum memory.
    /// Unknown tags are ignored; a repeated tag keeps its last value.
    pub fn from_stats(stats: &[MemoryStat], max_kib: u64) -> Self {
        let mut sample = MemorySample {
            max_kib,
            ..MemorySample::default()
        };
        for stat in stats {
            let slot = match stat.tag {
                sys::VIR_DOMAIN_MEMORY_STAT_RSS => &mut sample.rss_kib,
                sys::VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON => &mut sample.actual_kib,
                sys::VIR_DOMAIN_MEMORY_STAT_UNUSED => &mut sample.unused_kib,
                sys::VIR_DOMAIN_MEMORY_STAT_AVAILABLE => &mut sample.available_kib,
                _ => continue,
            };
            *slot = Some(stat.val);
        }
        sample
    }
}

fn kib_to_bytes(kib: u64) -> u64 {
    kib.saturating_mul(1024)
}

/// `(rss, usage, max_usage)` in BYTES.
///
/// - rss: the hypervisor process's resident set, 0 when not reported;
/// - usage: what the guest uses — balloon size minus what the guest leaves
///   unused when both are reported, else rss, else the balloon size, else 0;
/// - max_usage: the domain's maximum memory, the most it can ever use.
pub fn memory_usage_bytes(sample: &MemorySample) -> (u64, u64, u64) {
    let rss = sample.rss_kib.map(kib_to_bytes).unwrap_or(0);
    let usage_kib = match (sample.actual_kib, sample.unused_kib, sample.rss_kib) {
        (Some(actual), Some(unused), _) => Some(actual.saturating_sub(unused)),
        (_, _, Some(rss)) => Some(rss),
        (actual, _, None) => actual,
    };
    let usage = usage_kib.map(kib_to_bytes).unwrap_or(0);
    (rss, usage, kib_to_bytes(sample.max_kib))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: u64 = 1_000_000_000;

    fn cpu(cpu_time_ns: u64, at_ns: u64) -> CpuSample {
        CpuSample {
            cpu_time_ns,
            at_ns,
            vcpus: 4,
        }
    }

    #[test]
    fn two_seconds_of_cpu_over_four_seconds_is_fifty_percent() {
        let percent = cpu_percent(
            &cpu(10 * SECOND, 100 * SECOND),
            &cpu(12 * SECOND, 104 * SECOND),
        );
        assert!((percent - 50.0).abs() < 1e-9, "{percent}");
    }

    #[test]
    fn busy_vcpus_count_as_whole_cores() {
        let percent = cpu_percent(&cpu(0, 0), &cpu(3 * SECOND, SECOND));
        assert!((percent - 300.0).abs() < 1e-9, "{percent}");
    }

    #[test]
    fn percent_is_bounded_by_the_vcpus() {
        let prev = CpuSample {
            cpu_time_ns: 0,
            at_ns: 0,
            vcpus: 2,
        };
        let now = CpuSample {
            cpu_time_ns: 3 * SECOND,
            at_ns: SECOND,
            vcpus: 2,
        };
        assert_eq!(cpu_percent(&prev, &now), 200.0);
        let unbounded = CpuSample { vcpus: 0, ..now };
        assert!((cpu_percent(&prev, &unbounded) - 300.0).abs() < 1e-9);
    }

    #[test]
    fn counter_reset_gives_zero() {
        assert_eq!(cpu_percent(&cpu(50 * SECOND, 0), &cpu(SECOND, SECOND)), 0.0);
    }

    #[test]
    fn zero_or_backwards_wall_time_gives_zero() {
        assert_eq!(
            cpu_percent(&cpu(0, 5 * SECOND), &cpu(SECOND, 5 * SECOND)),
            0.0
        );
        assert_eq!(
            cpu_percent(&cpu(0, 5 * SECOND), &cpu(SECOND, 4 * SECOND)),
            0.0
        );
    }

    #[test]
    fn idle_gives_zero() {
        assert_eq!(cpu_percent(&cpu(SECOND, 0), &cpu(SECOND, SECOND)), 0.0);
    }

    #[test]
    fn ticks_are_mhz_consumed() {
        assert!((total_ticks(50.0, 2000.0) - 1000.0).abs() < 1e-9);
        assert!((total_ticks(250.0, 2400.0) - 6000.0).abs() < 1e-9);
        assert_eq!(total_ticks(0.0, 2000.0), 0.0);
        assert_eq!(total_ticks(-5.0, 2000.0), 0.0);
        assert_eq!(total_ticks(f64::NAN, 2000.0), 0.0);
        assert_eq!(total_ticks(50.0, f64::INFINITY), 0.0);
    }

    fn stat(tag: u32, val: u64) -> MemoryStat {
        MemoryStat { tag, val }
    }

    #[test]
    fn memory_tag_numbers_are_the_documented_ones() {
        assert_eq!(sys::VIR_DOMAIN_MEMORY_STAT_UNUSED, 4);
        assert_eq!(sys::VIR_DOMAIN_MEMORY_STAT_AVAILABLE, 5);
        assert_eq!(sys::VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON, 6);
        assert_eq!(sys::VIR_DOMAIN_MEMORY_STAT_RSS, 7);
    }

    #[test]
    fn sample_reads_the_balloon_tags() {
        // What a KVM guest with a balloon reports (tags 6, 7, 9 seen here).
        let stats = [stat(6, 1_048_576), stat(7, 300_000), stat(9, 1_700_000_000)];
        let sample = MemorySample::from_stats(&stats, 2_097_152);
        assert_eq!(
            sample,
            MemorySample {
                rss_kib: Some(300_000),
                actual_kib: Some(1_048_576),
                unused_kib: None,
                available_kib: None,
                max_kib: 2_097_152,
            }
        );
        let full = MemorySample::from_stats(
            &[
                stat(4, 600_000),
                stat(5, 1_000_000),
                stat(6, 1_048_576),
                stat(7, 1),
            ],
            1_048_576,
        );
        assert_eq!(full.unused_kib, Some(600_000));
        assert_eq!(full.available_kib, Some(1_000_000));
    }

    #[test]
    fn usage_prefers_balloon_then_rss_then_actual_in_bytes() {
        let both = MemorySample {
            rss_kib: Some(400_000),
            actual_kib: Some(1_048_576),
            unused_kib: Some(648_576),
            available_kib: Some(1_000_000),
            max_kib: 2_097_152,
        };
        assert_eq!(
            memory_usage_bytes(&both),
            (400_000 * 1024, 400_000 * 1024, 2_097_152 * 1024)
        );
        let no_unused = MemorySample {
            unused_kib: None,
            rss_kib: Some(300_000),
            ..both
        };
        assert_eq!(memory_usage_bytes(&no_unused).1, 300_000 * 1024);
        let actual_only = MemorySample {
            rss_kib: None,
            actual_kib: Some(65_536),
            unused_kib: None,
            available_kib: None,
            max_kib: 65_536,
        };
        assert_eq!(
            memory_usage_bytes(&actual_only),
            (0, 64 * 1024 * 1024, 64 * 1024 * 1024)
        );
    }

    #[test]
    fn missing_tags_give_zero_but_keep_the_maximum() {
        // The test driver returns no memory stats at all.
        let sample = MemorySample::from_stats(&[], 65_536);
        assert_eq!(memory_usage_bytes(&sample), (0, 0, 64 * 1024 * 1024));
    }

    #[test]
    fn unused_above_actual_saturates() {
        let odd = MemorySample {
            actual_kib: Some(10),
            unused_kib: Some(20),
            ..MemorySample::default()
        };
        assert_eq!(memory_usage_bytes(&odd).1, 0);
        let huge = MemorySample {
            rss_kib: Some(u64::MAX),
            ..MemorySample::default()
        };
        assert_eq!(memory_usage_bytes(&huge).0, u64::MAX);
    }

    proptest! {
        #[test]
        fn percent_is_finite_and_not_negative(
            prev_cpu in any::<u64>(),
            now_cpu in any::<u64>(),
            prev_at in any::<u64>(),
            now_at in any::<u64>(),
            vcpus in any::<u32>(),
        ) {
            let prev = CpuSample { cpu_time_ns: prev_cpu, at_ns: prev_at, vcpus };
            let now = CpuSample { cpu_time_ns: now_cpu, at_ns: now_at, vcpus };
            let percent = cpu_percent(&prev, &now);
            prop_assert!(percent.is_finite());
            prop_assert!(percent >= 0.0);
            if vcpus > 0 {
                prop_assert!(percent <= f64::from(vcpus) * 100.0);
            }
            let ticks = total_ticks(percent, 3000.0);
            prop_assert!(ticks.is_finite() && ticks >= 0.0);
        }

        #[test]
        fn usage_never_exceeds_the_reported_figures(
            rss in proptest::option::of(0u64..1 << 40),
            actual in proptest::option::of(0u64..1 << 40),
            unused in proptest::option::of(0u64..1 << 40),
            max in 0u64..1 << 40,
        ) {
            let sample = MemorySample { rss_kib: rss, actual_kib: actual, unused_kib: unused, available_kib: None, max_kib: max };
            let (rss_bytes, usage, max_usage) = memory_usage_bytes(&sample);
            prop_assert_eq!(rss_bytes, rss.unwrap_or(0) * 1024);
            prop_assert_eq!(max_usage, max * 1024);
            let bound = rss.unwrap_or(0).max(actual.unwrap_or(0)) * 1024;
            prop_assert!(usage <= bound);
            prop_assert_eq!(usage % 1024, 0);
        }
    }
}
