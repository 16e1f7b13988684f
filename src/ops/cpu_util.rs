//! Reductions shared by the CPU kernels. Each keeps independent lane accumulators: a single running
//! float sum cannot be reordered by the compiler, so it would not vectorise.

use std::mem::MaybeUninit;

const LANES: usize = 8;
/// f64 accumulators of the f64 reductions: 16 (four AVX2 registers per sum) keep enough additions
/// in flight to hide the add latency; with 8 the statistics passes of BatchNorm were add-bound.
const F64_LANES: usize = 16;

/// A vector of `len` values that `f` writes into uninitialised memory. Outputs are not zeroed
/// first: for a bandwidth-bound kernel a zero fill is one more pass over memory, a third of its
/// time.
///
/// # Safety
/// `f` must write every element of the slice it is given.
pub(crate) unsafe fn written_vec(len: usize, f: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    f(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's contract: f initialised all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// `out` = `src` (same length); `MaybeUninit::write_copy_of_slice` is newer than the crate's MSRV.
pub(crate) fn write_copy(out: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(out.len(), src.len(), "write_copy: lengths differ");
    out.iter_mut().zip(src).for_each(|(o, &v)| _ = o.write(v));
}

/// Views memory about to be overwritten as f32, for writers that take `&mut [f32]` (the GEMM
/// with `accumulate` false, `copy_from_slice`).
///
/// # Safety
/// Nothing may read an element of the returned slice before it is written.
pub(crate) unsafe fn assume_written(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller writes before reading.
    unsafe { &mut *(s as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Defines `fn` whose body is compiled twice: for AVX2 + FMA, taken when the CPU has them, and for
/// the crate's baseline target (x86-64 means SSE2 only, four f32 lanes instead of eight).
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use avx2_dispatch;

avx2_dispatch! {
    /// Sum of `a`, accumulated in f64.
    pub(crate) fn sum_f64(a: &[f32]) -> f64 {
        let (chunks, rest) = a.as_chunks::<F64_LANES>();
        let mut acc = [0f64; F64_LANES];
        for c in chunks {
            let c = c.map(f64::from);
            for l in 0..F64_LANES {
                acc[l] += c[l];
            }
        }
        acc.iter().sum::<f64>() + rest.iter().map(|&v| v as f64).sum::<f64>()
    }
}

avx2_dispatch! {
    /// (sum of `a`, dot product of `a` and `b`), accumulated in f64. `b == a` gives the sum of squares.
    pub(crate) fn sum_dot_f64(a: &[f32], b: &[f32]) -> (f64, f64) {
        assert_eq!(a.len(), b.len(), "sum_dot_f64: lengths differ");
        let (ca, ra) = a.as_chunks::<F64_LANES>();
        let (cb, rb) = b.as_chunks::<F64_LANES>();
        let mut s = [0f64; F64_LANES];
        let mut d = [0f64; F64_LANES];
        for (x, y) in ca.iter().zip(cb) {
            // Converting whole chunks first and an explicit fused multiply-add vectorise; the
            // element-wise form ran 5x slower. The f64 product of two f32 is exact, so the fused
            // form rounds exactly as `d + x * y` (without FMA hardware it is a slow library call).
            let (x, y) = (x.map(f64::from), y.map(f64::from));
            for l in 0..F64_LANES {
                s[l] += x[l];
                d[l] = x[l].mul_add(y[l], d[l]);
            }
        }
        let (mut s_all, mut d_all) = (s.iter().sum::<f64>(), d.iter().sum::<f64>());
        for (&x, &y) in ra.iter().zip(rb) {
            s_all += x as f64;
            d_all += x as f64 * y as f64;
        }
        (s_all, d_all)
    }
}

avx2_dispatch! {
    /// Dot product of `a` and `b` in f32 (the precision of the GEMMs it sits beside).
    pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot_f32: lengths differ");
        const W: usize = 2 * LANES;
        let (ca, ra) = a.as_chunks::<W>();
        let (cb, rb) = b.as_chunks::<W>();
        let mut acc = [0f32; W];
        for (x, y) in ca.iter().zip(cb) {
            for l in 0..W {
                // Fused: one vector FMA per lane group (a separate multiply and add ran far slower).
                acc[l] = x[l].mul_add(y[l], acc[l]);
            }
        }
        acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn reductions_match_f64_loops() {
        let mut rng = Rng::new(11);
        for len in [0, 1, 7, 8, 9, 31, 64, 1000] {
            let a: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
            let s: f64 = a.iter().map(|&v| v as f64).sum();
            let d: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((sum_f64(&a) - s).abs() < 1e-12 * (1.0 + s.abs()), "sum, len {len}");
            let (s2, d2) = sum_dot_f64(&a, &b);
            assert!((s2 - s).abs() < 1e-12 * (1.0 + s.abs()) && (d2 - d).abs() < 1e-12 * (1.0 + d.abs()), "sum_dot, len {len}");
            let scale = a.iter().zip(&b).map(|(&x, &y)| (x as f64 * y as f64).abs()).sum::<f64>();
            assert!((dot_f32(&a, &b) as f64 - d).abs() <= 1e-6 * (1.0 + scale), "dot_f32, len {len}");
        }
    }
}
