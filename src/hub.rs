//! The Hugging Face Hub: models (`owner/name`) and dataset files (`hub:owner/name`) downloaded
//! with `hf-hub` (sync API over ureq) into the standard cache, or read from a warm cache with
//! `HF_HUB_OFFLINE=1`.
//!
//! Environment: `HF_ENDPOINT` (default `https://huggingface.co`), `HF_HUB_CACHE` / `HF_HOME`
//! (cache location, default `~/.cache/huggingface/hub`), `HF_TOKEN` or the token file
//! (`HF_TOKEN_PATH`, default `$HF_HOME/token`), `HF_HUB_OFFLINE=1`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::{Error, Result};

/// A model folder: `spec` itself when it is an existing folder, else the snapshot folder of the
/// Hub model `owner/name` at `revision` (default `main`), with config.json, tokenizer.json,
/// tokenizer_config.json, generation_config.json, README.md, LICENSE (if the repository has them) and the weights
/// (model.safetensors, or the index and every shard it names).
pub fn resolve_model(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    check_repo_id(spec, "model")?;
    let hub = Hub::from_env()?;
    let repo = repo(spec, RepoType::Model, revision);
    let config = hub.file(&repo, "config.json", true)?.ok_or_else(|| hub.err(&repo, "config.json", "not found"))?;
    hub.file(&repo, "tokenizer.json", true)?;
    // The model card and LICENSE: the license shown by inspect and train, and carried into cards.
    for optional in ["tokenizer_config.json", "generation_config.json", "README.md", "LICENSE"] {
        hub.file(&repo, optional, false)?;
    }
    match hub.file(&repo, "model.safetensors.index.json", false)? {
        Some(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json { path: index.clone(), source })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::InvalidConfig {
                path: index.clone(),
                key: "weight_map".into(),
                reason: "missing or not an object".into(),
            })?;
            let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                hub.file(&repo, shard, true)?;
            }
        }
        None => {
            hub.file(&repo, "model.safetensors", true)?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// One file of a Hub dataset repository, downloaded (or read from the cache).
pub fn resolve_dataset_file(repo_id: &str, file: &str, revision: Option<&str>) -> Result<PathBuf> {
    check_repo_id(repo_id, "dataset")?;
    let hub = Hub::from_env()?;
    let repo = repo(repo_id, RepoType::Dataset, revision);
    hub.file(&repo, file, true)?.ok_or_else(|| hub.err(&repo, file, "not found"))
}

/// The files a `hub:` data spec names: `owner/name/path/in/repo.ext` is one file; `owner/name`
/// with `split` is every `.jsonl` / `.json` / `.parquet` file of that split (a file whose name
/// starts with the split, or one under a folder named after it).
pub fn resolve_dataset_files(spec: &str, split: Option<&str>, revision: Option<&str>) -> Result<Vec<PathBuf>> {
    let parts: Vec<&str> = spec.splitn(3, '/').collect();
    if let [owner, name, file] = parts[..] {
        return Ok(vec![resolve_dataset_file(&format!("{owner}/{name}"), file, revision)?]);
    }
    check_repo_id(spec, "dataset")?;
    let split = split.ok_or_else(|| Error::InvalidConfig {
        path: PathBuf::from("data"),
        key: "split".into(),
        reason: format!("`hub:{spec}` names a whole repository: set data.split (train, test, ...) or name a file (`hub:{spec}/path/file.parquet`)"),
    })?;
    let hub = Hub::from_env()?;
    let repo = repo(spec, RepoType::Dataset, revision);
    let mut files: Vec<String> = hub.list(&repo)?.into_iter().filter(|f| in_split(f, split)).collect();
    files.sort();
    if files.is_empty() {
        return Err(hub.err(&repo, split, "no .jsonl, .json or .parquet file of this split"));
    }
    files.iter().map(|f| hub.file(&repo, f, true)?.ok_or_else(|| hub.err(&repo, f, "not found"))).collect()
}

fn in_split(file: &str, split: &str) -> bool {
    let path = Path::new(file);
    let data = crate::data::source::is_data_file(path);
    let stem = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let named = stem.strip_prefix(split).is_some_and(|rest| rest.starts_with(['-', '_', '.']));
    let folder = path.parent().is_some_and(|p| p.components().any(|c| c.as_os_str() == split));
    data && (named || folder)
}

fn check_repo_id(spec: &str, what: &str) -> Result<()> {
    let ok = !spec.is_empty()
        && spec.split('/').count() <= 2
        && spec.split('/').all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
    if ok {
        Ok(())
    } else {
        Err(Error::Hub {
            repo: spec.into(),
            file: String::new(),
            reason: format!("not an existing folder and not a Hub {what} id (`owner/name`)"),
        })
    }
}

fn repo(id: &str, kind: RepoType, revision: Option<&str>) -> Repo {
    Repo::with_revision(id.to_string(), kind, revision.unwrap_or("main").to_string())
}

/// The cache, and the client unless offline.
struct Hub {
    cache: Cache,
    api: Option<Api>,
}

impl Hub {
    fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HF_HOME").map(PathBuf::from).or_else(|| {
            let cache =
                var("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")));
            cache.map(|c| c.join("huggingface"))
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join("hub")))
            .ok_or_else(|| Error::Hub {
                repo: String::new(),
                file: String::new(),
                reason: "no cache folder: set HF_HOME or HF_HUB_CACHE".into(),
            })?;
        let cache = Cache::new(cache_dir.clone());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| !matches!(v.as_str(), "0" | "false" | "False"));
        if offline {
            return Ok(Self { cache, api: None });
        }
        let token_file = var("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| home.map(|h| h.join("token")));
        let token = var("HF_TOKEN").or_else(|| {
            let t = std::fs::read_to_string(token_file?).ok()?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let mut builder = ApiBuilder::from_cache(Cache::new(cache_dir))
            .with_token(token)
            .with_progress(std::io::stderr().is_terminal());
        if let Some(endpoint) = var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
        }
        let api = builder.build().map_err(|e| Error::Hub {
            repo: String::new(),
            file: String::new(),
            reason: e.to_string(),
        })?;
        Ok(Self { cache, api: Some(api) })
    }

    fn err(&self, repo: &Repo, file: &str, reason: &str) -> Error {
        Error::Hub { repo: format!("{}@{}", repo.url(), repo.revision()), file: file.into(), reason: reason.into() }
    }

    /// A file from the cache, else downloaded; `None` when the repository lacks an optional one.
    fn file(&self, repo: &Repo, file: &str, required: bool) -> Result<Option<PathBuf>> {
        if let Some(path) = self.cache.repo(repo.clone()).get(file) {
            return Ok(Some(path));
        }
        let Some(api) = &self.api else {
            return if required {
                Err(self.err(repo, file, "not in the local cache and HF_HUB_OFFLINE is set"))
            } else {
                Ok(None)
            };
        };
        match api.repo(repo.clone()).download(file) {
            Ok(path) => Ok(Some(path)),
            Err(e) if !required && is_not_found(&e) => Ok(None),
            Err(e) => Err(self.err(repo, file, &describe(&e))),
        }
    }

    /// Every file of the repository at the revision (from the cached snapshot when offline).
    fn list(&self, repo: &Repo) -> Result<Vec<String>> {
        if let Some(api) = &self.api {
            let info = api.repo(repo.clone()).info().map_err(|e| self.err(repo, "(file list)", &describe(&e)))?;
            return Ok(info.siblings.into_iter().map(|s| s.rfilename).collect());
        }
        // Offline: the snapshot the revision's ref points at.
        let folder = self.cache.path().join(repo.folder_name());
        let refs = folder.join("refs").join(repo.revision());
        let commit = std::fs::read_to_string(&refs)
            .map_err(|_| self.err(repo, "(file list)", "not in the local cache and HF_HUB_OFFLINE is set"))?;
        let snapshot = folder.join("snapshots").join(commit.trim());
        let mut out = Vec::new();
        walk(&snapshot, &snapshot, &mut out);
        Ok(out)
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

fn is_not_found(e: &ApiError) -> bool {
    matches!(e, ApiError::RequestError(r) if matches!(**r, ureq::Error::Status(404, _)))
}

fn describe(e: &ApiError) -> String {
    match e {
        ApiError::RequestError(r) => match &**r {
            ureq::Error::Status(401 | 403, _) => "access denied (gated or private: set HF_TOKEN)".into(),
            ureq::Error::Status(404, _) => "not found (check the repository id, file name and revision)".into(),
            ureq::Error::Transport(t) => unreachable_hub(t),
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// One line for a Hub that cannot be reached (no network, DNS, a refused connection), naming
/// what works offline.
fn unreachable_hub(t: &ureq::Transport) -> String {
    let cause = match t.kind() {
        ureq::ErrorKind::Dns => "its name does not resolve".to_string(),
        ureq::ErrorKind::ConnectionFailed => "the connection failed".to_string(),
        _ => t.message().map_or_else(|| t.kind().to_string(), str::to_string),
    };
    format!(
        "the Hugging Face Hub is unreachable ({cause}); offline, give a local model folder instead of a Hub id, \
         or set HF_HUB_OFFLINE=1 to use what the Hugging Face cache already holds (HF_ENDPOINT names a mirror)"
    )
}
