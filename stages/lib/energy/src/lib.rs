//! What a phase of work cost: the process's CPU-seconds (the kernel's rusage) and, where the
//! kernel exposes RAPL energy counters through powercap, the CPU packages' energy in joules.
//!
//! RAPL is read from `<root>/intel-rapl:N/energy_uj` for every top-level zone whose `name`
//! starts with `package` (AMD Zen packages appear under the same `intel-rapl` control type since
//! Linux 5.8). Sub-zones (`intel-rapl:N:M`: cores, uncore, DRAM) are parts of their package and
//! `psys` covers the whole platform, so neither is added in. A counter wraps at its zone's
//! `max_energy_range_uj`; one wrap between two readings is undone, which covers any phase
//! shorter than the range (about 4–70 minutes at full package power). Package energy counts
//! everything the package ran meanwhile, not only this process: a reading is labelled so.
//!
//! Where there is no powercap (most VMs), or its counters are root-only and we are not root,
//! [`Meter`] measures CPU-seconds only and says why there are no joules. It never estimates one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

/// Where Linux exposes powercap zones.
pub const POWERCAP_ROOT: &str = "/sys/class/powercap";

#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: expected a whole number of microjoules, found {found:?}")]
    Parse { path: PathBuf, found: String },
}

/// One RAPL package zone: its counter file and the value the counter wraps at.
#[derive(Clone, Debug, PartialEq)]
pub struct Zone {
    pub name: String,
    pub energy_uj: PathBuf,
    pub max_range_uj: u64,
}

/// The package zones under a powercap root.
#[derive(Clone, Debug, PartialEq)]
pub struct Powercap {
    pub zones: Vec<Zone>,
}

fn read_u64(path: &Path) -> Result<u64, EnergyError> {
    let text = std::fs::read_to_string(path).map_err(|source| EnergyError::Read { path: path.into(), source })?;
    text.trim().parse().map_err(|_| EnergyError::Parse { path: path.into(), found: text.trim().to_string() })
}

/// Energy (µJ) a counter advanced from `before` to `after`, undoing one wrap at `max_range`.
pub fn delta_uj(before: u64, after: u64, max_range: u64) -> u64 {
    if after >= before {
        after - before
    } else {
        // The counter passed max_range and restarted from 0 (values run 0..=max_range).
        max_range.saturating_sub(before) + after + 1
    }
}

impl Powercap {
    /// The RAPL package zones under `root`, in name order; `Ok(None)` when there are none
    /// (no powercap at all, or no RAPL package zone in it).
    pub fn discover(root: &Path) -> Result<Option<Powercap>, EnergyError> {
        let entries = match std::fs::read_dir(root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(EnergyError::Read { path: root.into(), source }),
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                // `intel-rapl:0` is a package; `intel-rapl:0:1` a part of one.
                name.strip_prefix("intel-rapl:").is_some_and(|rest| !rest.contains(':'))
            })
            .collect();
        dirs.sort();
        let mut zones = Vec::new();
        for dir in dirs {
            let name = std::fs::read_to_string(dir.join("name")).unwrap_or_default().trim().to_string();
            if !name.starts_with("package") {
                continue;
            }
            let max_range_uj = read_u64(&dir.join("max_energy_range_uj"))?;
            zones.push(Zone { name, energy_uj: dir.join("energy_uj"), max_range_uj });
        }
        Ok((!zones.is_empty()).then_some(Powercap { zones }))
    }

    /// Every zone's counter now (µJ), in zone order.
    pub fn read(&self) -> Result<Vec<u64>, EnergyError> {
        self.zones.iter().map(|z| read_u64(&z.energy_uj)).collect()
    }

    /// Joules between two readings of [`Powercap::read`], summed over the packages.
    pub fn joules(&self, before: &[u64], after: &[u64]) -> f64 {
        let uj: u64 =
            self.zones.iter().zip(before.iter().zip(after)).map(|(z, (&b, &a))| delta_uj(b, a, z.max_range_uj)).sum();
        uj as f64 * 1e-6
    }
}

/// User + system CPU-seconds of this process so far (all its threads), from the kernel.
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Measures phases of work: CPU-seconds always, joules where RAPL can be read.
#[derive(Debug)]
pub struct Meter {
    powercap: Option<Powercap>,
    /// Why there are no joules, when there are none.
    no_energy: Option<String>,
}

/// A phase in progress (from [`Meter::start`]).
#[derive(Debug)]
pub struct Started {
    cpu_s: f64,
    wall: Instant,
    energy: Option<Vec<u64>>,
}

/// What one phase cost, per 1,000 units of work (tokens) as well as in total.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cost {
    pub units: u64,
    pub wall_seconds: f64,
    pub cpu_seconds: f64,
    pub cpu_seconds_per_1k: f64,
    /// Measured package energy; `None` where RAPL is not readable (never an estimate).
    pub joules: Option<f64>,
    pub joules_per_1k: Option<f64>,
}

impl Meter {
    /// A meter reading RAPL under `root` when it can (a first read is tried here, so a
    /// root-only counter is found out now, not mid-measurement).
    pub fn new(root: &Path) -> Meter {
        let found = Powercap::discover(root).and_then(|p| match p {
            Some(p) => p.read().map(|_| Some(p)),
            None => Ok(None),
        });
        match found {
            Ok(Some(p)) => Meter { powercap: Some(p), no_energy: None },
            Ok(None) => Meter {
                powercap: None,
                no_energy: Some(format!(
                    "no RAPL package zone under {} (the kernel exposes none here)",
                    root.display()
                )),
            },
            Err(e) => Meter { powercap: None, no_energy: Some(format!("RAPL present but unreadable: {e}")) },
        }
    }

    /// What this meter measures, for the report: the energy source or why there is none.
    pub fn source(&self) -> String {
        match (&self.powercap, &self.no_energy) {
            (Some(p), _) => format!(
                "RAPL package energy ({}; whole package, other work on it included) and process CPU-seconds (rusage)",
                p.zones.iter().map(|z| z.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
            (None, Some(why)) => format!("process CPU-seconds (rusage) only, no joules: {why}"),
            (None, None) => "process CPU-seconds (rusage) only".into(),
        }
    }

    pub fn has_energy(&self) -> bool {
        self.powercap.is_some()
    }

    pub fn start(&self) -> Result<Started, EnergyError> {
        let energy = self.powercap.as_ref().map(Powercap::read).transpose()?;
        Ok(Started { cpu_s: cpu_seconds(), wall: Instant::now(), energy })
    }

    /// The cost of the phase begun at `started`, which did `units` of work.
    pub fn stop(&self, started: Started, units: u64) -> Result<Cost, EnergyError> {
        let wall_seconds = started.wall.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - started.cpu_s;
        let joules = match (&self.powercap, &started.energy) {
            (Some(p), Some(before)) => Some(p.joules(before, &p.read()?)),
            _ => None,
        };
        let per_1k = |v: f64| if units == 0 { 0.0 } else { v * 1000.0 / units as f64 };
        Ok(Cost {
            units,
            wall_seconds,
            cpu_seconds: cpu,
            cpu_seconds_per_1k: per_1k(cpu),
            joules,
            joules_per_1k: joules.map(per_1k),
        })
    }
}

#[cfg(test)]
mod tests;
