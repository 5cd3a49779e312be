//! The x86 kernels: tiles on [`Panels`] with AVX-512 VNNI and AVX2 (both compute exact i32 sums
//! per scale group and apply the scales in the same order as the portable loop), and the
//! activations' quantization with AVX2 and AVX-512 (the same values as the portable one).

use std::arch::x86_64::*;

use super::panels::{Panels, Tile, MR, PANEL};

/// Panics unless `rows` activation rows and `np` panels of `tile` lie inside its slices.
fn check(p: &Panels, tile: &Tile, rows: usize, np: usize) {
    assert!(
        (1..=MR).contains(&rows)
            && tile.sx.len() == rows
            && (rows - 1) * tile.stride + 4 * p.quads <= tile.x.len()
            && tile.panel + np <= p.count
            && tile.valid <= PANEL * np
            && (rows - 1) * tile.ldo + tile.col + tile.valid <= tile.out.len()
            && tile.base.is_none_or(|b| (rows - 1) * tile.ldo + tile.col + tile.valid <= b.len()),
        "quantized tile out of bounds"
    );
}

/// Four activation bytes at (row a, step s) as one i32, for broadcasting.
///
/// # Safety
/// `a·stride + 4s + 4 ≤ x.len()`.
unsafe fn x4(tile: &Tile, a: usize, s: usize) -> i32 {
    // SAFETY: the caller's bound.
    unsafe { (tile.x.as_ptr().add(a * tile.stride + 4 * s) as *const i32).read_unaligned() }
}

/// # Safety
/// The CPU has AVX-512 F/BW/VL and VNNI.
pub(super) unsafe fn vnni(p: &Panels, np: usize, mut tile: Tile) {
    check(p, &tile, tile.sx.len(), np);
    let t = &mut tile;
    // SAFETY: the caller's CPU features; `check` the bounds every tile size relies on.
    unsafe {
        match (t.sx.len(), np) {
            (4, 4) => vnni_tile::<4, 4>(p, t),
            (4, 3) => vnni_tile::<4, 3>(p, t),
            (4, 2) => vnni_tile::<4, 2>(p, t),
            (4, 1) => vnni_tile::<4, 1>(p, t),
            (3, 4) => vnni_tile::<3, 4>(p, t),
            (3, 3) => vnni_tile::<3, 3>(p, t),
            (3, 2) => vnni_tile::<3, 2>(p, t),
            (3, 1) => vnni_tile::<3, 1>(p, t),
            (2, 4) => vnni_tile::<2, 4>(p, t),
            (2, 3) => vnni_tile::<2, 3>(p, t),
            (2, 2) => vnni_tile::<2, 2>(p, t),
            (2, 1) => vnni_tile::<2, 1>(p, t),
            (1, 4) => vnni_tile::<1, 4>(p, t),
            (1, 3) => vnni_tile::<1, 3>(p, t),
            (1, 2) => vnni_tile::<1, 2>(p, t),
            (1, 1) => vnni_tile::<1, 1>(p, t),
            _ => unreachable!("tiles are 1–4 rows × 1–4 panels"),
        }
    }
}

/// `vpdpbusd` multiplies unsigned by signed bytes and adds four products into each i32 lane
/// without saturating: activations come offset by +128 (their top bit flipped by the caller)
/// and the panel's bias, −128·Σw per group, starts each accumulator so the offset cancels.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn vnni_tile<const R: usize, const N: usize>(p: &Panels, t: &mut Tile) {
    let (quads, gq, groups) = (p.quads, p.group_quads, p.groups);
    let w = p.bytes.as_ptr() as *const i8;
    let mut f = [[_mm512_setzero_ps(); N]; R];
    for g in 0..groups {
        let mut acc = [[_mm512_setzero_si512(); N]; R];
        for j in 0..N {
            let at = ((t.panel + j) * groups + g) * PANEL;
            // SAFETY: panel + j < count (checked), so at + 16 ≤ bias.len().
            let bias = unsafe { _mm512_loadu_si512(p.bias.as_ptr().add(at) as *const _) };
            for row in acc.iter_mut() {
                row[j] = bias;
            }
        }
        for s in g * gq..(g + 1) * gq {
            let mut wv = [_mm512_setzero_si512(); N];
            for (j, v) in wv.iter_mut().enumerate() {
                // SAFETY: panel + j < count and s < quads: 64 bytes inside `bytes`.
                *v = unsafe { _mm512_loadu_si512(w.add(64 * ((t.panel + j) * quads + s)) as *const _) };
            }
            for (a, row) in acc.iter_mut().enumerate() {
                // SAFETY: a < R rows and s < quads (checked).
                let xb = _mm512_set1_epi32(unsafe { x4(t, a, s) });
                for (c, v) in row.iter_mut().zip(&wv) {
                    *c = _mm512_dpbusd_epi32(*c, xb, *v);
                }
            }
        }
        for j in 0..N {
            let at = ((t.panel + j) * groups + g) * PANEL;
            // SAFETY: as for the bias.
            let sc = unsafe { _mm512_loadu_ps(p.scales.as_ptr().add(at)) };
            for (fr, ar) in f.iter_mut().zip(&acc) {
                fr[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ar[j]), sc, fr[j]);
            }
        }
    }
    for (a, fr) in f.iter().enumerate() {
        let sx = _mm512_set1_ps(t.sx[a]);
        for (j, v) in fr.iter().enumerate() {
            let left = t.valid.saturating_sub(PANEL * j).min(PANEL);
            if left > 0 {
                let mask = ((1u32 << left) - 1) as u16;
                // SAFETY: (a, col + 16j + c) for c < left is inside `out` and `base` (checked).
                unsafe {
                    let off = a * t.ldo + t.col + PANEL * j;
                    let mut y = _mm512_mul_ps(*v, sx);
                    if let Some(b) = t.base {
                        y = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, b.as_ptr().add(off)), y);
                    }
                    _mm512_mask_storeu_ps(t.out.as_mut_ptr().add(off) as *mut f32, mask, y);
                }
            }
        }
    }
}

/// # Safety
/// The CPU has AVX2 and FMA.
pub(super) unsafe fn avx2(p: &Panels, mut tile: Tile) {
    check(p, &tile, tile.sx.len(), 1);
    let t = &mut tile;
    // SAFETY: the caller's CPU features; `check` the bounds.
    unsafe {
        match (t.sx.len(), p.narrow) {
            (4, false) => avx2_tile::<4, false>(p, t),
            (3, false) => avx2_tile::<3, false>(p, t),
            (2, false) => avx2_tile::<2, false>(p, t),
            (1, false) => avx2_tile::<1, false>(p, t),
            (4, true) => avx2_tile::<4, true>(p, t),
            (3, true) => avx2_tile::<3, true>(p, t),
            (2, true) => avx2_tile::<2, true>(p, t),
            (1, true) => avx2_tile::<1, true>(p, t),
            _ => unreachable!("tiles are 1–4 rows"),
        }
    }
}

/// A tile of R rows × one panel: per scale group, the exact i32 sums ([`wide_sums`], or
/// [`narrow_sums`] when every weight lies in −8..=8), then scaled into float sums.
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_tile<const R: usize, const NARROW: bool>(p: &Panels, t: &mut Tile) {
    let groups = p.groups;
    let mut f = [[_mm256_setzero_ps(); 2]; R];
    for g in 0..groups {
        // SAFETY: g < groups; the caller's bounds (checked) for the panel and the rows.
        let acc = unsafe {
            if NARROW {
                narrow_sums::<R>(p, t, g)
            } else {
                wide_sums::<R>(p, t, g)
            }
        };
        let at = (t.panel * groups + g) * PANEL;
        // SAFETY: panel < count, so at + 16 ≤ scales.len().
        let sc =
            unsafe { [_mm256_loadu_ps(p.scales.as_ptr().add(at)), _mm256_loadu_ps(p.scales.as_ptr().add(at + 8))] };
        for (fr, ar) in f.iter_mut().zip(&acc) {
            for h in 0..2 {
                fr[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ar[h]), sc[h], fr[h]);
            }
        }
    }
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (a, fr) in f.iter().enumerate() {
        let sx = _mm256_set1_ps(t.sx[a]);
        for (h, v) in fr.iter().enumerate() {
            let left = t.valid.saturating_sub(8 * h).min(8);
            // SAFETY: (a, col + 8h + c) for c < left is inside `out` and `base` (checked); a
            // partial half's mask keeps the loads and the store to those lanes.
            unsafe {
                let off = a * t.ldo + t.col + 8 * h;
                let at = t.out.as_mut_ptr().add(off) as *mut f32;
                let y = _mm256_mul_ps(*v, sx);
                if left == 8 {
                    // Whole halves by plain moves: AMD cores run `vmaskmovps` as a slow
                    // microcoded sequence, which cost a quarter of a tile's time on Zen 4.
                    let y = match t.base {
                        Some(b) => _mm256_add_ps(_mm256_loadu_ps(b.as_ptr().add(off)), y),
                        None => y,
                    };
                    _mm256_storeu_ps(at, y);
                } else if left > 0 {
                    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(left as i32), lane);
                    let y = match t.base {
                        Some(b) => _mm256_add_ps(_mm256_maskload_ps(b.as_ptr().add(off), mask), y),
                        None => y,
                    };
                    _mm256_maskstore_ps(at, mask, y);
                }
            }
        }
    }
}

/// Group g's i32 sums of R rows × one panel, any i8 weights. `vpmaddubsw` multiplies unsigned
/// by signed bytes into saturating i16 pairs: |x| goes in as the unsigned side and x's sign
/// moves onto w; a pair sums to at most 2·127·127 < 2¹⁵ (no −128 anywhere), so nothing
/// saturates, and `vpmaddwd` by ones widens the pairs to i32 every step.
///
/// # Safety
/// The CPU has AVX2; g < groups and the tile's bounds hold ([`check`]).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn wide_sums<const R: usize>(p: &Panels, t: &Tile, g: usize) -> [[__m256i; 2]; R] {
    let (quads, gq) = (p.quads, p.group_quads);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    for s in g * gq..(g + 1) * gq {
        // SAFETY: panel < count and s < quads: 64 bytes inside `bytes`.
        let base = unsafe { p.bytes.as_ptr().add(t.panel * quads + s) as *const i8 };
        let wv = unsafe { [_mm256_loadu_si256(base as *const _), _mm256_loadu_si256(base.add(32) as *const _)] };
        for (a, row) in acc.iter_mut().enumerate() {
            // SAFETY: a < R rows and s < quads (checked).
            let xb = _mm256_set1_epi32(unsafe { x4(t, a, s) });
            let ax = _mm256_abs_epi8(xb);
            for (c, v) in row.iter_mut().zip(&wv) {
                let pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(*v, xb));
                *c = _mm256_add_epi32(*c, _mm256_madd_epi16(pairs, ones));
            }
        }
    }
    acc
}

/// [`wide_sums`] for weights in −8..=8 (INT4's): activations offset by +128 (top bit flipped)
/// go in whole as the unsigned side of `vpmaddubsw`, the panel's bias cancelling the offset as
/// in the VNNI kernel; a pair is then at most 2·255·8 = 4080, so eight steps of pairs sum in
/// i16 lanes without overflow and widen to i32 once, not every step: per row and step, two
/// instructions a half instead of four. The same integer sums, so the same results.
///
/// # Safety
/// As [`wide_sums`], and every weight of the panels lies in −8..=8 (`Panels::narrow`).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn narrow_sums<const R: usize>(p: &Panels, t: &Tile, g: usize) -> [[__m256i; 2]; R] {
    /// Steps summed in i16 before widening: 8 × 4080 < 2¹⁵.
    const RUN: usize = 8;
    let (quads, gq) = (p.quads, p.group_quads);
    let (ones, flip) = (_mm256_set1_epi16(1), _mm256_set1_epi8(-128));
    let at = (t.panel * p.groups + g) * PANEL;
    // SAFETY: panel < count, so at + 16 ≤ bias.len().
    let bias = unsafe {
        let b = p.bias.as_ptr().add(at);
        [_mm256_loadu_si256(b as *const _), _mm256_loadu_si256(b.add(8) as *const _)]
    };
    let mut acc = [bias; R];
    let (first, end) = (g * gq, (g + 1) * gq);
    for run in (first..end).step_by(RUN) {
        let mut pairs = [[_mm256_setzero_si256(); 2]; R];
        for s in run..(run + RUN).min(end) {
            // SAFETY: panel < count and s < quads: 64 bytes inside `bytes`.
            let base = unsafe { p.bytes.as_ptr().add(t.panel * quads + s) as *const i8 };
            let wv = unsafe { [_mm256_loadu_si256(base as *const _), _mm256_loadu_si256(base.add(32) as *const _)] };
            for (a, row) in pairs.iter_mut().enumerate() {
                // SAFETY: a < R rows and s < quads (checked).
                let xu = _mm256_xor_si256(_mm256_set1_epi32(unsafe { x4(t, a, s) }), flip);
                for (c, v) in row.iter_mut().zip(&wv) {
                    *c = _mm256_add_epi16(*c, _mm256_maddubs_epi16(xu, *v));
                }
            }
        }
        for (ar, pr) in acc.iter_mut().zip(&pairs) {
            for h in 0..2 {
                ar[h] = _mm256_add_epi32(ar[h], _mm256_madd_epi16(pr[h], ones));
            }
        }
    }
    acc
}

#[target_feature(enable = "avx2")]
/// [`super::quantize_row`] with AVX2.
///
/// # Safety
/// The CPU has AVX2; `x.len()` is a multiple of 8 and `out` at least as long.
pub(super) unsafe fn quantize_row_avx2(x: &[f32], out: &mut [i8]) -> f32 {
    let n = x.len().min(out.len());
    let p = x.as_ptr();
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    // Four running maxima, so each max waits on the one four loads back, not the last.
    let mut m = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, mj) in m.iter_mut().enumerate() {
            // SAFETY: i + 32 ≤ n.
            *mj = _mm256_max_ps(*mj, _mm256_and_ps(unsafe { _mm256_loadu_ps(p.add(i + 8 * j)) }, abs_mask));
        }
        i += 32;
    }
    while i < n {
        // SAFETY: i + 8 ≤ n (n is a multiple of 8).
        m[0] = _mm256_max_ps(m[0], _mm256_and_ps(unsafe { _mm256_loadu_ps(p.add(i)) }, abs_mask));
        i += 8;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds eight f32.
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])))
    };
    let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
    let scale = amax / 127.0;
    let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    let mut i = 0;
    // 32 values at a time: i32 → i16 → i8 with saturating packs (which interleave 128-bit
    // lanes; the permute puts them back in order), then −128 raised to −127.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let low = _mm256_set1_epi8(-127);
    while i + 32 <= n {
        // SAFETY: i + 32 ≤ n ≤ x.len(), out.len().
        let q =
            [0, 1, 2, 3].map(|j| _mm256_cvtps_epi32(_mm256_mul_ps(unsafe { _mm256_loadu_ps(p.add(i + 8 * j)) }, inv)));
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let v = _mm256_max_epi8(_mm256_permutevar8x32_epi32(packed, order), low);
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, v) };
        i += 32;
    }
    let mut q = [0i32; 8];
    while i < n {
        // cvtps rounds half to even (the default MXCSR mode), as the portable path does.
        let v = _mm256_cvtps_epi32(_mm256_mul_ps(unsafe { _mm256_loadu_ps(p.add(i)) }, inv));
        // SAFETY: `q` holds eight i32.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, v) };
        for (o, &v) in out[i..i + 8].iter_mut().zip(&q) {
            *o = v.clamp(-127, 127) as i8;
        }
        i += 8;
    }
    scale
}

/// [`super::quantize_row`] with AVX-512: 16 values per vector, narrowed with saturation
/// (`vpmovsdb`) in one instruction.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; `x.len()` is a multiple of 16 and `out` at least as long.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quantize_row_avx512(x: &[f32], out: &mut [i8]) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let mut m = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, mj) in m.iter_mut().enumerate() {
            // SAFETY: i + 64 ≤ n.
            *mj = _mm512_max_ps(*mj, _mm512_abs_ps(unsafe { _mm512_loadu_ps(p.add(i + 16 * j)) }));
        }
        i += 64;
    }
    while i < n {
        // SAFETY: i + 16 ≤ n (n is a multiple of 16).
        m[0] = _mm512_max_ps(m[0], _mm512_abs_ps(unsafe { _mm512_loadu_ps(p.add(i)) }));
        i += 16;
    }
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])));
    let scale = amax / 127.0;
    let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    let low = _mm_set1_epi8(-127);
    for i in (0..n).step_by(16) {
        // cvtps rounds half to even (the default MXCSR mode), as the portable path does.
        // SAFETY: i + 16 ≤ n ≤ out.len().
        let v = _mm512_cvtps_epi32(_mm512_mul_ps(unsafe { _mm512_loadu_ps(p.add(i)) }, inv));
        unsafe {
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, _mm_max_epi8(_mm512_cvtsepi32_epi8(v), low))
        };
    }
    scale
}
