//! Subject intake: a folder of reference photos becomes validated [`ReferenceImage`] rows.
//!
//! Accepts PNG and JPEG files (by extension, case-insensitive), in file-name order. Every image is
//! decoded, converted to 8-bit RGB (greyscale and alpha are converted, documented here) and stored
//! re-encoded as PNG. A corrupt file, an image smaller than `min_side` pixels, or a folder with no
//! images is an error naming the file or folder.

use std::path::{Path, PathBuf};

use proxytune_schemas::ReferenceImage;

use crate::error::{Error, Result};

/// What a subject folder must satisfy.
#[derive(Clone, Debug)]
pub struct IntakeRules {
    /// Smallest accepted width and height, in pixels.
    pub min_side: u32,
    /// Most images taken from one folder.
    pub max_images: usize,
}

impl Default for IntakeRules {
    fn default() -> Self {
        IntakeRules { min_side: 32, max_images: 64 }
    }
}

/// Reads the reference photos of `subject` from `dir`.
pub fn load_subject_folder(
    dir: &Path,
    job_id: &str,
    subject: &str,
    class_noun: &str,
    rules: &IntakeRules,
    now_us: i64,
) -> Result<Vec<ReferenceImage>> {
    Ok(load_subject_images(dir, rules)?
        .into_iter()
        .enumerate()
        .map(|(index, (source, rgb))| ReferenceImage {
            job_id: job_id.to_string(),
            subject: subject.to_string(),
            class_noun: class_noun.to_string(),
            image_index: index as u32,
            source,
            width: rgb.width(),
            height: rgb.height(),
            image_png: encode_png(&rgb),
            created_at_us: now_us,
        })
        .collect())
}

/// The decoded, validated RGB photos of a subject folder with their file names, in name order.
pub fn load_subject_images(dir: &Path, rules: &IntakeRules) -> Result<Vec<(String, image::RgbImage)>> {
    let files = image_files(dir)?;
    if files.is_empty() {
        return Err(Error::BadInput {
            input: dir.display().to_string(),
            message: "the subject folder holds no .png or .jpg images".into(),
        });
    }
    if files.len() > rules.max_images {
        return Err(Error::BadInput {
            input: dir.display().to_string(),
            message: format!("{} images; at most {} are accepted", files.len(), rules.max_images),
        });
    }
    files
        .iter()
        .map(|path| {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            Ok((name, read_image(path, rules)?))
        })
        .collect()
}

/// The image files of a folder (`.png`, `.jpg`, `.jpeg`, any case), in name order.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image_file(p))
        .collect();
    files.sort();
    Ok(files)
}

fn is_image_file(path: &Path) -> bool {
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
    matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
}

/// Decodes an image file into 8-bit RGB, checking its size against `rules`.
pub fn read_image(path: &Path, rules: &IntakeRules) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let bad = |message: String| Error::BadInput { input: path.display().to_string(), message };
    let rgb =
        image::load_from_memory(&bytes).map_err(|e| bad(format!("cannot decode image: {e}")))?.to_rgb8();
    let (width, height) = rgb.dimensions();
    if width < rules.min_side || height < rules.min_side {
        return Err(bad(format!("{width}x{height} is smaller than the minimum {0}x{0}", rules.min_side)));
    }
    Ok(rgb)
}

/// Stacks RGB images into one `[N, 3, S, S]` tensor in `[0, 1]`, every image resized to a square of
/// the first image's longer side (the shared input of the scorers).
pub fn images_to_batch(images: &[image::RgbImage], device: tch::Device) -> Result<tch::Tensor> {
    let side = images.first().map_or(1, |i| i.width().max(i.height()) as i64);
    images_to_square_batch(images, side, device)
}

/// Images as one `[N, 3, side, side]` tensor in `[0, 1]` (bilinear, antialiased when shrinking).
pub fn images_to_square_batch(
    images: &[image::RgbImage],
    side: i64,
    device: tch::Device,
) -> Result<tch::Tensor> {
    use proxytune_models::scorers::preprocess::{resize_square, rgb8_to_tensor};
    let tensors = images
        .iter()
        .map(|img| {
            Ok(resize_square(
                &rgb8_to_tensor(img.width(), img.height(), img.as_raw(), device)?.unsqueeze(0),
                side,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(tch::Tensor::cat(&tensors, 0))
}

/// An image tensor `[3, H, W]` in `[0, 1]` as 8-bit RGB (rounded, clamped).
pub fn tensor_to_rgb(image: &tch::Tensor) -> Result<image::RgbImage> {
    let size = image.size();
    if size.len() != 3 || size[0] != 3 {
        return Err(Error::Operator { message: format!("expected an image tensor [3, H, W], got {size:?}") });
    }
    let bytes: Vec<u8> = Vec::try_from(
        (image.permute([1, 2, 0]) * 255.0)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(tch::Kind::Uint8)
            .flatten(0, -1)
            .to_device(tch::Device::Cpu),
    )
    .map_err(proxytune_models::ModelError::from)?;
    image::RgbImage::from_raw(size[2] as u32, size[1] as u32, bytes)
        .ok_or_else(|| Error::Operator { message: "image tensor has the wrong size".into() })
}

/// PNG bytes of an RGB image.
pub fn encode_png(rgb: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    rgb.write_to(&mut out, image::ImageFormat::Png).expect("PNG encoding into memory cannot fail");
    out.into_inner()
}

/// One line of a DreamBench-layout `subjects.tsv`: `subject<TAB>class<TAB>live<TAB>n_images`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectEntry {
    /// Subject name, also its folder name.
    pub subject: String,
    /// Class noun.
    pub class_noun: String,
    /// A live subject (cat, dog) gets the live prompt list.
    pub live: bool,
    /// Number of reference images the folder should hold.
    pub n_images: usize,
}

/// Reads a `subjects.tsv` (header line first); errors name the file and line.
pub fn read_subjects_tsv(path: &Path) -> Result<Vec<SubjectEntry>> {
    let text =
        std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let bad = |line: usize, message: String| Error::BadInput {
        input: format!("{}:{line}", path.display()),
        message,
    };
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
    match lines.next() {
        Some((_, header))
            if header.split('\t').collect::<Vec<_>>() == ["subject", "class", "live", "n_images"] => {}
        Some((i, header)) => {
            return Err(bad(
                i + 1,
                format!("expected the header `subject class live n_images`, found `{header}`"),
            ))
        }
        None => return Err(bad(1, "the file is empty".into())),
    }
    lines
        .map(|(i, line)| {
            let fields: Vec<&str> = line.split('\t').collect();
            let [subject, class_noun, live, n_images] = fields[..] else {
                return Err(bad(i + 1, format!("expected 4 tab-separated fields, found {}", fields.len())));
            };
            let live = match live {
                "true" => true,
                "false" => false,
                other => return Err(bad(i + 1, format!("`live` must be true or false, found `{other}`"))),
            };
            let n_images = n_images
                .parse()
                .map_err(|_| bad(i + 1, format!("`n_images` must be a count, found `{n_images}`")))?;
            Ok(SubjectEntry { subject: subject.into(), class_noun: class_noun.into(), live, n_images })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, gray: bool) {
        if gray {
            image::GrayImage::from_fn(w, h, |x, _| image::Luma([x as u8])).save(path).unwrap();
        } else {
            image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([x as u8, y as u8, 7, 128]))
                .save(path)
                .unwrap();
        }
    }

    #[test]
    fn reads_converts_and_orders_images() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("b.png"), 40, 40, true);
        write_png(&dir.path().join("a.PNG"), 48, 36, false);
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let rows = load_subject_folder(dir.path(), "j", "s", "dog", &IntakeRules::default(), 5).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].source.as_str(), rows[0].width, rows[0].height), ("a.PNG", 48, 36));
        assert_eq!(rows[1].image_index, 1);
        let decoded = image::load_from_memory(&rows[1].image_png).unwrap();
        assert_eq!(decoded.color(), image::ColorType::Rgb8);
    }

    #[test]
    fn subjects_tsv_lines_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subjects.tsv");
        std::fs::write(
            &path,
            "subject\tclass\tlive\tn_images\ndog\tdog\ttrue\t5\nbear\tstuffed animal\tfalse\t4\n",
        )
        .unwrap();
        let rows = read_subjects_tsv(&path).unwrap();
        assert_eq!(
            rows[1],
            SubjectEntry {
                subject: "bear".into(),
                class_noun: "stuffed animal".into(),
                live: false,
                n_images: 4
            }
        );
        std::fs::write(&path, "subject\tclass\tlive\tn_images\ndog\tdog\tyes\t5\n").unwrap();
        let err = read_subjects_tsv(&path).unwrap_err().to_string();
        assert!(err.contains("subjects.tsv:2") && err.contains("`yes`"), "{err}");
    }

    #[test]
    fn bad_folders_and_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_subject_folder(dir.path(), "j", "s", "dog", &IntakeRules::default(), 0).unwrap_err();
        assert!(err.to_string().contains("no .png or .jpg"), "{err}");

        std::fs::write(dir.path().join("broken.jpg"), b"\xff\xd8\xff not really").unwrap();
        let err = load_subject_folder(dir.path(), "j", "s", "dog", &IntakeRules::default(), 0).unwrap_err();
        assert!(err.to_string().contains("broken.jpg") && err.to_string().contains("cannot decode"), "{err}");

        std::fs::remove_file(dir.path().join("broken.jpg")).unwrap();
        write_png(&dir.path().join("tiny.png"), 8, 8, false);
        let err = load_subject_folder(dir.path(), "j", "s", "dog", &IntakeRules::default(), 0).unwrap_err();
        assert!(err.to_string().contains("tiny.png") && err.to_string().contains("8x8"), "{err}");
    }
}
