//! Hub downloads against a local HTTP server that speaks the routes and headers hf-hub uses
//! (`/{repo}/resolve/{rev}/{file}` with a ranged GET, `etag`, `x-repo-commit`, `content-range`;
//! `/api/datasets/{repo}/revision/{rev}` for file lists), then offline use of the warm cache.
//! The binary runs with its own `HF_ENDPOINT` / `HF_HOME`, so no test touches this process's
//! environment or the network.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::shared;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct Server {
    url: String,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<Mutex<bool>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        *self.stop.lock().unwrap() = true;
    }
}

/// Serve `files` (URL path after the endpoint, without the revision part, -> bytes) until
/// dropped or 120 s have passed.
fn serve(files: BTreeMap<String, Vec<u8>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(Mutex::new(false));
    let (log2, stop2) = (log.clone(), stop.clone());
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline && !*stop2.lock().unwrap() {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = handle(stream, &files, &log2);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Server { url, log, stop }
}

fn handle(mut stream: TcpStream, files: &BTreeMap<String, Vec<u8>>, log: &Mutex<Vec<String>>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range: Option<(usize, Option<usize>)> = None;
    for _ in 0..100 {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().trim().strip_prefix("range: bytes=") {
            let (a, b) = v.split_once('-').unwrap_or((v, ""));
            range = a.parse().ok().map(|a| (a, b.parse().ok()));
        }
    }
    log.lock().unwrap().push(path.clone());
    let key = path.replacen("/resolve/main/", "/", 1).replacen("/revision/main", "", 1);
    let (status, headers, body): (&str, String, Vec<u8>) = match files.get(&key) {
        Some(data) if path.starts_with("/api/") => {
            ("200 OK", "Content-Type: application/json\r\n".into(), data.clone())
        }
        Some(data) => {
            // hf-hub asks `bytes=0-0` for the metadata, then `bytes=N-` for the body.
            let (start, last) = range.unwrap_or((0, None));
            let start = start.min(data.len());
            let end = last.map_or(data.len(), |l| (l + 1).min(data.len()));
            let headers = format!(
                "ETag: \"etag-{}-{}\"\r\nX-Repo-Commit: {COMMIT}\r\nContent-Range: bytes {start}-{}/{}\r\n",
                key.replace('/', "_"),
                data.len(),
                end.saturating_sub(1),
                data.len()
            );
            ("206 Partial Content", headers, data[start..end].to_vec())
        }
        None => ("404 Not Found", "X-Error-Code: EntryNotFound\r\n".into(), b"not found".to_vec()),
    };
    write!(stream, "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
    stream.write_all(&body)?;
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    Ok(())
}

fn temper(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_temper"));
    cmd.args(args);
    // ureq would send even 127.0.0.1 through a proxy named in the environment.
    for k in [
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HF_TOKEN_PATH",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run temper")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "temper failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn repo_files() -> BTreeMap<String, Vec<u8>> {
    let model = shared("models/stories260K");
    let mut files = BTreeMap::new();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        files.insert(format!("/org/tiny/{f}"), std::fs::read(model.join(f)).unwrap());
    }
    let rows = "{\"prompt\": \"Lily had a ball.\", \"completion\": \" She threw it.\"}\n";
    files.insert("/datasets/org/stories/data/train-00000.jsonl".into(), rows.as_bytes().to_vec());
    files.insert("/datasets/org/stories/data/test-00000.jsonl".into(), b"{\"text\": \"x\"}\n".to_vec());
    let siblings = r#"{"sha": "0123456789abcdef0123456789abcdef01234567", "siblings": [{"rfilename": "README.md"},
        {"rfilename": "data/train-00000.jsonl"}, {"rfilename": "data/test-00000.jsonl"}]}"#;
    files.insert("/api/datasets/org/stories".into(), siblings.as_bytes().to_vec());
    files
}

#[test]
fn hub_model_and_dataset_download_then_work_offline_from_the_cache() {
    let home = tempfile::tempdir().unwrap();
    let hf_home = home.path().to_str().unwrap();
    let server = serve(repo_files());
    let env = [("HF_ENDPOINT", server.url.as_str()), ("HF_HOME", hf_home)];

    // A model id through `inspect`, then a dataset split through `preview` (same code as training).
    let v: serde_json::Value = serde_json::from_str(&ok(&temper(&["inspect", "org/tiny", "--json"], &env))).unwrap();
    assert_eq!(v["parameters"], 260032);
    let recipe = home.path().join("r.yaml");
    std::fs::write(&recipe, "data:\n  train: hub:org/stories\n  split: train\n").unwrap();
    let out = ok(&temper(&["preview", "--model", "org/tiny", "--recipe", recipe.to_str().unwrap(), "--jsonl"], &env));
    assert_eq!(out.lines().count(), 1, "{out}");
    let snapshot = home.path().join(format!("hub/models--org--tiny/snapshots/{COMMIT}"));
    assert!(snapshot.join("model.safetensors").is_file() && snapshot.join("tokenizer.json").is_file());
    assert!(!snapshot.join("generation_config.json").exists(), "an absent optional file is skipped");
    let requests = server.log.lock().unwrap().clone();
    assert!(requests.iter().any(|r| r == "/api/datasets/org/stories/revision/main"), "{requests:?}");
    assert!(!requests.iter().any(|r| r.contains("test-00000")), "only the train split is fetched: {requests:?}");
    drop(server);

    // Offline: the warm cache answers without a server; a file never fetched is an error naming it.
    let offline = [("HF_ENDPOINT", "http://127.0.0.1:9"), ("HF_HOME", hf_home), ("HF_HUB_OFFLINE", "1")];
    let again =
        ok(&temper(&["preview", "--model", "org/tiny", "--recipe", recipe.to_str().unwrap(), "--jsonl"], &offline));
    assert_eq!(again, out);
    let err = temper(&["preview", "--model", "org/tiny", "--data", "hub:org/stories/data/test-00000.jsonl"], &offline);
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        !err.status.success() && stderr.contains("test-00000.jsonl") && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
}

/// No network (here a port nothing listens on): one line that says the Hub is unreachable and
/// names what works offline.
#[test]
fn unreachable_hub_is_one_line_naming_the_offline_alternatives() {
    let home = tempfile::tempdir().unwrap();
    let env = [("HF_ENDPOINT", "http://127.0.0.1:9"), ("HF_HOME", home.path().to_str().unwrap())];
    let out = temper(&["inspect", "org/tiny"], &env);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    for part in ["org/tiny", "unreachable", "local model folder", "HF_HUB_OFFLINE=1"] {
        assert!(stderr.contains(part), "names {part}: {stderr}");
    }
}

#[test]
fn missing_hub_repository_is_reported_with_repo_and_file() {
    let home = tempfile::tempdir().unwrap();
    let server = serve(BTreeMap::new());
    let env = [("HF_ENDPOINT", server.url.as_str()), ("HF_HOME", home.path().to_str().unwrap())];
    let out = temper(&["inspect", "org/nothing"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("org/nothing")
            && stderr.contains("config.json")
            && stderr.contains("not found"),
        "{stderr}"
    );
}

#[test]
fn local_model_folder_is_used_as_is() {
    let dir = shared("models/stories260K");
    assert_eq!(temper::hub::resolve_model(dir.to_str().unwrap(), None).unwrap(), dir);
    let e = temper::hub::resolve_model("no/such/thing/here", None).unwrap_err().to_string();
    assert!(e.contains("not an existing folder"), "{e}");
}
