//! Zero-copy relaying of one direction through a pipe with `splice(2)`.
//!
//! Why: a bulk flow copied through a user-space buffer costs two copies per
//! byte (socket → buffer → socket) and most of the relay's CPU; with
//! `splice` the kernel moves page references socket → pipe → socket and the
//! bytes never enter user space (haproxy's `option splice-auto`, Envoy's
//! and ztunnel's discussions of the same). A pipe costs two descriptors and
//! up to its capacity in kernel pages, so it is created only for flows that
//! have proven to be bulk (see [`super::copy`]), never for request/response
//! chatter, where one `recv` + one `send` is already the minimum.
//!
//! Readiness: both sockets stay registered with tokio; every `splice` runs
//! inside `TcpStream::try_io`, so an `EAGAIN` clears the cached readiness and
//! the next `readable()`/`writable()` waits for the reactor. The pipe itself
//! is non-blocking and is always emptied before the socket is read again, so
//! an `EAGAIN` on the read side always means "socket empty", never "pipe
//! full". The safe `nix` wrappers are used: no `unsafe` here.

use std::io;
use std::os::fd::OwnedFd;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// A non-blocking pipe used as the in-kernel buffer of one direction.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe holds at most: the most one splice asks for.
    capacity: usize,
}

impl Pipe {
    /// A pipe of (about) `size` bytes. The size is a request: the kernel
    /// rounds it to whole pages and an unprivileged process cannot exceed
    /// `/proc/sys/fs/pipe-max-size`; the default (16 pages) is kept when the
    /// resize fails.
    pub fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let want = i32::try_from(size.max(4096)).unwrap_or(i32::MAX);
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(want));
        let capacity = match fcntl(&write, FcntlArg::F_GETPIPE_SZ) {
            Ok(n) if n > 0 => n as usize,
            _ => 16 * 4096,
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves up to the pipe's capacity from `from` into the (empty) pipe.
    /// `Ok(0)` is the peer's EOF; `WouldBlock` means nothing to read now
    /// (tokio's read readiness is cleared).
    pub fn fill(&self, from: &TcpStream) -> io::Result<usize> {
        from.try_io(Interest::READABLE, || {
            splice(
                from,
                None,
                &self.write,
                None,
                self.capacity,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            )
            .map_err(io::Error::from)
        })
    }

    /// Moves up to `len` bytes held in the pipe to `to`. `WouldBlock` means
    /// `to`'s send buffer is full (tokio's write readiness is cleared).
    pub fn drain(&self, to: &TcpStream, len: usize) -> io::Result<usize> {
        to.try_io(Interest::WRITABLE, || {
            splice(
                &self.read,
                None,
                to,
                None,
                len,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            )
            .map_err(io::Error::from)
        })
    }
}
