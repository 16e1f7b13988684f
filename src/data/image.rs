//! Image decoding and the test transform: PIL-compatible bilinear resize, ToTensor, Normalize.
//!
//! The resize is a port of Pillow's `ImagingResample` for 8-bit images (Resample.c): separable,
//! two passes each rounded to u8; a triangle filter whose support grows with
//! the downscaling factor (antialiasing), coefficients normalised per output pixel and converted to
//! 22-bit fixed point, accumulation rounded by adding half and shifting. torchvision's `Resize`
//! calls exactly this through `PIL.Image.resize(size, BILINEAR)`.

use std::path::Path;

use image::RgbImage;

use crate::error::{Error, Result};

/// ImageNet normalisation (torchvision's Normalize in the test and train transforms).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Decodes a JPEG or PNG (format sniffed from the content) to RGB, as PIL's `convert('RGB')`.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path).map_err(|e| Error::io(path, e))?;
    let reader = reader.with_guessed_format().map_err(|e| Error::io(path, e))?;
    let img = reader.decode().map_err(|e| Error::msg(format!("{}: cannot decode image: {e}", path.display())))?;
    Ok(img.to_rgb8())
}

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel along one axis: the first input index and the fixed-point weights of the
/// inputs from there on.
struct AxisCoeffs {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` with the bilinear (triangle) filter, then
/// `normalize_coeffs_8bpc`.
fn axis_coeffs(in_size: usize, out_size: usize) -> AxisCoeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the triangle filter's support is 1
    let inv = 1.0 / filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) truncates toward zero; the clamps make both bounds non-negative.
        let xmin = ((center - support + 0.5).trunc().max(0.0)) as usize;
        let xmax = ((center + support + 0.5).trunc() as usize).min(in_size);
        let w: Vec<f64> = (xmin..xmax).map(|x| (1.0 - ((x as f64 - center + 0.5) * inv).abs()).max(0.0)).collect();
        let total: f64 = w.iter().sum();
        let fixed = w
            .iter()
            .map(|&v| {
                let v = if total != 0.0 { v / total } else { v };
                let scaled = v * (1u32 << PRECISION_BITS) as f64;
                (if scaled < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
            })
            .collect();
        start.push(xmin);
        weights.push(fixed);
    }
    AxisCoeffs { start, weights }
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One output pixel: the weighted sum of `count` RGB pixels starting at byte `first`, `step`
/// bytes apart, rounded as Pillow does.
fn weighted_pixel(src: &[u8], first: usize, step: usize, weights: &[i32], out: &mut [u8]) {
    let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
    for (k, &wk) in weights.iter().enumerate() {
        let p = first + k * step;
        for ch in 0..3 {
            acc[ch] += src[p + ch] as i32 * wk;
        }
    }
    for ch in 0..3 {
        out[ch] = clip8(acc[ch]);
    }
}

/// Resamples each of `h` rows of `w_in` pixels to `w_out` pixels.
fn horizontal_pass(src: &[u8], w_in: usize, h: usize, w_out: usize) -> Vec<u8> {
    let c = axis_coeffs(w_in, w_out);
    let mut out = vec![0u8; 3 * w_out * h];
    for y in 0..h {
        for x in 0..w_out {
            let q = 3 * (y * w_out + x);
            weighted_pixel(src, 3 * (y * w_in + c.start[x]), 3, &c.weights[x], &mut out[q..q + 3]);
        }
    }
    out
}

/// Resamples each of `w` columns of `h_in` pixels to `h_out` pixels.
fn vertical_pass(src: &[u8], w: usize, h_in: usize, h_out: usize) -> Vec<u8> {
    let c = axis_coeffs(h_in, h_out);
    let mut out = vec![0u8; 3 * w * h_out];
    for y in 0..h_out {
        for x in 0..w {
            let q = 3 * (y * w + x);
            weighted_pixel(src, 3 * (c.start[y] * w + x), 3 * w, &c.weights[y], &mut out[q..q + 3]);
        }
    }
    out
}

/// PIL's `Image.resize((width, height), Image.BILINEAR)` of an RGB image. Like Pillow 13, the
/// vertical pass runs first when the height shrinks by more than twice as many pixels as the width
/// (Pillow 12 and older always ran the horizontal pass first; the two orders differ by at most one
/// grey level in some pixels, and only for such shapes).
pub fn resize_bilinear_pil(img: &RgbImage, height: u32, width: u32) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let (w1, h1) = (width as usize, height as usize);
    let shrink_h = h0 as i64 - h1 as i64;
    let horizontal_first = !(shrink_h > 0 && shrink_h > (w0 as i64 - w1 as i64) * 2);
    let mut data = img.as_raw().clone();
    if horizontal_first {
        if w1 != w0 {
            data = horizontal_pass(&data, w0, h0, w1);
        }
        if h1 != h0 {
            data = vertical_pass(&data, w1, h0, h1);
        }
    } else {
        data = vertical_pass(&data, w0, h0, h1);
        if w1 != w0 {
            data = horizontal_pass(&data, w0, h1, w1);
        }
    }
    RgbImage::from_raw(width, height, data).expect("both passes produce width x height RGB pixels")
}

/// ToTensor then Normalize: [3, H, W] values (x / 255 - mean) / std.
pub fn normalize_chw(img: &RgbImage) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0.0; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * h * w + i] = (p[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// The test transform of one file: decode, resize to height x width, normalise; [3, H, W].
pub fn load_test_image(path: &Path, height: u32, width: u32) -> Result<Vec<f32>> {
    let img = load_rgb(path)?;
    Ok(normalize_chw(&resize_bilinear_pil(&img, height, width)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32, pixels: &[[u8; 3]]) -> RgbImage {
        RgbImage::from_raw(w, h, pixels.concat()).unwrap()
    }

    /// The test pattern also drawn with PIL for the reference values below.
    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([((x * 37 + y * 91) % 256) as u8, ((x * 11 + y * 53 + 7) % 256) as u8, ((x * x * 3 + y * 5 + 100) % 256) as u8])
        })
    }

    #[test]
    fn upscale_by_two_interpolates_at_quarter_positions() {
        // Output centres fall at input coordinates 0.25 and 0.75 between the two pixels, so the
        // inner outputs are 1/4 and 3/4 of the way (63.75 -> 64, 191.25 -> 191); the outer ones
        // only see one pixel inside the image and keep it.
        let img = image(2, 1, &[[0, 0, 0], [255, 100, 10]]);
        let out = resize_bilinear_pil(&img, 1, 4);
        assert_eq!(out.as_raw(), &[0, 0, 0, 64, 25, 3, 191, 75, 8, 255, 100, 10]);
        // Vertically the same.
        let out = resize_bilinear_pil(&image(1, 2, &[[0, 0, 0], [255, 100, 10]]), 4, 1);
        assert_eq!(out.as_raw(), &[0, 0, 0, 64, 25, 3, 191, 75, 8, 255, 100, 10]);
    }

    #[test]
    fn downscale_widens_the_filter() {
        // 4 -> 2: support 2, triangle weights 3/7, 3/7, 1/7 at centres 1 and 3: (3*0 + 3*70 +
        // 140)/7 = 50 and (70 + 3*140 + 3*210)/7 = 160. Plain two-tap bilinear would give 35, 175.
        let img = image(4, 1, &[[0, 0, 0], [70, 1, 2], [140, 3, 4], [210, 5, 6]]);
        assert_eq!(resize_bilinear_pil(&img, 1, 2).as_raw(), &[50, 1, 1, 160, 4, 5]);
    }

    #[test]
    fn matches_pillow_on_a_pattern() {
        // Pillow 13.0: Image.resize(size, Image.BILINEAR) of `pattern(7, 5)`.
        let to_3x4: [u8; 36] = [
            55, 29, 105, 130, 53, 131, 163, 77, 182, 138, 91, 111, 131, 115, 137, 95, 139, 188, 95, 153, 117, 96, 177, 143, 169, 201, 194,
            117, 215, 123, 140, 183, 149, 83, 71, 200,
        ];
        let to_7x2: [u8; 42] = [
            79, 60, 105, 116, 71, 108, 95, 82, 117, 132, 93, 132, 169, 104, 153, 101, 115, 180, 138, 126, 213, 87, 166, 115, 124, 177, 118,
            103, 188, 127, 140, 199, 142, 95, 129, 163, 121, 140, 190, 158, 151, 223,
        ];
        let img = pattern(7, 5);
        assert_eq!(resize_bilinear_pil(&img, 4, 3).as_raw().as_slice(), &to_3x4);
        assert_eq!(resize_bilinear_pil(&img, 2, 7).as_raw().as_slice(), &to_7x2);
        assert_eq!(resize_bilinear_pil(&img, 5, 7), img);
    }

    #[test]
    fn tall_shrink_runs_the_vertical_pass_first() {
        // Pillow 13: `pattern(5, 13)` to 6x4; the height shrinks by 9 > 2 * (5 - 6), so the
        // vertical pass comes first (horizontal-first rounding gives different pixels here).
        let want: [u8; 72] = [
            83, 83, 107, 111, 91, 109, 104, 100, 115, 107, 110, 125, 136, 116, 139, 156, 117, 155, 110, 121, 122, 138, 129, 124, 119, 138,
            130, 114, 148, 140, 124, 139, 154, 88, 95, 170, 128, 133, 138, 156, 141, 140, 137, 150, 146, 132, 140, 156, 142, 123, 170, 106,
            131, 186, 145, 102, 153, 109, 110, 155, 113, 119, 161, 139, 113, 171, 154, 101, 185, 133, 109, 201,
        ];
        assert_eq!(resize_bilinear_pil(&pattern(5, 13), 4, 6).as_raw().as_slice(), &want);
    }

    #[test]
    fn normalize_is_chw_with_imagenet_statistics() {
        let img = pattern(3, 2);
        let t = normalize_chw(&img);
        assert_eq!(t.len(), 18);
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                let want = (p[c] as f64 / 255.0 - MEAN[c] as f64) / STD[c] as f64;
                let got = t[c * 6 + y as usize * 3 + x as usize] as f64;
                assert!((got - want).abs() < 1e-6 * want.abs().max(1.0), "{got} vs {want}");
            }
        }
    }
}
