//! A job's prompt templates: DreamBench's 25 of the subject's kind (the vendored
//! `actors/dreambench/prompts.txt`, compiled in), or a file of one template a line. A template has
//! `{}` where the subject (`identifier class_noun`) goes.

use std::path::Path;

/// The vendored DreamBench prompt list (`kind<TAB>template`, `{0}` identifier, `{1}` class noun).
pub const DREAMBENCH_PROMPTS: &str = include_str!("../../actors/dreambench/prompts.txt");

/// DreamBench's 25 templates of one kind (`live` or `object`), with `{}` for the subject.
pub fn dreambench_templates(live: bool) -> Vec<String> {
    let kind = if live { "live" } else { "object" };
    DREAMBENCH_PROMPTS
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('\t'))
        .filter(|(k, _)| *k == kind)
        .map(|(_, t)| t.replace("{0} {1}", "{}"))
        .collect()
}

/// Reads a template file: one template a line, each with exactly one `{}`; blank lines and `#`
/// comments skipped. Errors name the file and line.
pub fn read_template_file(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.matches("{}").count() != 1 {
            return Err(format!(
                "{}:{}: a template needs exactly one `{{}}` for the subject",
                path.display(),
                i + 1
            ));
        }
        out.push(line.to_string());
    }
    if out.is_empty() {
        return Err(format!("{}: no templates", path.display()));
    }
    Ok(out)
}

/// `template` with the subject filled in.
pub fn fill(template: &str, identifier: &str, class_noun: &str) -> String {
    template.replacen("{}", &format!("{identifier} {class_noun}"), 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dreambench_has_25_templates_of_each_kind_with_the_subject_once() {
        for live in [false, true] {
            let t = dreambench_templates(live);
            assert_eq!(t.len(), 25);
            assert!(t.iter().all(|t| t.matches("{}").count() == 1 && !t.contains("{0}")), "{t:?}");
        }
        assert_eq!(
            fill(&dreambench_templates(false)[0], "zwx", "stuffed animal"),
            "a zwx stuffed animal in the jungle"
        );
    }

    #[test]
    fn a_template_file_without_a_subject_slot_is_named_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.txt");
        std::fs::write(&f, "# mine\na {} on a boat\n\na photo of a boat\n").unwrap();
        let err = read_template_file(&f).unwrap_err();
        assert!(err.ends_with("p.txt:4: a template needs exactly one `{}` for the subject"), "{err}");
        std::fs::write(&f, "a {} on a boat\n").unwrap();
        assert_eq!(read_template_file(&f).unwrap(), vec!["a {} on a boat"]);
    }
}
