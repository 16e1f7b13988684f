//! Row-major single-precision matrix products on the CPU, through the `gemm` crate (the GEMM
//! behind candle's CPU backend: packed, vectorised micro-kernels and rayon threading).

use gemm::Parallelism;

/// C = op(A) op(B) (or C += ..., with `accumulate`), all row-major.
///
/// op(A) is m x k: A is stored [m, k], or [k, m] when `trans_a`. op(B) is k x n: B is stored
/// [k, n], or [n, k] when `trans_b`. C is [m, n]. `parallel` lets the product use every rayon
/// thread; pass false when already inside a parallel loop.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "sgemm: buffers too small for {m}x{k} * {k}x{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    let par = if parallel && m * n * k >= 1 << 15 { Parallelism::Rayon(rayon::current_num_threads()) } else { Parallelism::None };
    // SAFETY: the asserts above bound every index the strides reach; c does not alias a or b
    // (it is a distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f32> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    c[i * n + j] += av as f64 * bv as f64;
                }
            }
        }
        c.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn matches_naive_for_all_transposes() {
        let mut rng = Rng::new(3);
        for &(m, n, k) in &[(1, 1, 1), (5, 7, 3), (33, 65, 17), (64, 128, 96)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
            for &(ta, tb) in &[(false, false), (true, false), (false, true), (true, true)] {
                let want = naive(m, n, k, &a, ta, &b, tb);
                let mut c = vec![1.0f32; m * n];
                sgemm(m, n, k, &a, ta, &b, tb, &mut c, false, true);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m}x{n}x{k} ta={ta} tb={tb}: {x} vs {y}");
                }
                sgemm(m, n, k, &a, ta, &b, tb, &mut c, true, false);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - 2.0 * y).abs() <= 2e-4 * (1.0 + y.abs()), "accumulate: {x} vs {}", 2.0 * y);
                }
            }
        }
    }
}
