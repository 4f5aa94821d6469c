//! The few facts about a process that adoption needs, from /proc.

pub struct Stat {
    /// Clock ticks after boot when it started (field 22): a pid reused by another
    /// process has another start time.
    pub start_time: u64,
    /// Ended but not yet reaped.
    pub zombie: bool,
}

pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19.
    Some(Stat {
        zombie: matches!(fields.first(), Some(&"Z") | Some(&"X")),
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
        assert!(!s.zombie);
        assert!(!super::cmdline(me).unwrap().is_empty());
        assert!(super::stat(u32::MAX).is_none());
    }
}
