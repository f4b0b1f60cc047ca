//! The license a model folder declares: the model card's front matter (`license`, and for
//! `license: other` the `license_name` / `license_link` the Hub asks for), else a LICENSE file,
//! else unknown. Open-weight licenses differ in what they allow (commercial use, user counts,
//! naming), so Temper shows the base model's wherever a user decides what to deploy.

use std::path::Path;

use serde::Serialize;

/// Files read, in order, when the model card names no license.
const LICENSE_FILES: &[&str] = &["LICENSE", "LICENSE.md", "LICENSE.txt", "LICENSE.MD", "LICENCE", "license.txt"];

/// What a model folder says of its license. Never an error: an unreadable card is "unknown".
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelLicense {
    /// The Hub's license id (`apache-2.0`, `mit`, `llama3.2`, `other`, ...).
    pub id: Option<String>,
    /// `license_name` of the card, or the first line of a LICENSE file.
    pub name: Option<String>,
    /// `license_link` of the card, or the LICENSE file's name.
    pub link: Option<String>,
    /// Where it was read: `README.md`, the LICENSE file's name, or nothing.
    pub source: Option<String>,
}

impl ModelLicense {
    /// Read `dir/README.md`'s front matter, then the LICENSE files.
    pub fn read(dir: &Path) -> Self {
        if let Some(found) = std::fs::read_to_string(dir.join("README.md")).ok().and_then(|t| from_card(&t)) {
            return found;
        }
        for file in LICENSE_FILES {
            if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
                let name: String = first.chars().take(100).collect();
                return Self {
                    id: None,
                    name: (!name.is_empty()).then_some(name),
                    link: Some((*file).to_string()),
                    source: Some((*file).to_string()),
                };
            }
        }
        Self::default()
    }

    pub fn is_known(&self) -> bool {
        self.source.is_some()
    }

    /// One line: `apache-2.0`, `other: Llama 3.2 Community License (https://...)`,
    /// `MIT License (LICENSE)`, or `unknown (...)`.
    pub fn describe(&self) -> String {
        if !self.is_known() {
            return "unknown (no license in the model card's front matter, no LICENSE file): check before deploying"
                .into();
        }
        let mut s = match (&self.id, &self.name) {
            (Some(id), Some(name)) if !name.eq_ignore_ascii_case(id) => format!("{id}: {name}"),
            (Some(id), _) => id.clone(),
            (None, Some(name)) => name.clone(),
            (None, None) => "declared without a name".into(),
        };
        if let Some(link) = &self.link {
            s.push_str(&format!(" ({link})"));
        }
        s
    }
}

/// The license keys of a model card's YAML front matter (between the leading `---` lines).
fn from_card(text: &str) -> Option<ModelLicense> {
    let rest = text.strip_prefix("---")?.trim_start_matches(['\r', '\n']);
    let end = rest.find("\n---").unwrap_or(rest.len());
    let meta: serde_norway::Value = serde_norway::from_str(&rest[..end]).ok()?;
    let text_of = |key: &str| -> Option<String> {
        match meta.get(key)? {
            serde_norway::Value::String(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
            // The Hub allows a list of ids.
            serde_norway::Value::Sequence(items) => {
                let ids: Vec<&str> = items.iter().filter_map(|v| v.as_str()).collect();
                (!ids.is_empty()).then(|| ids.join(", "))
            }
            _ => None,
        }
    };
    let id = text_of("license")?;
    Some(ModelLicense {
        id: Some(id),
        name: text_of("license_name"),
        link: text_of("license_link"),
        source: Some("README.md".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_card_front_matter_and_license_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!ModelLicense::read(dir.path()).is_known());
        assert!(ModelLicense::read(dir.path()).describe().starts_with("unknown"));
        std::fs::write(dir.path().join("LICENSE"), "\n  MIT License\n\nCopyright (c) 2023 Andrej\n").unwrap();
        let l = ModelLicense::read(dir.path());
        assert_eq!(l.describe(), "MIT License (LICENSE)");
        let card = "---\nlicense: other\nlicense_name: llama3.2\nlicense_link: https://example.org/LICENSE\ntags:\n- x\n---\n# Model\n";
        std::fs::write(dir.path().join("README.md"), card).unwrap();
        let l = ModelLicense::read(dir.path());
        assert_eq!(l.describe(), "other: llama3.2 (https://example.org/LICENSE)");
        assert_eq!(l.source.as_deref(), Some("README.md"));
        std::fs::write(dir.path().join("README.md"), "---\nlicense:\n- apache-2.0\n---\n").unwrap();
        assert_eq!(ModelLicense::read(dir.path()).describe(), "apache-2.0");
        // A card without a license key falls back to the LICENSE file.
        std::fs::write(dir.path().join("README.md"), "---\ntags: [a]\n---\n").unwrap();
        assert_eq!(ModelLicense::read(dir.path()).describe(), "MIT License (LICENSE)");
        // Broken front matter is not an error.
        std::fs::write(dir.path().join("README.md"), "---\nlicense: [unclosed\n---\n").unwrap();
        assert_eq!(ModelLicense::read(dir.path()).describe(), "MIT License (LICENSE)");
    }
}
