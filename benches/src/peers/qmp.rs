//! A QMP client (the QEMU Machine Protocol) over QEMU's Unix socket: one JSON object per
//! line; the greeting, `qmp_capabilities`, then commands, each answered by `return` or
//! `error`, with asynchronous events interleaved (kept aside here, not needed).
//! No daemon in between: the socket is QEMU's own `-qmp unix:PATH,server=on,wait=off`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

/// One line QEMU sent.
#[derive(Debug, PartialEq)]
pub enum Message {
    Greeting(Value),
    Return(Value),
    Error { class: String, desc: String },
    Event(String),
}

/// Classifies one QMP line.
pub fn parse_line(line: &str) -> Result<Message, String> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| format!("QMP: not JSON ({e}): {line:?}"))?;
    let Value::Object(mut o) = v else {
        return Err(format!("QMP: not an object: {line:?}"));
    };
    if let Some(r) = o.remove("return") {
        return Ok(Message::Return(r));
    }
    if let Some(e) = o.remove("error") {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        return Ok(Message::Error {
            class: s("class"),
            desc: s("desc"),
        });
    }
    if let Some(e) = o.get("event").and_then(Value::as_str) {
        return Ok(Message::Event(e.to_string()));
    }
    if let Some(g) = o.remove("QMP") {
        return Ok(Message::Greeting(g));
    }
    Err(format!("QMP: unknown message: {line:?}"))
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to QEMU's QMP socket (retrying while QEMU starts, up to `within`),
    /// reads the greeting and leaves capabilities negotiation mode. Every later read
    /// waits at most 30 s.
    pub fn connect(path: &Path, within: Duration) -> Result<Qmp, String> {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > within => {
                    return Err(format!("QMP socket {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
        };
        match q.read()? {
            Message::Greeting(_) => {}
            m => return Err(format!("QMP: expected the greeting, got {m:?}")),
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Message, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP: QEMU closed the socket".into());
        }
        parse_line(line.trim_end())
    }

    /// Runs `command` and returns its `return` value; an `error` reply is an error.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| format!("QMP write ({command}): {e}"))?;
        loop {
            match self.read()? {
                Message::Return(v) => return Ok(v),
                Message::Error { class, desc } => {
                    return Err(format!("QMP {command}: {class}: {desc}"))
                }
                Message::Event(_) => continue,
                Message::Greeting(_) => return Err("QMP: a second greeting".into()),
            }
        }
    }
}

/// RAM figures of `query-migrate`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Ram {
    /// Bytes sent (page data, headers, zero-page markers; every channel).
    #[serde(default)]
    pub transferred: u64,
    /// Pages sent with their data, and those bytes.
    #[serde(default)]
    pub normal: u64,
    #[serde(default)]
    pub normal_bytes: u64,
    /// Zero pages (sent as a marker only).
    #[serde(default)]
    pub duplicate: u64,
    /// Dirty-bitmap syncs (1 + the iterations after the first pass).
    #[serde(default)]
    pub dirty_sync_count: u64,
    #[serde(default)]
    pub multifd_bytes: u64,
    /// QEMU's own throughput figure (Mbit/s).
    #[serde(default)]
    pub mbps: f64,
}

/// `query-migrate` of the source.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Migration {
    #[serde(default)]
    pub status: String,
    /// From the `migrate` command to completion (ms), setup and downtime included.
    pub total_time: Option<u64>,
    /// The guest stopped on the source to running on the destination (ms).
    pub downtime: Option<u64>,
    pub setup_time: Option<u64>,
    pub ram: Option<Ram>,
    pub error_desc: Option<String>,
}

impl Migration {
    pub fn parse(v: &Value) -> Result<Migration, String> {
        Migration::deserialize(v).map_err(|e| format!("query-migrate: {e}: {v}"))
    }

    /// Still running (not completed, failed or cancelled).
    pub fn active(&self) -> bool {
        !matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }

    /// Bytes sent per second over the whole migration (MB/s): what twinrun's
    /// sync figure is, bytes sent from start to the end of the copy.
    pub fn mb_per_s(&self) -> Option<f64> {
        let ms = self.total_time.filter(|&t| t > 0)?;
        Some(self.ram.as_ref()?.transferred as f64 / (ms as f64 * 1e3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply of Debian's QEMU 10.0.2 on this machine (256 MiB guest, 128 MiB filled).
    const DONE: &str = r#"{"return": {"status": "completed", "setup-time": 3, "downtime": 15, "total-time": 1779, "ram": {"total": 268967936, "postcopy-requests": 0, "dirty-sync-count": 3, "multifd-bytes": 0, "pages-per-second": 78052, "downtime-bytes": 4111, "page-size": 4096, "remaining": 0, "postcopy-bytes": 0, "mbps": 609.7496396396397, "transferred": 135364420, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 135247107, "duplicate": 32783, "dirty-pages-rate": 0, "normal-bytes": 134692864, "normal": 32884}}}"#;

    #[test]
    fn lines() {
        let g = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian"}, "capabilities": ["oob"]}}"#;
        assert!(matches!(parse_line(g), Ok(Message::Greeting(_))));
        assert_eq!(
            parse_line(r#"{"return": {}}"#),
            Ok(Message::Return(json!({})))
        );
        assert_eq!(
            parse_line(
                r#"{"error": {"class": "GenericError", "desc": "There's a migration process in progress"}}"#
            ),
            Ok(Message::Error {
                class: "GenericError".into(),
                desc: "There's a migration process in progress".into()
            })
        );
        let ev = r#"{"timestamp": {"seconds": 1796611994, "microseconds": 805863}, "event": "MIGRATION", "data": {"status": "setup"}}"#;
        assert_eq!(parse_line(ev), Ok(Message::Event("MIGRATION".into())));
        assert!(parse_line("{\"what\": 1}").is_err());
        assert!(parse_line("not json").is_err());
        assert!(parse_line("[1]").is_err());
    }

    #[test]
    fn completed_migration() {
        let Ok(Message::Return(v)) = parse_line(DONE) else {
            panic!("not a return");
        };
        let m = Migration::parse(&v).unwrap();
        assert!(!m.active());
        assert_eq!(m.total_time, Some(1779));
        assert_eq!(m.downtime, Some(15));
        assert_eq!(m.setup_time, Some(3));
        let ram = m.ram.clone().unwrap();
        assert_eq!(ram.transferred, 135_364_420);
        assert_eq!(ram.normal, 32_884);
        assert_eq!(ram.duplicate, 32_783);
        assert_eq!(ram.dirty_sync_count, 3);
        let mbs = m.mb_per_s().unwrap();
        assert!((mbs - 76.09).abs() < 0.01, "{mbs}");
        // QEMU's own figure counts the same bytes over a slightly shorter time.
        assert!(ram.mbps / 8.0 > mbs);
    }

    #[test]
    fn migration_states() {
        let m = Migration::parse(
            &json!({"status": "active", "total-time": 10, "ram": {"transferred": 5}}),
        )
        .unwrap();
        assert!(m.active());
        assert_eq!(m.downtime, None);
        let m = Migration::parse(
            &json!({"status": "failed", "error-desc": "Unable to write to socket"}),
        )
        .unwrap();
        assert!(!m.active());
        assert_eq!(m.error_desc.as_deref(), Some("Unable to write to socket"));
        assert_eq!(m.mb_per_s(), None);
        // Before any migration, QEMU answers an empty object.
        let m = Migration::parse(&json!({})).unwrap();
        assert!(m.active() && m.ram.is_none());
        assert!(Migration::parse(&json!({"status": 3})).is_err());
    }
}
