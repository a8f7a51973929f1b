//! The toy world: procedurally rendered, captioned scenes small enough for a CPU, where the truth
//! of every image is known. A scene is an object of one of 8 classes with its attributes (two
//! colours, a pattern, a shape variation, a small mark) in one of 10 contexts, optionally with a
//! DreamBench-style property edit (`a red …`, `a shiny …`). Rendering is pure Rust and
//! deterministic in the scene and its seed; 32×32 by default, any size works.
//!
//! A *subject* is one instance (fixed attributes) reserved from pretraining: [`World::pretraining_scene`]
//! never renders it. It comes with reference renders and its own 25 DreamBench-style prompts
//! (20 recontextualisations, 5 property edits).

use serde::{Deserialize, Serialize};

/// Object classes.
pub const CLASSES: [&str; 8] = ["teapot", "backpack", "dog", "cat", "vase", "sneaker", "clock", "robot toy"];

/// Named colours.
pub const COLOURS: [(&str, [u8; 3]); 10] = [
    ("red", [210, 40, 40]),
    ("orange", [240, 140, 30]),
    ("yellow", [240, 210, 40]),
    ("green", [50, 170, 60]),
    ("blue", [40, 80, 210]),
    ("purple", [140, 60, 190]),
    ("pink", [240, 120, 180]),
    ("brown", [130, 80, 40]),
    ("white", [240, 240, 240]),
    ("black", [25, 25, 25]),
];

/// Surface patterns.
pub const PATTERNS: [&str; 4] = ["plain", "striped", "dotted", "checkered"];

/// Small marks on the body.
pub const MARKS: [&str; 4] = ["star", "cross", "ring", "bar"];

/// Contexts, each with two phrasings in DreamBench's prompt shapes.
pub const CONTEXTS: [(&str, [&str; 2]); 10] = [
    ("beach", ["on the beach", "on the sand by the sea"]),
    ("snow", ["in the snow", "on a snowy field"]),
    ("grass", ["on top of green grass", "on a green lawn"]),
    ("city", ["on a city street", "on the pavement of a city"]),
    ("night", ["with a night sky in the background", "under a starry night sky"]),
    ("desert", ["in the desert", "on desert dunes"]),
    ("forest", ["in the forest", "among the trees of a forest"]),
    ("water", ["floating on top of water", "floating on a lake"]),
    ("wood", ["on top of a wooden floor", "on wooden planks"]),
    ("fabric", ["on top of pink fabric", "on a pink blanket"]),
];

/// DreamBench-style property edits.
pub const EDITS: [&str; 5] = ["red", "purple", "shiny", "wet", "cube shaped"];

/// One object instance: what makes a subject that subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Instance {
    /// Index into [`CLASSES`].
    pub class: usize,
    /// Index into [`COLOURS`].
    pub primary: usize,
    /// Index into [`COLOURS`] (≠ primary).
    pub secondary: usize,
    /// Index into [`PATTERNS`].
    pub pattern: usize,
    /// Shape variation in `0..4` (width/height proportions).
    pub shape: usize,
    /// Index into [`MARKS`].
    pub mark: usize,
}

/// A scene: an instance in a context, perhaps edited, laid out by `seed`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    /// The object.
    pub instance: Instance,
    /// Index into [`CONTEXTS`].
    pub context: usize,
    /// Index into [`EDITS`], if edited.
    pub edit: Option<usize>,
    /// Which phrasing of the context the caption uses (0 or 1).
    pub phrasing: usize,
    /// Layout seed (position, size, background details).
    pub seed: u64,
}

/// A tiny deterministic generator (SplitMix64) for layouts.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mix(a: [u8; 3], b: [u8; 3], t: f32) -> [u8; 3] {
    std::array::from_fn(|i| (a[i] as f32 * (1.0 - t) + b[i] as f32 * t).round().clamp(0.0, 255.0) as u8)
}

/// The background colour of a context at `(u, v)` in `[0, 1)²` (v grows downwards).
fn background(context: usize, u: f32, v: f32, rng_seed: u64) -> [u8; 3] {
    let h = |x: f32, y: f32| {
        let n = ((x * 97.0).floor() as u64).wrapping_mul(0x9E37).wrapping_add((y * 89.0).floor() as u64)
            ^ rng_seed;
        (Mix(n).next() % 1000) as f32 / 1000.0
    };
    match CONTEXTS[context].0 {
        "beach" if v < 0.45 => mix([120, 190, 240], [170, 220, 250], v / 0.45),
        "beach" if v < 0.55 => [40, 110, 190],
        "beach" => mix([230, 205, 150], [210, 180, 120], h(u, v) * 0.5),
        "snow" if v < 0.4 => [180, 185, 195],
        "snow" => {
            if h(u, v) > 0.97 {
                [255, 255, 255]
            } else {
                [235, 240, 248]
            }
        }
        "grass" if v < 0.4 => [140, 200, 245],
        "grass" => mix([60, 150, 50], [90, 180, 60], h(u, v)),
        "city" if v < 0.5 => {
            if ((u * 6.0) as i32) % 2 == 0 {
                [120, 120, 130]
            } else {
                [90, 90, 105]
            }
        }
        "city" => {
            if (v * 20.0) as i32 % 4 == 0 && (u * 8.0) as i32 % 2 == 0 {
                [230, 230, 230]
            } else {
                [70, 70, 75]
            }
        }
        "night" => {
            if h(u, v) > 0.985 {
                [250, 250, 210]
            } else {
                mix([10, 15, 50], [25, 30, 80], v)
            }
        }
        "desert" if v < 0.35 => [245, 220, 170],
        "desert" => mix([225, 160, 80], [200, 130, 60], ((u * 9.0 + v * 3.0).sin() * 0.5 + 0.5) * 0.6),
        "forest" => {
            if ((u * 7.0) as i32) % 3 == 0 && v < 0.75 {
                [90, 60, 30]
            } else {
                mix([20, 90, 40], [40, 120, 50], h(u, v))
            }
        }
        "water" => mix([30, 90, 170], [60, 130, 200], (v * 25.0 + u * 4.0).sin() * 0.5 + 0.5),
        "wood" => mix([150, 100, 55], [120, 80, 40], if ((v * 10.0) as i32) % 2 == 0 { 0.2 } else { 0.8 }),
        "fabric" => mix([245, 170, 200], [225, 140, 175], (u * 12.0 + v * 7.0).sin() * 0.5 + 0.5),
        _ => [128, 128, 128],
    }
}

/// Whether `(x, y)` (object coordinates in `[-1, 1]²`, y down) is inside the class silhouette.
fn inside(class: &str, x: f32, y: f32, cube: bool) -> bool {
    let ellipse =
        |cx: f32, cy: f32, rx: f32, ry: f32| ((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2) <= 1.0;
    let rect = |x0: f32, y0: f32, x1: f32, y1: f32| x >= x0 && x <= x1 && y >= y0 && y <= y1;
    if cube {
        return rect(-0.7, -0.6, 0.7, 0.8);
    }
    match class {
        "teapot" => {
            ellipse(0.0, 0.2, 0.7, 0.55) || rect(0.6, -0.1, 1.0, 0.05) || ellipse(0.0, -0.4, 0.3, 0.15)
        }
        "backpack" => rect(-0.6, -0.7, 0.6, 0.8) || rect(-0.4, -0.95, 0.4, -0.7),
        "dog" => {
            ellipse(0.0, 0.2, 0.75, 0.4)
                || ellipse(0.6, -0.35, 0.35, 0.3)
                || rect(-0.6, 0.4, -0.4, 0.95)
                || rect(0.3, 0.4, 0.5, 0.95)
        }
        "cat" => {
            ellipse(0.0, 0.25, 0.6, 0.4)
                || ellipse(0.45, -0.3, 0.3, 0.28)
                || rect(0.3, -0.7, 0.45, -0.45)
                || rect(-0.9, -0.2, -0.6, 0.3)
        }
        "vase" => ellipse(0.0, 0.35, 0.55, 0.55) || rect(-0.2, -0.8, 0.2, 0.0),
        "sneaker" => rect(-0.9, 0.3, 0.9, 0.6) || ellipse(-0.2, 0.15, 0.6, 0.35),
        "clock" => ellipse(0.0, 0.0, 0.8, 0.8),
        _ => rect(-0.45, -0.85, 0.45, -0.2) || rect(-0.6, -0.15, 0.6, 0.85) || rect(-0.05, -1.0, 0.05, -0.85),
    }
}

/// Whether `(x, y)` is on the instance's mark (drawn on the body's centre-left).
fn on_mark(mark: &str, x: f32, y: f32) -> bool {
    let (dx, dy) = (x + 0.2, y - 0.2);
    match mark {
        "star" => {
            (dx.abs() < 0.05 && dy.abs() < 0.22)
                || (dy.abs() < 0.05 && dx.abs() < 0.22)
                || (dx.abs() - dy.abs()).abs() < 0.05 && dx.abs() < 0.15
        }
        "cross" => (dx - dy).abs() < 0.06 && dx.abs() < 0.2 || (dx + dy).abs() < 0.06 && dx.abs() < 0.2,
        "ring" => ((dx * dx + dy * dy).sqrt() - 0.15).abs() < 0.05,
        _ => dx.abs() < 0.25 && dy.abs() < 0.05,
    }
}

impl Scene {
    /// The caption, DreamBench-shaped: `a [edit] <identifier|attributes> <class> <context>`.
    /// With an identifier (`sks`) the attributes are the identifier's to carry.
    pub fn caption(&self, identifier: Option<&str>) -> String {
        let i = &self.instance;
        let class = CLASSES[i.class];
        let context = CONTEXTS[self.context].1[self.phrasing.min(1)];
        let edit = self.edit.map(|e| format!("{} ", EDITS[e])).unwrap_or_default();
        match identifier {
            Some(id) => format!("a {edit}{id} {class} {context}"),
            None => {
                let pattern = match PATTERNS[i.pattern] {
                    "plain" => String::new(),
                    p => format!("{p} "),
                };
                format!(
                    "a {edit}{pattern}{} and {} {class} {context}",
                    COLOURS[i.primary].0, COLOURS[i.secondary].0
                )
            }
        }
    }

    /// The caption as a DreamBench template: `{0}` for the identifier, `{1}` for the class noun.
    pub fn template(&self) -> String {
        let context = CONTEXTS[self.context].1[self.phrasing.min(1)];
        let edit = self.edit.map(|e| format!("{} ", EDITS[e])).unwrap_or_default();
        format!("a {edit}{{0}} {{1}} {context}")
    }

    /// Renders the scene at `size × size` pixels.
    pub fn render(&self, size: u32) -> image::RgbImage {
        let i = &self.instance;
        let mut rng = Mix(self.seed ^ 0xA5A5_5A5A);
        let scale = 0.28 + 0.08 * rng.unit();
        let (cx, cy) = (0.5 + (rng.unit() - 0.5) * 0.2, 0.6 + (rng.unit() - 0.5) * 0.1);
        let aspect = [1.0, 1.25, 0.8, 1.1][i.shape];
        let edit = self.edit.map(|e| EDITS[e]);
        let primary = match edit {
            Some("red") => COLOURS[0].1,
            Some("purple") => COLOURS[5].1,
            _ => COLOURS[i.primary].1,
        };
        let secondary = COLOURS[i.secondary].1;
        let bg_seed = rng.next();
        let droplets = rng.next();
        image::RgbImage::from_fn(size, size, |px, py| {
            let (u, v) = ((px as f32 + 0.5) / size as f32, (py as f32 + 0.5) / size as f32);
            let (x, y) = ((u - cx) / (scale * aspect), (v - cy) / (scale / aspect));
            if !inside(CLASSES[i.class], x, y, edit == Some("cube shaped")) {
                return image::Rgb(background(self.context, u, v, bg_seed));
            }
            let on_pattern = match PATTERNS[i.pattern] {
                "striped" => ((y * 4.0).floor() as i32).rem_euclid(2) == 1,
                "dotted" => ((x * 3.0).fract().abs() - 0.5).hypot((y * 3.0).fract().abs() - 0.5) < 0.22,
                "checkered" => (((x * 3.0).floor() + (y * 3.0).floor()) as i32).rem_euclid(2) == 1,
                _ => false,
            };
            let mut c = if on_pattern { secondary } else { primary };
            if on_mark(MARKS[i.mark], x, y) {
                c = if COLOURS[i.primary].0 == "black" { [250, 250, 250] } else { [15, 15, 15] };
            }
            // Simple shading from the top left.
            let shade = 1.0 - 0.18 * ((x + y) * 0.5 + 0.5).clamp(0.0, 1.0);
            let mut rgb = c.map(|ch| (ch as f32 * shade) as u8);
            match edit {
                Some("shiny") if (x + 0.35).hypot(y + 0.3) < 0.22 => rgb = mix(rgb, [255, 255, 255], 0.8),
                Some("wet") => {
                    rgb = rgb.map(|ch| (ch as f32 * 0.7) as u8);
                    if Mix(droplets ^ (px as u64 * 131 + py as u64)).next().is_multiple_of(9) {
                        rgb = mix(rgb, [200, 220, 255], 0.7);
                    }
                }
                _ => {}
            }
            image::Rgb(rgb)
        })
    }
}

/// The identifier the world's subjects are taught under (rare: no pretraining caption has it).
pub const IDENTIFIER: &str = "sks";

/// Every word of the world's captions and prompts, and the identifier, each once, in a fixed
/// order: the vocabulary of the world's tokenizers.
pub fn vocabulary() -> Vec<&'static str> {
    let mut words: Vec<&'static str> = vec!["a", "and", IDENTIFIER];
    let phrases = CLASSES
        .iter()
        .copied()
        .chain(COLOURS.iter().map(|c| c.0))
        .chain(PATTERNS)
        .chain(MARKS)
        .chain(EDITS)
        .chain(CONTEXTS.iter().flat_map(|c| c.1));
    for phrase in phrases {
        for word in phrase.split_whitespace() {
            if !words.contains(&word) {
                words.push(word);
            }
        }
    }
    words
}

/// A subject: a reserved instance with its references and prompts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    /// Name (`<class>_<n>`).
    pub name: String,
    /// The instance.
    pub instance: Instance,
    /// Reference scenes (4–6, ordinary contexts, no edits).
    pub references: Vec<Scene>,
    /// 25 prompts with the identifier: 20 recontextualisations, then 5 property edits, as scenes.
    pub prompts: Vec<Scene>,
}

/// The world: its seed and the subjects reserved from pretraining.
#[derive(Clone, Debug)]
pub struct World {
    seed: u64,
    subjects: Vec<Instance>,
}

impl World {
    /// A world with `subjects` reserved instances, one per class in turn.
    pub fn new(seed: u64, subjects: usize) -> Self {
        let mut rng = Mix(seed ^ 0x5EED);
        let subjects = (0..subjects)
            .map(|n| {
                let primary = rng.below(COLOURS.len());
                let secondary = (primary + 1 + rng.below(COLOURS.len() - 1)) % COLOURS.len();
                Instance {
                    class: n % CLASSES.len(),
                    primary,
                    secondary,
                    pattern: 1 + rng.below(PATTERNS.len() - 1),
                    shape: rng.below(4),
                    mark: rng.below(MARKS.len()),
                }
            })
            .collect();
        World { seed, subjects }
    }

    /// The reserved subject instances.
    pub fn subject_instances(&self) -> &[Instance] {
        &self.subjects
    }

    /// Subject `n` with `references` reference scenes (clamped to 4..=6).
    pub fn subject(&self, n: usize, references: usize) -> Option<Subject> {
        let instance = *self.subjects.get(n)?;
        let base = self.seed.wrapping_mul(31).wrapping_add(n as u64 * 1000);
        let refs = (0..references.clamp(4, 6))
            .map(|k| Scene {
                instance,
                context: [8, 2, 9, 3, 0, 4][k],
                edit: None,
                phrasing: 0,
                seed: base + k as u64,
            })
            .collect();
        let mut prompts: Vec<Scene> = (0..20)
            .map(|k| Scene {
                instance,
                context: k % 10,
                edit: None,
                phrasing: k / 10,
                seed: base + 100 + k as u64,
            })
            .collect();
        prompts.extend((0..5).map(|e| Scene {
            instance,
            context: 8,
            edit: Some(e),
            phrasing: 0,
            seed: base + 200 + e as u64,
        }));
        Some(Subject {
            name: format!("{}_{n}", CLASSES[instance.class].replace(' ', "_")),
            instance,
            references: refs,
            prompts,
        })
    }

    /// Pretraining scene number `index`: any class, instance, context and (sometimes) edit, never a
    /// reserved subject's instance.
    pub fn pretraining_scene(&self, index: u64) -> Scene {
        let mut rng = Mix(self.seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        loop {
            let primary = rng.below(COLOURS.len());
            let instance = Instance {
                class: rng.below(CLASSES.len()),
                primary,
                secondary: (primary + 1 + rng.below(COLOURS.len() - 1)) % COLOURS.len(),
                pattern: rng.below(PATTERNS.len()),
                shape: rng.below(4),
                mark: rng.below(MARKS.len()),
            };
            if self.subjects.contains(&instance) {
                continue;
            }
            let edit = (rng.below(6) == 0).then(|| rng.below(EDITS.len()));
            return Scene {
                instance,
                context: rng.below(CONTEXTS.len()),
                edit,
                phrasing: rng.below(2),
                seed: rng.next(),
            };
        }
    }
}

impl World {
    /// Writes subjects `0..subjects` as a DreamBench-layout folder under `dir`: `subjects.tsv`
    /// (dogs and cats are `live`), `prompts.txt` (the world's 25 templates for both kinds) and
    /// `<subject>/NN.png` references at `size` pixels, so every DreamBench tool runs on the world.
    pub fn export_dreambench(
        &self,
        dir: &std::path::Path,
        subjects: usize,
        references: usize,
        size: u32,
    ) -> crate::Result<()> {
        let io = |path: std::path::PathBuf| move |source| crate::Error::Io { path, source };
        if subjects == 0 || subjects > self.subjects.len() || size < 16 {
            return Err(crate::Error::BadInput {
                input: "world export".into(),
                message: format!(
                    "needs 1..={} subjects and images of at least 16 px (got {subjects} subjects, {size} px)",
                    self.subjects.len()
                ),
            });
        }
        std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
        let mut tsv = String::from("subject\tclass\tlive\tn_images\n");
        let mut templates: Vec<String> = Vec::new();
        for n in 0..subjects {
            let subject = self.subject(n, references).expect("n < subjects");
            let class = CLASSES[subject.instance.class];
            let live = matches!(class, "dog" | "cat");
            tsv.push_str(&format!("{}\t{class}\t{live}\t{}\n", subject.name, subject.references.len()));
            let folder = dir.join(&subject.name);
            std::fs::create_dir_all(&folder).map_err(io(folder.clone()))?;
            for (k, scene) in subject.references.iter().enumerate() {
                let path = folder.join(format!("{k:02}.png"));
                scene.render(size).save(&path).map_err(|e| crate::Error::BadInput {
                    input: path.display().to_string(),
                    message: e.to_string(),
                })?;
            }
            if templates.is_empty() {
                templates = subject.prompts.iter().map(Scene::template).collect();
            }
        }
        let mut prompts = String::from(
            "# kind<TAB>template; {0} = identifier, {1} = class noun (the toy world's 25 prompts)\n",
        );
        for kind in ["object", "live"] {
            for t in &templates {
                prompts.push_str(&format!("{kind}\t{t}\n"));
            }
        }
        std::fs::write(dir.join("subjects.tsv"), tsv).map_err(io(dir.join("subjects.tsv")))?;
        std::fs::write(dir.join("prompts.txt"), prompts).map_err(io(dir.join("prompts.txt")))?;
        Ok(())
    }
}

/// The context a rendered image shows, judged by the colours of its top and bottom bands against
/// each context's own renders (the renderer's exact check that a generated image drew the
/// asked-for context).
pub fn classify_context(image: &image::RgbImage) -> usize {
    let signature = |img: &image::RgbImage| -> [f32; 6] {
        let (w, h) = img.dimensions();
        let band = |y0: u32, y1: u32| {
            let mut s = [0f32; 3];
            let mut n = 0f32;
            for y in y0..y1 {
                for x in 0..w {
                    let p = img.get_pixel(x, y).0;
                    for c in 0..3 {
                        s[c] += p[c] as f32;
                    }
                    n += 1.0;
                }
            }
            s.map(|v| v / n.max(1.0))
        };
        let (top, bottom) = (band(0, h / 6 + 1), band(h - h / 8 - 1, h));
        [top[0], top[1], top[2], bottom[0], bottom[1], bottom[2]]
    };
    let target = signature(image);
    let size = image.width();
    (0..CONTEXTS.len())
        .min_by(|&a, &b| {
            let d = |c: usize| {
                let probe = Scene {
                    instance: Instance { class: 6, primary: 8, secondary: 9, pattern: 0, shape: 0, mark: 0 },
                    context: c,
                    edit: None,
                    phrasing: 0,
                    seed: 1,
                };
                let s = signature(&probe.render(size));
                s.iter().zip(&target).map(|(x, y)| (x - y).powi(2)).sum::<f32>()
            };
            d(a).total_cmp(&d(b))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a of `World::new(7, 8).pretraining_scene(3).render(32)`'s RGB bytes.
    const PINNED_RENDER_FNV: u64 = 14_468_321_744_675_028_305;

    #[test]
    fn scenes_render_deterministically_and_captions_follow_dreambench_shapes() {
        let world = World::new(7, 8);
        let scene = world.pretraining_scene(3);
        // Another world built from the same seed draws the same scene, pixel for pixel, and the
        // pixels are the ones the committed world models were trained on (pinned checksum).
        let again = World::new(7, 8).pretraining_scene(3);
        assert_eq!(scene.render(32), again.render(32));
        let fnv = |bytes: &[u8]| {
            bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
        };
        assert_eq!(fnv(scene.render(32).as_raw()), PINNED_RENDER_FNV, "the renderer's pixels changed");
        assert_eq!(scene.render(64).dimensions(), (64, 64));
        let subject = world.subject(0, 5).unwrap();
        assert_eq!(subject.references.len(), 5);
        assert_eq!(subject.prompts.len(), 25);
        assert_eq!(subject.prompts.iter().filter(|p| p.edit.is_some()).count(), 5);
        assert_eq!(subject.prompts[0].caption(Some("sks")), "a sks teapot on the beach");
        assert_eq!(subject.prompts[20].caption(Some("sks")), "a red sks teapot on top of a wooden floor");
        assert_eq!(subject.prompts[20].template(), "a red {0} {1} on top of a wooden floor");
        let plain = Scene { instance: Instance { pattern: 1, ..subject.instance }, ..subject.prompts[1] };
        assert!(plain.caption(None).starts_with("a striped "), "{}", plain.caption(None));
        // Different patterns, marks and contexts change the pixels.
        let a = subject.references[0];
        let b = Scene { instance: Instance { pattern: (a.instance.pattern % 3) + 1, ..a.instance }, ..a };
        assert_ne!(a.render(32), b.render(32));
        let c = Scene { context: (a.context + 1) % 10, ..a };
        assert_ne!(a.render(32), c.render(32));
    }

    #[test]
    fn the_vocabulary_covers_every_caption_once() {
        let words = vocabulary();
        let unique: std::collections::HashSet<_> = words.iter().collect();
        assert_eq!(unique.len(), words.len());
        let world = World::new(7, 8);
        let subject = world.subject(2, 6).unwrap();
        let captions = (0..500)
            .map(|i| world.pretraining_scene(i).caption(None))
            .chain(subject.prompts.iter().map(|p| p.caption(Some(IDENTIFIER))));
        for caption in captions {
            for w in caption.split_whitespace() {
                assert!(words.contains(&w), "`{w}` of `{caption}`");
            }
        }
    }

    #[test]
    fn subjects_never_appear_in_pretraining_and_contexts_can_be_checked() {
        let world = World::new(11, 8);
        let reserved: std::collections::HashSet<Instance> =
            world.subject_instances().iter().copied().collect();
        assert_eq!(reserved.len(), 8);
        let mut classes = std::collections::HashSet::new();
        for i in 0..3000 {
            let s = world.pretraining_scene(i);
            assert!(!reserved.contains(&s.instance), "scene {i} renders a subject");
            classes.insert(s.instance.class);
        }
        assert_eq!(classes.len(), CLASSES.len());
        // The renderer's check recovers the context of its own renders.
        let correct = (0..200u64)
            .filter(|&i| {
                let s = world.pretraining_scene(i);
                classify_context(&s.render(32)) == s.context
            })
            .count();
        assert!(correct >= 190, "context recovered for {correct}/200 renders");
    }
}

#[cfg(test)]
mod export_tests {
    use super::*;

    #[test]
    fn the_world_exports_a_dreambench_folder_the_protocol_reads() {
        let dir = tempfile::tempdir().unwrap();
        let world = World::new(3, 8);
        world.export_dreambench(dir.path(), 3, 4, 32).unwrap();
        let bench = crate::evaluation::dreambench::DreamBench::open(dir.path()).unwrap();
        assert_eq!(bench.subjects.len(), 3);
        assert!(bench.subjects[2].live, "subject 2 is a dog");
        assert_eq!(bench.prompts.prompts(&bench.subjects[0], "sks").len(), 25);
        assert_eq!(bench.prompts.prompts(&bench.subjects[0], "sks")[0], "a sks teapot on the beach");
        let refs = bench.references(&bench.subjects[1], tch::Device::Cpu).unwrap();
        assert_eq!(refs.size(), [4, 3, 32, 32]);
        let err = world.export_dreambench(dir.path(), 9, 4, 32).unwrap_err().to_string();
        assert!(err.contains("1..=8 subjects"), "{err}");
    }
}
