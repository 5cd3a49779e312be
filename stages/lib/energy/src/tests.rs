use std::path::Path;

use super::*;

/// A powercap tree as Linux lays it out: two packages, each with a core sub-zone, and a
/// platform (`psys`) zone that must not be added in.
fn fake_tree(root: &Path, counters: &[(&str, &str, u64, u64)]) {
    for (dir, name, energy, max) in counters {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        std::fs::write(d.join("energy_uj"), format!("{energy}\n")).unwrap();
        std::fs::write(d.join("max_energy_range_uj"), format!("{max}\n")).unwrap();
    }
}

fn set(root: &Path, dir: &str, energy: u64) {
    std::fs::write(root.join(dir).join("energy_uj"), format!("{energy}\n")).unwrap();
}

const MAX: u64 = 262_143_328_850;

#[test]
fn finds_package_zones_only() {
    let t = tempfile::tempdir().unwrap();
    fake_tree(
        t.path(),
        &[
            ("intel-rapl:1", "package-1", 5, MAX),
            ("intel-rapl:0", "package-0", 7, MAX),
            ("intel-rapl:0:0", "core", 3, MAX),
            ("intel-rapl:2", "psys", 9, MAX),
            ("intel-rapl-mmio:0", "package-0", 9, MAX),
        ],
    );
    let p = Powercap::discover(t.path()).unwrap().unwrap();
    let names: Vec<&str> = p.zones.iter().map(|z| z.name.as_str()).collect();
    assert_eq!(names, ["package-0", "package-1"]);
    assert_eq!(p.read().unwrap(), [7, 5]);
}

#[test]
fn joules_sum_packages_and_undo_a_wrap() {
    let t = tempfile::tempdir().unwrap();
    fake_tree(t.path(), &[("intel-rapl:0", "package-0", MAX - 1_000_000, MAX), ("intel-rapl:1", "package-1", 10, MAX)]);
    let meter = Meter::new(t.path());
    assert!(meter.has_energy(), "{}", meter.source());
    assert!(meter.source().contains("package-0, package-1"), "{}", meter.source());
    let started = meter.start().unwrap();
    // Package 0 wraps: 1 J up to the maximum, then 2.5 J past zero (the counter's 0 counts too).
    set(t.path(), "intel-rapl:0", 2_499_999);
    set(t.path(), "intel-rapl:1", 3_000_010);
    let cost = meter.stop(started, 2000).unwrap();
    let j = cost.joules.unwrap();
    assert!((j - 6.5).abs() < 1e-9, "{j}");
    assert!((cost.joules_per_1k.unwrap() - 3.25).abs() < 1e-9);
    assert_eq!(cost.units, 2000);
}

#[test]
fn delta_without_and_with_wrap() {
    assert_eq!(delta_uj(10, 25, 100), 15);
    assert_eq!(delta_uj(90, 90, 100), 0);
    // 90 → 100 is 10, 100 → 0 is 1 more, 0 → 4 is 4.
    assert_eq!(delta_uj(90, 4, 100), 15);
}

#[test]
fn absent_powercap_gives_cpu_seconds_and_no_joules() {
    let t = tempfile::tempdir().unwrap();
    for root in [t.path().join("missing"), t.path().to_path_buf()] {
        let meter = Meter::new(&root);
        assert!(!meter.has_energy());
        assert!(meter.source().contains("no joules"), "{}", meter.source());
        let started = meter.start().unwrap();
        // Burn a little CPU so the reading is a real one.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
        let cost = meter.stop(started, 500).unwrap();
        assert_eq!(cost.joules, None);
        assert_eq!(cost.joules_per_1k, None);
        assert!(cost.cpu_seconds > 0.0, "{cost:?}");
        assert!((cost.cpu_seconds_per_1k - 2.0 * cost.cpu_seconds).abs() < 1e-12);
    }
}

#[test]
fn unreadable_counters_are_said_not_guessed() {
    let t = tempfile::tempdir().unwrap();
    fake_tree(t.path(), &[("intel-rapl:0", "package-0", 1, MAX)]);
    std::fs::write(t.path().join("intel-rapl:0/energy_uj"), "n/a\n").unwrap();
    let meter = Meter::new(t.path());
    assert!(!meter.has_energy());
    assert!(meter.source().contains("unreadable"), "{}", meter.source());
    assert!(meter.source().contains("energy_uj"), "{}", meter.source());
}

#[test]
fn this_machine_is_described_either_way() {
    // Whatever this host has, the meter says what it measures and measures CPU time.
    let meter = Meter::new(Path::new(POWERCAP_ROOT));
    let s = meter.source();
    assert!(s.contains("CPU-seconds"), "{s}");
    let cost = meter.stop(meter.start().unwrap(), 1).unwrap();
    assert_eq!(cost.joules.is_some(), meter.has_energy());
}
