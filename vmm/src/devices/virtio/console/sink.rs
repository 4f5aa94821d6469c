//! Where guest console output goes: stdout, a file (appended) or a Unix socket.
//!
//! The socket sink is a server: the VMM binds the path and keeps all output, in order,
//! until a reader connects, then streams it. A reader that connects later gets
//! everything not yet delivered. A new connection replaces the current reader. Output is
//! never reordered; if no reader drains it, at most [`MAX_PENDING`] bytes are kept and
//! the oldest are dropped beyond that (counted in `dropped`).
//!
//! Writes never block the vCPU thread: the socket is non-blocking, and what it does not
//! take stays pending until the backend thread sees it writable (edge-triggered
//! EPOLLOUT) and calls [`ConsoleSink::on_writable`].

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::config::ConsoleConfig;

/// Bytes kept for a socket reader that has not connected (or is not reading).
pub const MAX_PENDING: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("console file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("console socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
}

pub struct SocketSink {
    path: PathBuf,
    listener: UnixListener,
    client: Option<UnixStream>,
    /// Set when a write failed for good; the backend thread closes the client then
    /// (so fd numbers it registered stay valid until it unregisters them).
    client_dead: bool,
    pending: VecDeque<u8>,
    pub dropped: u64,
}

pub enum ConsoleSink {
    Stdout,
    File(File),
    /// A file written at stream positions (`pwrite`), not appended: writing the same
    /// bytes at the same position twice leaves the file as once. FT mode's standby
    /// re-releases output the dead primary may or may not have released; this makes
    /// that idempotent. `next` is where direct output goes.
    Positioned {
        file: File,
        next: u64,
    },
    Socket(Box<SocketSink>),
}

impl ConsoleSink {
    pub fn new(cfg: &ConsoleConfig) -> Result<ConsoleSink, SinkError> {
        Ok(match cfg {
            ConsoleConfig::Stdout => ConsoleSink::Stdout,
            ConsoleConfig::File { path } => ConsoleSink::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SinkError::File {
                        path: path.clone(),
                        source,
                    })?,
            ),
            ConsoleConfig::Socket { path } => {
                ConsoleSink::Socket(Box::new(SocketSink::bind(path).map_err(|source| {
                    SinkError::Socket {
                        path: path.clone(),
                        source,
                    }
                })?))
            }
        })
    }

    /// Sends guest output on. Errors of the destination are logged, not returned: the
    /// guest cannot do anything about them.
    pub fn write(&mut self, data: &[u8]) {
        let r = match self {
            ConsoleSink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(data).and_then(|_| out.flush())
            }
            ConsoleSink::File(f) => f.write_all(data),
            ConsoleSink::Positioned { file, next } => {
                let r = file.write_all_at(data, *next);
                *next += data.len() as u64;
                r
            }
            ConsoleSink::Socket(s) => {
                s.write(data);
                Ok(())
            }
        };
        if let Err(e) = r {
            log::warn!("console output lost: {e}");
        }
    }

    /// Sends several buffers on, in order, with as few system calls as the destination
    /// allows (`writev` for a file or stdout). Used to release held output.
    pub fn write_all_vectored(&mut self, bufs: &[&[u8]]) {
        let r = match self {
            ConsoleSink::Stdout => {
                let mut out = io::stdout().lock();
                bufs.iter()
                    .try_for_each(|b| out.write_all(b))
                    .and_then(|_| out.flush())
            }
            ConsoleSink::File(f) => write_all_vectored(f, bufs),
            ConsoleSink::Positioned { next, .. } => {
                let at = *next;
                return self.write_all_at(at, bufs);
            }
            ConsoleSink::Socket(s) => {
                for b in bufs {
                    s.pending.extend(*b);
                }
                s.write(&[]);
                Ok(())
            }
        };
        if let Err(e) = r {
            log::warn!("console output lost: {e}");
        }
    }

    /// Writes `bufs` (consecutive) at stream position `pos` on a positioned sink, and
    /// moves the position of later direct output past them if it was before; other
    /// sinks have no positions and write in order.
    pub fn write_all_at(&mut self, pos: u64, bufs: &[&[u8]]) {
        let ConsoleSink::Positioned { file, next } = self else {
            return self.write_all_vectored(bufs);
        };
        let mut at = pos;
        for b in bufs {
            if let Err(e) = file.write_all_at(b, at) {
                log::warn!("console output lost at position {at}: {e}");
                return;
            }
            at += b.len() as u64;
        }
        *next = (*next).max(at);
    }

    /// Turns a file sink into a positioned one whose next output goes to `next` (by
    /// default the file's length, where appending would have put it). Returns the
    /// position, or None for sinks without positions (stdout, socket).
    pub fn make_positioned(&mut self, next: Option<u64>) -> io::Result<Option<u64>> {
        match self {
            ConsoleSink::File(f) => {
                // O_APPEND would make pwrite append on Linux: clear it.
                let fd = f.as_raw_fd();
                // SAFETY: fcntl on a descriptor this sink owns; no memory is passed.
                let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
                if flags < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: as above; only the O_APPEND status flag changes.
                if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_APPEND) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                let file = f.try_clone()?;
                let next = match next {
                    Some(n) => n,
                    None => file.metadata()?.len(),
                };
                *self = ConsoleSink::Positioned { file, next };
                Ok(Some(next))
            }
            ConsoleSink::Positioned { next: n, .. } => {
                if let Some(p) = next {
                    *n = p;
                }
                Ok(Some(*n))
            }
            _ => Ok(None),
        }
    }

    /// Where the next output goes in the stream, when the sink knows it: a positioned
    /// sink's position, or an appended file's length.
    pub fn position(&self) -> Option<u64> {
        match self {
            ConsoleSink::Positioned { next, .. } => Some(*next),
            ConsoleSink::File(f) => f.metadata().ok().map(|m| m.len()),
            _ => None,
        }
    }

    /// Descriptors for the backend thread: the listener, and the client for
    /// writability/hang-up.
    pub fn fds(&self) -> Vec<(RawFd, u32)> {
        match self {
            ConsoleSink::Socket(s) => {
                let mut v = vec![(s.listener.as_raw_fd(), libc::EPOLLIN as u32)];
                if let Some(c) = &s.client {
                    v.push((
                        c.as_raw_fd(),
                        (libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                    ));
                }
                v
            }
            _ => Vec::new(),
        }
    }

    /// The backend thread saw `fd` ready.
    pub fn on_event(&mut self, fd: RawFd, events: u32) {
        if let ConsoleSink::Socket(s) = self {
            if fd == s.listener.as_raw_fd() {
                s.accept();
            } else if s.client.as_ref().is_some_and(|c| c.as_raw_fd() == fd) {
                let hup = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
                if events & hup != 0 || s.client_dead {
                    s.drop_client();
                } else {
                    s.flush_pending();
                }
            }
        }
    }

    /// Best effort to deliver everything before the VMM stops (waits up to a second
    /// for a slow socket reader).
    pub fn flush(&mut self) {
        match self {
            ConsoleSink::Stdout => {
                let _ = io::stdout().flush();
            }
            ConsoleSink::File(f) | ConsoleSink::Positioned { file: f, .. } => {
                let _ = f.flush();
            }
            ConsoleSink::Socket(s) => s.flush_blocking(),
        }
    }

    /// Output not yet delivered (socket sink only).
    pub fn pending(&self) -> usize {
        match self {
            ConsoleSink::Socket(s) => s.pending.len(),
            _ => 0,
        }
    }
}

/// `write_all` over several buffers (std's is unstable): `writev` until all is written.
fn write_all_vectored(f: &mut File, bufs: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    // Empty buffers would make a writev of only empties return 0.
    io::IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match f.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl SocketSink {
    fn bind(path: &Path) -> io::Result<SocketSink> {
        // A socket left by a previous run is replaced; anything else is not ours.
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if m.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(SocketSink {
            path: path.to_owned(),
            listener,
            client: None,
            client_dead: false,
            pending: VecDeque::new(),
            dropped: 0,
        })
    }

    fn write(&mut self, data: &[u8]) {
        self.pending.extend(data);
        if self.pending.len() > MAX_PENDING {
            let excess = self.pending.len() - MAX_PENDING;
            self.pending.drain(..excess);
            self.dropped += excess as u64;
        }
        self.flush_pending();
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    // The newest reader wins; the old one is closed here, on the backend
                    // thread, which unregisters its fd right after this event.
                    self.client = Some(stream);
                    self.client_dead = false;
                    self.flush_pending();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("console socket accept: {e}");
                    return;
                }
            }
        }
    }

    fn drop_client(&mut self) {
        self.client = None;
        self.client_dead = false;
    }

    fn flush_pending(&mut self) {
        if self.client_dead {
            return;
        }
        let Some(c) = &mut self.client else {
            return;
        };
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            match c.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // Reader went away: keep the output for the next one.
                    self.client_dead = true;
                    break;
                }
            }
        }
    }

    fn flush_blocking(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while !self.pending.is_empty()
            && self.client.is_some()
            && !self.client_dead
            && std::time::Instant::now() < deadline
        {
            self.flush_pending();
            if !self.pending.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

impl Drop for SocketSink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
