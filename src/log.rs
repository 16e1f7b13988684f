//! A JSON-lines event log: one object per line (`{"event": ..., "time": ..., ...fields}`),
//! appended and flushed as it is written, so a crashed run keeps every event before the crash;
//! and the progress bar of the commands that stream images through the model.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub struct JsonLog {
    path: PathBuf,
    file: File,
}

impl JsonLog {
    /// Opens `path` for appending, creating it and its folder if needed.
    pub fn open(path: &Path) -> Result<JsonLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(JsonLog { path: path.to_path_buf(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event. `fields` must serialise to a JSON object (a struct or a map); its keys
    /// are written after `event` and `time` (seconds since the Unix epoch).
    pub fn write(&mut self, event: &str, fields: &impl Serialize) -> Result<()> {
        let fields =
            serde_json::to_value(fields).map_err(|e| Error::msg(format!("{}: cannot serialise {event}: {e}", self.path.display())))?;
        let Value::Object(fields) = fields else {
            return Err(Error::msg(format!("{}: event {event} is not a JSON object", self.path.display())));
        };
        let time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut obj = Map::new();
        obj.insert("event".into(), Value::from(event));
        obj.insert("time".into(), Value::from(time));
        obj.extend(fields);
        let mut line = Value::Object(obj).to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush()).map_err(|e| Error::io(&self.path, e))
    }
}

/// A bar counting `len` images as `label` goes through them, with images/s and ETA; indicatif
/// draws it on stderr only when that is a terminal.
pub fn image_bar(len: usize, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix} {bar:24} {pos}/{len} images, {per_sec} [{elapsed_precise}<{eta_precise}]")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Epoch {
        epoch: usize,
        loss: f64,
    }

    #[test]
    fn appends_one_flushed_object_per_line() {
        let dir = std::env::temp_dir().join(format!("plr-log-test-{}", std::process::id()));
        let path = dir.join("sub/log.jsonl");
        let _ = std::fs::remove_dir_all(&dir);
        let mut log = JsonLog::open(&path).unwrap();
        log.write("epoch", &Epoch { epoch: 1, loss: 2.5 }).unwrap();
        // Visible on disk before the logger is dropped.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        drop(log);
        let mut log = JsonLog::open(&path).unwrap();
        log.write("eval", &serde_json::json!({"map": 0.5})).unwrap();
        assert!(log.write("bad", &3).is_err());
        let lines: Vec<Value> = std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "epoch");
        assert_eq!(lines[0]["epoch"], 1);
        assert_eq!(lines[0]["loss"], 2.5);
        assert!(lines[0]["time"].as_f64().unwrap() > 1e9);
        assert_eq!(lines[1]["event"], "eval");
        assert_eq!(lines[1]["map"], 0.5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
