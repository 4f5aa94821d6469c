//! The few facts about a process that adoption needs, from /proc.

pub struct Stat {
    /// Clock ticks after boot when it started (field 22): a pid reused by another
    /// process has another start time.
    pub start_time: u64,
    /// Its main thread ended (state Z or X). Other threads may still run, holding the
    /// process's files: see [`Stat::ended`].
    pub zombie: bool,
    /// Threads still alive (field 20).
    pub threads: u64,
}

impl Stat {
    /// The whole process ended (not yet reaped): its main thread is a zombie and no
    /// other thread remains, so its files (the control socket) are closed. A SIGKILLed
    /// multi-threaded VMM shows a zombie main thread while its vCPU threads still
    /// unwind.
    pub fn ended(&self) -> bool {
        self.zombie && self.threads <= 1
    }
}

pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19.
    Some(Stat {
        zombie: matches!(fields.first(), Some(&"Z") | Some(&"X")),
        threads: fields.get(17)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_process() {
        let me = std::process::id();
        let s = super::stat(me).unwrap();
        assert!(s.start_time > 0);
        assert!(!s.zombie && !s.ended());
        assert!(s.threads >= 1);
        assert!(!super::cmdline(me).unwrap().is_empty());
        assert!(super::stat(u32::MAX).is_none());
    }
}
