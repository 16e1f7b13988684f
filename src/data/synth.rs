//! A synthetic re-ID dataset: procedurally drawn people seen by several cameras, written in the
//! Market-1501 layout (`bounding_box_train`, `query`, `bounding_box_test`, names such as
//! `0002_c1s1_000451_03.jpg`) at Market's 128x64, so the whole pipeline can be trained and
//! evaluated without downloading anything.
//!
//! Each identity has its own clothing colours (shirt, trousers, shoes), shirt pattern (plain,
//! stripes, checks), sleeve and trouser length, proportions, hair colour and accessories (hat,
//! bag). Each camera has its own lighting, colour cast, background, viewpoint (mirror, shear),
//! scale, blur, noise and occlusion rate, so matching across cameras is learnable but not trivial.
//! Half the identities train; each test identity gives one query per camera it appears in and the
//! rest of its images go to the gallery. Optional pid-0 distractors (people seen nowhere else) join
//! the gallery. The output depends only on the configuration and seed.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rayon::prelude::*;
use serde::Serialize;

use super::dataset::{GALLERY_DIR, QUERY_DIR, TRAIN_DIR};
use super::loader::derive_seed;
use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Clone, Debug, Serialize)]
pub struct SynthConfig {
    /// Identities (pids 1..=ids), half for training, half for testing.
    pub ids: usize,
    /// Cameras 1..=cameras (at most 9; Market-1501's loader accepts at most 6, `custom` up to 9).
    pub cameras: usize,
    pub images_per_id: usize,
    /// Extra pid-0 gallery images of people that appear nowhere else.
    pub distractors: usize,
    pub seed: u64,
    pub height: u32,
    pub width: u32,
    pub jpeg_quality: u8,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig { ids: 60, cameras: 4, images_per_id: 12, distractors: 0, seed: 0, height: 128, width: 64, jpeg_quality: 90 }
    }
}

/// What `generate` wrote; also saved as `synth.json` next to the three folders.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SynthSummary {
    pub train_ids: usize,
    pub train_images: usize,
    pub query_ids: usize,
    pub query_images: usize,
    /// Identities in the gallery, pid 0 (distractors) included when there are any.
    pub gallery_ids: usize,
    pub gallery_images: usize,
}

type Color = [f32; 3];

fn hsv(h: f64, s: f64, v: f64) -> Color {
    let h = (h.rem_euclid(1.0)) * 6.0;
    let i = h.floor() as i32;
    let f = h - i as f64;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match i {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [(r * 255.0) as f32, (g * 255.0) as f32, (b * 255.0) as f32]
}

/// A clothing colour: mostly saturated hues, sometimes black / white / grey.
fn cloth(rng: &mut Rng) -> Color {
    if rng.uniform() < 0.25 {
        let v = [0.12, 0.45, 0.9][rng.below(3)] + rng.uniform_range(-0.06, 0.06);
        hsv(0.0, 0.0, v)
    } else {
        hsv(rng.uniform(), rng.uniform_range(0.45, 0.95), rng.uniform_range(0.35, 0.95))
    }
}

fn jitter(c: Color, amount: f64, rng: &mut Rng) -> Color {
    c.map(|x| (x + rng.uniform_range(-amount, amount) as f32).clamp(0.0, 255.0))
}

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    Plain,
    Stripes,
    Checks,
}

struct Appearance {
    skin: Color,
    hair: Color,
    shirt: Color,
    shirt2: Color,
    pattern: Pattern,
    /// Pattern period, in units of person height.
    period: f64,
    long_sleeves: bool,
    trousers: Color,
    /// Where trouser colour ends and skin starts (0.93 = long trousers, ~0.72 = shorts).
    trouser_end: f64,
    shoes: Color,
    /// Person height as a fraction of the image height.
    height: f64,
    /// Body width multiplier.
    build: f64,
    hat: Option<Color>,
    /// (colour, side: +1 right / -1 left in the unmirrored view).
    bag: Option<(Color, f64)>,
}

impl Appearance {
    fn random(rng: &mut Rng) -> Appearance {
        const SKIN: [Color; 5] = [[235., 200., 170.], [210., 165., 125.], [175., 125., 90.], [125., 85., 60.], [90., 60., 45.]];
        const HAIR: [Color; 5] = [[20., 18., 18.], [70., 45., 25.], [150., 110., 60.], [200., 175., 120.], [150., 150., 150.]];
        let skin = jitter(SKIN[rng.below(SKIN.len())], 10.0, rng);
        let hair = jitter(HAIR[rng.below(HAIR.len())], 10.0, rng);
        let shirt = cloth(rng);
        let pattern = [Pattern::Plain, Pattern::Plain, Pattern::Stripes, Pattern::Checks][rng.below(4)];
        Appearance {
            skin,
            hair,
            shirt,
            shirt2: cloth(rng),
            pattern,
            period: rng.uniform_range(0.025, 0.06),
            long_sleeves: rng.uniform() < 0.5,
            trousers: cloth(rng),
            trouser_end: if rng.uniform() < 0.25 { rng.uniform_range(0.68, 0.76) } else { 0.93 },
            shoes: if rng.uniform() < 0.7 { jitter([35., 30., 30.], 15.0, rng) } else { cloth(rng) },
            height: rng.uniform_range(0.78, 0.92),
            build: rng.uniform_range(0.85, 1.2),
            hat: (rng.uniform() < 0.25).then(|| cloth(rng)),
            bag: (rng.uniform() < 0.35).then(|| (cloth(rng), if rng.uniform() < 0.5 { -1.0 } else { 1.0 })),
        }
    }

    /// Colour of the person at (u, v) (v: 0 at the top of the head, 1 at the soles; u: horizontal,
    /// in units of person height, 0 on the body axis), or None outside the person.
    fn at(&self, u: f64, v: f64, leg_gap: f64) -> Option<Color> {
        let b = self.build;
        let shoulder = 0.125 * b - 0.02 * ((v - 0.16) / 0.36).clamp(0.0, 1.0);
        let au = u.abs();
        if let Some((color, side)) = self.bag {
            // A shoulder bag: strap across the torso, bag at the hip on one side.
            let x0 = side * (shoulder + 0.005);
            let (lo, hi) = if side > 0.0 { (x0, x0 + 0.075) } else { (x0 - 0.075, x0) };
            if (0.3..0.5).contains(&v) && (lo..hi).contains(&u) {
                return Some(color);
            }
            let strap_u = -side * shoulder * (1.0 - 2.0 * (v - 0.16) / 0.2);
            if (0.16..0.36).contains(&v) && (u - strap_u).abs() < 0.012 {
                return Some(color);
            }
        }
        if let Some(color) = self.hat {
            if (v < 0.045 && au < 0.065) || ((0.035..0.055).contains(&v) && au < 0.09) {
                return Some(color);
            }
        }
        // Head (hair on top and at the back), neck.
        let (hu, hv) = (u / 0.055, (v - 0.075) / 0.072);
        if hu * hu + hv * hv <= 1.0 {
            return Some(if v < 0.055 { self.hair } else { self.skin });
        }
        if (0.13..0.17).contains(&v) && au < 0.025 {
            return Some(self.skin);
        }
        // Torso.
        if (0.16..0.53).contains(&v) && au < shoulder {
            return Some(match self.pattern {
                Pattern::Plain => self.shirt,
                Pattern::Stripes if ((v / self.period) as i64) % 2 == 1 => self.shirt2,
                Pattern::Checks if (((v / self.period).floor() + (u / self.period).floor()) as i64).rem_euclid(2) == 1 => self.shirt2,
                _ => self.shirt,
            });
        }
        // Arms and hands.
        if (0.17..0.52).contains(&v) && au >= shoulder && au < shoulder + 0.042 * b {
            let sleeve_end = if self.long_sleeves { 0.47 } else { 0.27 };
            return Some(if v < sleeve_end { self.shirt } else { self.skin });
        }
        // Legs and shoes.
        if (0.53..0.955).contains(&v) && au >= leg_gap && au < 0.105 * b {
            return Some(if v < self.trouser_end { self.trousers } else { self.skin });
        }
        if (0.955..1.0).contains(&v) && au >= leg_gap && au < 0.115 * b {
            return Some(self.shoes);
        }
        None
    }
}

enum Background {
    Solid(Color),
    Gradient(Color, Color),
    /// A wall above a tiled floor: (wall, floor, floor line as a fraction of height, tile size px).
    Floor(Color, Color, f64, f64),
}

struct Camera {
    gain: [f32; 3],
    contrast: f32,
    brightness: f32,
    background: Background,
    mirror: bool,
    shear: f64,
    scale: f64,
    noise: f64,
    blur: bool,
    occlusion_p: f64,
}

impl Camera {
    fn random(rng: &mut Rng) -> Camera {
        let dull = |rng: &mut Rng| hsv(rng.uniform(), rng.uniform_range(0.05, 0.35), rng.uniform_range(0.3, 0.85));
        let background = match rng.below(3) {
            0 => Background::Solid(dull(rng)),
            1 => Background::Gradient(dull(rng), dull(rng)),
            _ => Background::Floor(dull(rng), dull(rng), rng.uniform_range(0.55, 0.8), rng.uniform_range(5.0, 12.0)),
        };
        Camera {
            gain: [0; 3].map(|_| rng.uniform_range(0.88, 1.12) as f32),
            contrast: rng.uniform_range(0.8, 1.15) as f32,
            brightness: rng.uniform_range(-25.0, 25.0) as f32,
            background,
            mirror: rng.uniform() < 0.5,
            shear: rng.uniform_range(-0.08, 0.08),
            scale: rng.uniform_range(0.9, 1.05),
            noise: rng.uniform_range(2.0, 8.0),
            blur: rng.uniform() < 0.5,
            occlusion_p: rng.uniform_range(0.1, 0.35),
        }
    }

    fn background(&self, x: f64, y: f64, h: f64, shift: Color) -> Color {
        let c = match self.background {
            Background::Solid(c) => c,
            Background::Gradient(a, b) => {
                let t = (y / h) as f32;
                [0, 1, 2].map(|i| a[i] * (1.0 - t) + b[i] * t)
            }
            Background::Floor(wall, floor, line, tile) => {
                if y < line * h {
                    wall
                } else if (((x / tile).floor() + (y / tile).floor()) as i64).rem_euclid(2) == 0 {
                    floor
                } else {
                    floor.map(|v| v * 0.85)
                }
            }
        };
        [0, 1, 2].map(|i| c[i] + shift[i])
    }
}

/// Draws one image of a person through a camera.
fn render(app: &Appearance, cam: &Camera, rng: &mut Rng, height: u32, width: u32) -> RgbImage {
    let (h, w) = (height as f64, width as f64);
    let person_h = app.height * h * cam.scale * rng.uniform_range(0.93, 1.05);
    let top = (h - person_h) * 0.5 + rng.uniform_range(-0.04, 0.04) * h;
    let cx = w * 0.5 + rng.uniform_range(-0.08, 0.08) * w;
    // The camera's usual viewpoint, sometimes seen the other way round.
    let mirror = cam.mirror ^ (rng.uniform() < 0.2);
    let shear = cam.shear + rng.uniform_range(-0.03, 0.03);
    let leg_gap = rng.uniform_range(0.004, 0.03);
    let bg_shift = [0; 3].map(|_| rng.uniform_range(-15.0, 15.0) as f32);
    let occluder = (rng.uniform() < cam.occlusion_p).then(|| {
        let ow = rng.uniform_range(0.15, 0.5) * w;
        let oh = rng.uniform_range(0.15, 0.4) * h;
        let ox = rng.uniform_range(-0.1 * w, w - 0.5 * ow);
        // Occluders stand on the ground or hang from the side of the frame.
        let oy = if rng.uniform() < 0.7 { h - oh } else { rng.uniform_range(0.0, h - oh) };
        (ox, oy, ow, oh, cloth(rng))
    });

    let mut px = vec![[0f32; 3]; (height * width) as usize];
    for y in 0..height as usize {
        for x in 0..width as usize {
            let (xf, yf) = (x as f64 + 0.5, y as f64 + 0.5);
            let xs = if mirror { w - xf } else { xf };
            let xs = xs - shear * (yf - h * 0.5);
            let (u, v) = ((xs - cx) / person_h, (yf - top) / person_h);
            let mut c = app.at(u, v, leg_gap).unwrap_or_else(|| cam.background(xf, yf, h, bg_shift));
            if let Some((ox, oy, ow, oh, oc)) = occluder {
                if (ox..ox + ow).contains(&xf) && (oy..oy + oh).contains(&yf) {
                    c = oc;
                }
            }
            px[y * width as usize + x] = c;
        }
    }
    if cam.blur {
        px = box_blur(&px, width as usize, height as usize);
    }
    let mut img = RgbImage::new(width, height);
    for (i, p) in img.pixels_mut().enumerate() {
        let c = px[i];
        *p = Rgb([0, 1, 2].map(|k| {
            let lit = (c[k] * cam.gain[k] - 128.0) * cam.contrast + 128.0 + cam.brightness;
            (lit + (rng.normal() * cam.noise) as f32).round().clamp(0.0, 255.0) as u8
        }));
    }
    img
}

/// 3x3 mean filter with clamped borders (a soft, out-of-focus camera).
fn box_blur(px: &[Color], w: usize, h: usize) -> Vec<Color> {
    let mut out = vec![[0f32; 3]; px.len()];
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0f32; 3];
            for dy in [-1isize, 0, 1] {
                for dx in [-1isize, 0, 1] {
                    let yy = (y as isize + dy).clamp(0, h as isize - 1) as usize;
                    let xx = (x as isize + dx).clamp(0, w as isize - 1) as usize;
                    for k in 0..3 {
                        acc[k] += px[yy * w + xx][k];
                    }
                }
            }
            out[y * w + x] = acc.map(|v| v / 9.0);
        }
    }
    out
}

// Seed streams.
const PLAN_STREAM: u64 = 10;
const CAMERA_STREAM: u64 = 11;
const IDENTITY_STREAM: u64 = 12;
const IMAGE_STREAM: u64 = 13;

struct Job {
    pid: usize,
    /// 1-based camera.
    cam: usize,
    /// Index of the image among those of its pid (distractors: among all distractors).
    index: usize,
    dir: &'static str,
}

impl SynthConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::msg(format!("synth: {m}")));
        if !(2..=9999).contains(&self.ids) {
            return bad(format!("--ids {} must be in 2..=9999 (pids are written with 4 digits)", self.ids));
        }
        if !(2..=9).contains(&self.cameras) {
            return bad(format!("--cameras {} must be in 2..=9 (camera numbers are one digit)", self.cameras));
        }
        if self.images_per_id < 4 {
            return bad(format!("--images-per-id {} must be at least 4 (a query and a gallery image in two cameras)", self.images_per_id));
        }
        if self.height < 16 || self.width < 8 {
            return bad(format!("image size {}x{} is too small (at least 16x8)", self.height, self.width));
        }
        Ok(())
    }

    /// Which images exist: pids, cameras, and the folder each goes to.
    fn plan(&self) -> (Vec<Job>, SynthSummary) {
        let mut rng = Rng::new(derive_seed(self.seed, &[PLAN_STREAM]));
        let mut pids: Vec<usize> = (1..=self.ids).collect();
        rng.shuffle(&mut pids);
        let num_train = self.ids - self.ids / 2;
        let mut train = pids[..num_train].to_vec();
        train.sort_unstable();
        let mut test = pids[num_train..].to_vec();
        test.sort_unstable();

        let mut jobs = Vec::new();
        let mut summary = SynthSummary { train_ids: train.len(), query_ids: test.len(), ..Default::default() };
        for (pid, is_train) in train.iter().map(|&p| (p, true)).chain(test.iter().map(|&p| (p, false))) {
            // At least two cameras with at least two images each: every query then has a
            // gallery match in another camera.
            let max_cams = self.cameras.min(self.images_per_id / 2);
            let n_cams = 2 + rng.below(max_cams - 1);
            let mut cams: Vec<usize> = (1..=self.cameras).collect();
            rng.shuffle(&mut cams);
            cams.truncate(n_cams);
            cams.sort_unstable();
            let mut per_cam = vec![2usize; n_cams];
            for _ in 0..self.images_per_id - 2 * n_cams {
                per_cam[rng.below(n_cams)] += 1;
            }
            let mut index = 0;
            for (&cam, &n) in cams.iter().zip(&per_cam) {
                for k in 0..n {
                    let dir = match (is_train, k) {
                        (true, _) => TRAIN_DIR,
                        (false, 0) => QUERY_DIR,
                        (false, _) => GALLERY_DIR,
                    };
                    jobs.push(Job { pid, cam, index, dir });
                    index += 1;
                }
            }
        }
        for index in 0..self.distractors {
            jobs.push(Job { pid: 0, cam: 1 + rng.below(self.cameras), index, dir: GALLERY_DIR });
        }
        summary.train_images = jobs.iter().filter(|j| j.dir == TRAIN_DIR).count();
        summary.query_images = jobs.iter().filter(|j| j.dir == QUERY_DIR).count();
        summary.gallery_images = jobs.iter().filter(|j| j.dir == GALLERY_DIR).count();
        summary.gallery_ids = test.len() + usize::from(self.distractors > 0);
        (jobs, summary)
    }
}

/// Refuses to mix a new dataset into an old one: the three folders must be absent or empty, unless
/// `force`, which deletes the `.jpg` files in them first.
fn prepare_dirs(out: &Path, force: bool) -> Result<()> {
    for sub in [TRAIN_DIR, QUERY_DIR, GALLERY_DIR] {
        let dir = out.join(sub);
        if dir.is_dir() {
            let entries: Vec<PathBuf> =
                std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            if !entries.is_empty() && !force {
                return Err(Error::msg(format!("synth: {} is not empty; choose another --out or pass --force", dir.display())));
            }
            for p in entries.iter().filter(|p| p.extension().is_some_and(|e| e == "jpg")) {
                std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
            }
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    Ok(())
}

/// Writes the dataset under `out` (created if needed) and returns what it wrote.
pub fn generate(cfg: &SynthConfig, out: &Path, force: bool) -> Result<SynthSummary> {
    cfg.validate()?;
    prepare_dirs(out, force)?;
    let (jobs, summary) = cfg.plan();
    let cameras: Vec<Camera> =
        (1..=cfg.cameras).map(|c| Camera::random(&mut Rng::new(derive_seed(cfg.seed, &[CAMERA_STREAM, c as u64])))).collect();
    jobs.par_iter().enumerate().try_for_each(|(frame, job)| -> Result<()> {
        // Distractors are each a different person; real pids share one appearance.
        let who = if job.pid == 0 { [IDENTITY_STREAM, 0, job.index as u64] } else { [IDENTITY_STREAM, job.pid as u64, 0] };
        let app = Appearance::random(&mut Rng::new(derive_seed(cfg.seed, &who)));
        let mut rng = Rng::new(derive_seed(cfg.seed, &[IMAGE_STREAM, job.pid as u64, job.index as u64]));
        let img = render(&app, &cameras[job.cam - 1], &mut rng, cfg.height, cfg.width);
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, cfg.jpeg_quality)
            .encode_image(&img)
            .map_err(|e| Error::msg(format!("synth: JPEG encoding failed: {e}")))?;
        // Market-style name: pid, camera, sequence 1, a frame number unique in the dataset, box 01.
        let path = out.join(job.dir).join(format!("{:04}_c{}s1_{:06}_01.jpg", job.pid, job.cam, frame));
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))
    })?;
    let meta = serde_json::json!({ "config": cfg, "summary": summary });
    let path = out.join("synth.json");
    std::fs::write(&path, serde_json::to_string_pretty(&meta).expect("plain data serialises")).map_err(|e| Error::io(&path, e))?;
    Ok(summary)
}
