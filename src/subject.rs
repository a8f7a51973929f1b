//! The subject a job teaches: a world subject (its references rendered, its main colour known) or
//! a user's photos of an object of one of the world's classes (uploaded to the daemon or read from
//! a folder). Either way the subject carries its class's 25 world prompts (20 recontextualisations
//! and 5 property edits), which the proxy plan and the DreamBench evaluation use, and its
//! references at the world models' resolution.
//!
//! The checks on user input live here too: subject names, class nouns and identifiers, and photo
//! counts, sizes and formats.

use std::path::Path;

use anyhow::Context;
use proxytune_actors::stages::intake::{load_subject_images, IntakeRules};
use proxytune_actors::world::{Scene, World, CLASSES, COLOURS, IDENTIFIER};
use proxytune_schemas::ReferenceImage;

use crate::world_models::SIZE;

/// Fewest and most reference photos of a subject.
pub(crate) const PHOTOS: std::ops::RangeInclusive<usize> = 3..=6;
/// Smallest and largest accepted photo side, in pixels.
pub(crate) const MIN_SIDE: u32 = SIZE;
pub(crate) const MAX_SIDE: u32 = 4096;

/// A job's subject.
#[derive(Clone, Debug)]
pub(crate) struct JobSubject {
    /// Its name (the corpus's `subject` column).
    pub name: String,
    /// Index into [`CLASSES`].
    pub class: usize,
    /// The reference photos, square, at [`SIZE`] pixels.
    pub references: Vec<image::RgbImage>,
    /// Where each reference came from (a file name, `world render k`).
    pub sources: Vec<String>,
    /// The class's 25 world prompts, as scenes (their captions and drawn contexts).
    pub prompts: Vec<Scene>,
    /// The subject's main colour, when known (world subjects).
    pub colour: Option<[u8; 3]>,
}

impl JobSubject {
    /// The class noun.
    pub fn class_noun(&self) -> &'static str {
        CLASSES[self.class]
    }

    /// The prompt scenes of `class` (those of the world's reserved subject of that class).
    fn class_prompts(world: &World, class: usize) -> Vec<Scene> {
        let n = world.subject_instances().iter().position(|i| i.class == class).expect("one per class");
        world.subject(n, 5).expect("listed").prompts
    }

    /// World subject `name` with `references` renders.
    pub fn world(world: &World, name: &str, references: usize) -> anyhow::Result<Self> {
        let subjects: Vec<_> =
            (0..world.subject_instances().len()).filter_map(|n| world.subject(n, references)).collect();
        let Some(subject) = subjects.iter().find(|s| s.name == name) else {
            let names: Vec<&str> = subjects.iter().map(|s| s.name.as_str()).collect();
            anyhow::bail!("subject `{name}`: no such world subject (one of: {})", names.join(", "));
        };
        Ok(JobSubject {
            name: subject.name.clone(),
            class: subject.instance.class,
            references: subject.references.iter().map(|s| s.render(SIZE)).collect(),
            sources: (0..subject.references.len()).map(|k| format!("world render {k}")).collect(),
            prompts: subject.prompts.clone(),
            colour: Some(COLOURS[subject.instance.primary].1),
        })
    }

    /// A user's subject `name` of class `class_noun` from its photos (file name, image).
    pub fn photos(
        world: &World,
        name: &str,
        class_noun: &str,
        photos: Vec<(String, image::RgbImage)>,
    ) -> anyhow::Result<Self> {
        check_name(name)?;
        let class = check_class_noun(class_noun)?;
        check_photo_count(photos.len())?;
        let (sources, images): (Vec<String>, Vec<image::RgbImage>) = photos.into_iter().unzip();
        Ok(JobSubject {
            name: name.to_string(),
            class,
            references: images.iter().map(|i| square(i, SIZE)).collect(),
            sources,
            prompts: Self::class_prompts(world, class),
            colour: None,
        })
    }

    /// A subject folder's photos (PNG or JPEG, `PHOTOS` of them, sides in `MIN_SIDE..=MAX_SIDE`).
    pub fn folder(world: &World, name: &str, class_noun: &str, dir: &Path) -> anyhow::Result<Self> {
        let rules = IntakeRules { min_side: MIN_SIDE, max_images: *PHOTOS.end() };
        let photos = load_subject_images(dir, &rules)?;
        for (file, img) in &photos {
            check_photo_size(file, img.width(), img.height())?;
        }
        Self::photos(world, name, class_noun, photos)
            .with_context(|| format!("subject folder {}", dir.display()))
    }

    /// The subject of a corpus, from its stored reference rows (a world subject's colour is known
    /// when the name is one of `world`'s subjects).
    pub fn stored(world: &World, rows: &[ReferenceImage]) -> anyhow::Result<Self> {
        let first = rows.first().context("the corpus holds no reference images")?;
        // The name becomes a folder of the evaluation bench: it must be a plain name.
        check_name(&first.subject).context("the corpus's subject")?;
        anyhow::ensure!(
            rows.iter().all(|r| r.subject == first.subject),
            "the corpus holds references of several subjects"
        );
        let photos = rows
            .iter()
            .map(|r| {
                let img = image::load_from_memory(&r.image_png)
                    .with_context(|| format!("stored reference {} of `{}`", r.image_index, r.subject))?;
                Ok((r.source.clone(), img.to_rgb8()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let class = check_class_noun(&first.class_noun)?;
        let colour =
            Self::world(world, &first.subject, 5).ok().filter(|w| w.class == class).and_then(|w| w.colour);
        Ok(JobSubject {
            name: first.subject.clone(),
            class,
            references: photos.iter().map(|(_, i)| square(i, SIZE)).collect(),
            sources: photos.into_iter().map(|(s, _)| s).collect(),
            prompts: Self::class_prompts(world, class),
            colour,
        })
    }

    /// The subject as a job sees it: the world identifier, `live` for dogs and cats, its scenes'
    /// templates.
    pub fn subject_plan(&self) -> crate::job::plan::SubjectPlan {
        let class = self.class_noun();
        crate::job::plan::SubjectPlan {
            name: self.name.clone(),
            class_noun: class.into(),
            identifier: IDENTIFIER.into(),
            live: matches!(class, "dog" | "cat"),
            references: self.references.clone(),
            sources: self.sources.clone(),
            templates: self.prompts.iter().map(|p| p.template().replacen("{0} {1}", "{}", 1)).collect(),
        }
    }

    /// Writes a one-subject DreamBench folder (`subjects.tsv`, `prompts.txt`, the references).
    pub fn write_bench(&self, dir: &Path) -> anyhow::Result<()> {
        crate::job::evaluate::write_bench(dir, &self.subject_plan())
    }
}

/// `img` center-cropped to a square and resized to `side` pixels.
fn square(img: &image::RgbImage, side: u32) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let s = w.min(h);
    let crop = image::imageops::crop_imm(img, (w - s) / 2, (h - s) / 2, s, s).to_image();
    if s == side {
        return crop;
    }
    image::imageops::resize(&crop, side, side, image::imageops::FilterType::Triangle)
}

/// A subject name: 1–40 of `a-z 0-9 _ -`, starting with a letter or digit.
pub(crate) fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = (1..=40).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    anyhow::ensure!(
        ok,
        "name `{name}`: use 1 to 40 of a-z, 0-9, `_` and `-`, starting with a letter or digit"
    );
    Ok(())
}

/// A class noun: lower-case words, and one of the world models' classes; returns its index.
pub(crate) fn check_class_noun(noun: &str) -> anyhow::Result<usize> {
    let ok = (1..=32).contains(&noun.len()) && noun.chars().all(|c| c.is_ascii_lowercase() || c == ' ');
    anyhow::ensure!(ok, "class_noun `{noun}`: use 1 to 32 lower-case letters and spaces");
    CLASSES.iter().position(|c| *c == noun).with_context(|| {
        format!("class_noun `{noun}`: the world models know these classes only: {}", CLASSES.join(", "))
    })
}

/// An identifier: 2–16 of `a-z 0-9`, not a class word; the world models' vocabulary holds one.
pub(crate) fn check_identifier(identifier: &str) -> anyhow::Result<()> {
    let ok = (2..=16).contains(&identifier.len())
        && identifier.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    anyhow::ensure!(ok, "identifier `{identifier}`: use 2 to 16 of a-z and 0-9");
    anyhow::ensure!(
        !CLASSES.iter().any(|c| c.split(' ').any(|w| w == identifier)),
        "identifier `{identifier}` is a class word; a rare token is needed"
    );
    anyhow::ensure!(
        identifier == IDENTIFIER,
        "identifier `{identifier}`: the world models' vocabulary has one identifier token, `{IDENTIFIER}`"
    );
    Ok(())
}

/// The number of photos of a subject.
pub(crate) fn check_photo_count(n: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        PHOTOS.contains(&n),
        "{n} photos: a subject needs {} to {}",
        PHOTOS.start(),
        PHOTOS.end()
    );
    Ok(())
}

/// A photo's size.
pub(crate) fn check_photo_size(name: &str, width: u32, height: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        (MIN_SIDE..=MAX_SIDE).contains(&width) && (MIN_SIDE..=MAX_SIDE).contains(&height),
        "photo `{name}`: {width}x{height}; each side must be {MIN_SIDE} to {MAX_SIDE} pixels"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_classes_and_identifiers_are_checked() {
        assert!(check_name("rex_2").is_ok());
        for bad in ["", "Rex", "_rex", "rex/..", "a b", &"x".repeat(41)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_class_noun("robot toy").unwrap(), 7);
        assert!(check_class_noun("dog;").unwrap_err().to_string().contains("lower-case"));
        assert!(check_class_noun("cow").unwrap_err().to_string().contains("teapot, backpack"));
        assert!(check_identifier("sks").is_ok());
        assert!(check_identifier("s k").is_err());
        assert!(check_identifier("dog").unwrap_err().to_string().contains("class word"));
        assert!(check_identifier("zwx").unwrap_err().to_string().contains("`sks`"));
        assert!(
            check_photo_count(2).is_err() && check_photo_count(7).is_err() && check_photo_count(3).is_ok()
        );
        assert!(check_photo_size("a.png", 31, 64).unwrap_err().to_string().contains("a.png"));
    }

    #[test]
    fn photos_become_square_references_with_the_class_prompts() {
        let world = World::new(7, CLASSES.len());
        let photos = (0..3).map(|k| (format!("{k}.png"), image::RgbImage::new(64, 48))).collect();
        let s = JobSubject::photos(&world, "rex", "dog", photos).unwrap();
        assert_eq!(s.references[0].dimensions(), (SIZE, SIZE));
        assert_eq!(s.prompts.len(), 25);
        assert!(s.prompts.iter().all(|p| CLASSES[p.instance.class] == "dog"));
        assert_eq!(s.colour, None);
        let w = JobSubject::world(&world, "dog_2", 5).unwrap();
        assert!(w.colour.is_some() && w.references.len() == 5);
        assert!(JobSubject::world(&world, "dog_9", 5).unwrap_err().to_string().contains("dog_2"));
    }
}
