//! Which SIMD code the hand-written kernels run: the best level this CPU has, capped by the
//! `ITERA_SIMD` environment variable (`portable`, `avx2` or `vnni`), so tests — and anyone
//! checking what a lesser CPU would compute — can run every path a CPU supports. The f32 GEMMs
//! inside candle choose their own instructions and ignore the cap ([`gemm_path`]).

use std::sync::OnceLock;

/// Kernel levels, lowest first; each includes the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Plain Rust (the compiler's baseline vectorization, SSE2 on x86-64).
    Portable,
    /// AVX2 + FMA (256-bit): the f32 kernels, and int8 products through `vpmaddubsw`.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI: the f32 kernels on 512-bit vectors, int8 products through
    /// `vpdpbusd`.
    Vnni,
}

/// The variable that caps the level.
pub const ENV: &str = "ITERA_SIMD";

impl Level {
    pub const ALL: [Level; 3] = [Level::Portable, Level::Avx2, Level::Vnni];

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Vnni => "vnni",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s.trim().to_ascii_lowercase())
    }

    /// Every level this CPU can run, lowest first.
    pub fn supported() -> Vec<Level> {
        let top = cpu();
        Level::ALL.into_iter().filter(|&l| l <= top).collect()
    }
}

/// The best level this CPU has.
pub fn cpu() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        let vnni = std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni");
        match (avx2, vnni) {
            (true, true) => return Level::Vnni,
            (true, false) => return Level::Avx2,
            _ => {}
        }
    }
    Level::Portable
}

/// The level the kernels run at: [`cpu`] capped by `ITERA_SIMD`, read once per process. A value
/// that names no level is reported on stderr once and ignored.
pub fn active() -> Level {
    static ACTIVE: OnceLock<Level> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let cpu = cpu();
        match std::env::var(ENV) {
            Err(_) => cpu,
            Ok(v) => match Level::parse(&v) {
                Some(cap) => cap.min(cpu),
                None => {
                    eprintln!("warning: {ENV}={v:?} is not one of portable, avx2, vnni; using {}", cpu.name());
                    cpu
                }
            },
        }
    })
}

/// The kernels candle's f32 GEMM (the gemm crate) runs on this CPU: `avx512f` (when built with
/// the `avx512-gemm` feature), `fma` or `scalar`.
pub fn gemm_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512-gemm") && std::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::is_x86_feature_detected!("fma") {
            return "fma";
        }
        "scalar"
    }
    #[cfg(not(target_arch = "x86_64"))]
    "native"
}

/// True when the AVX2 + FMA kernels may run (the CPU has them and the cap allows them).
pub fn avx2() -> bool {
    active() >= Level::Avx2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_order_and_stay_within_the_cpu() {
        assert_eq!(Level::parse(" AVX2 "), Some(Level::Avx2));
        assert_eq!(Level::parse("sse"), None);
        assert!(Level::Portable < Level::Avx2 && Level::Avx2 < Level::Vnni);
        let supported = Level::supported();
        assert_eq!(supported.first(), Some(&Level::Portable));
        assert_eq!(supported.last(), Some(&cpu()));
        assert!(active() <= cpu());
    }
}
