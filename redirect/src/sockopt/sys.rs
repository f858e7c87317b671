//! The raw kernel calls behind the sockmap fast path: `bpf(2)` (map create,
//! update, delete; program load and attach), `TCP_INFO` and `SIOCOUTQ`.
//!
//! Why raw: no well-kept crate loads hand-assembled BPF instructions without
//! an ELF object (aya and libbpf-rs both want a compiled object file), and
//! neither `nix` nor `socket2` exposes `TCP_INFO` or `SIOCOUTQ`. This is the
//! only file in lightpath with `unsafe`; each block passes a pointer to a
//! local, fully initialised `repr(C)` value whose size is passed alongside,
//! so the kernel never reads or writes past it. Callers see safe functions
//! that take `AsFd` and slices.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;

/// `union bpf_attr` is 144 bytes on 6.x kernels; the kernel accepts a
/// shorter attribute as long as the fields it reads are inside it and
/// rejects non-zero bytes past what it knows. Every command below passes
/// this zeroed buffer with only its own fields set.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32_at(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised 128-byte buffer and its size is
    // passed; every pointer stored inside it (keys, values, instructions,
    // license, log) points to memory the caller keeps alive for this call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr() as *mut libc::c_void,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf returned a bad descriptor"))?;
    // SAFETY: the kernel just returned this descriptor to us; nobody else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_MAP_CREATE`.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32_at(0, map_type)
        .u32_at(4, key_size)
        .u32_at(8, value_size)
        .u32_at(12, max_entries);
    owned(bpf(BPF_MAP_CREATE, &mut a)?)
}

/// `BPF_MAP_UPDATE_ELEM` of a socket map: `key` → the socket `sock`.
pub fn map_update_sock(
    map: &impl AsFd,
    key: &[u8],
    sock: &impl AsFd,
    flags: u64,
) -> io::Result<()> {
    let value: u32 = sock.as_fd().as_raw_fd() as u32;
    let mut a = Attr::new();
    a.u32_at(0, map.as_fd().as_raw_fd() as u32)
        .u64_at(8, key.as_ptr() as u64)
        .u64_at(16, &value as *const u32 as u64)
        .u64_at(24, flags);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
}

/// `BPF_MAP_DELETE_ELEM`.
pub fn map_delete(map: &impl AsFd, key: &[u8]) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32_at(0, map.as_fd().as_raw_fd() as u32)
        .u64_at(8, key.as_ptr() as u64);
    bpf(BPF_MAP_DELETE_ELEM, &mut a).map(drop)
}

/// `BPF_PROG_LOAD` of `insns` (8 bytes each, already encoded). On failure
/// the verifier's log (when it wrote one) is appended to the error.
pub fn prog_load(prog_type: u32, insns: &[u64], license: &std::ffi::CStr) -> io::Result<OwnedFd> {
    let load = |log: Option<&mut Vec<u8>>| {
        let mut a = Attr::new();
        a.u32_at(0, prog_type)
            .u32_at(4, insns.len() as u32)
            .u64_at(8, insns.as_ptr() as u64)
            .u64_at(16, license.as_ptr() as u64);
        if let Some(log) = log {
            a.u32_at(24, 1)
                .u32_at(28, log.len() as u32)
                .u64_at(32, log.as_mut_ptr() as u64);
            bpf(BPF_PROG_LOAD, &mut a)
        } else {
            bpf(BPF_PROG_LOAD, &mut a)
        }
    };
    match load(None) {
        Ok(fd) => owned(fd),
        Err(e) => {
            let mut log = vec![0u8; 16 * 1024];
            let _ = load(Some(&mut log));
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let text = text.trim();
            if text.is_empty() {
                Err(e)
            } else {
                Err(io::Error::new(e.kind(), format!("{e}; verifier: {text}")))
            }
        }
    }
}

/// `BPF_PROG_ATTACH` of `prog` to `target` (a map for socket programs).
pub fn prog_attach(prog: &impl AsFd, target: &impl AsFd, attach_type: u32) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32_at(0, target.as_fd().as_raw_fd() as u32)
        .u32_at(4, prog.as_fd().as_raw_fd() as u32)
        .u32_at(8, attach_type);
    bpf(BPF_PROG_ATTACH, &mut a).map(drop)
}

/// The `TCP_INFO` counters the fast path needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// `tcpi_bytes_acked`: sequence space the peer acknowledged (the
    /// active opener's SYN and a FIN count one each).
    pub bytes_acked: u64,
    /// `tcpi_bytes_received`: sequence space received in order (a FIN
    /// counts one).
    pub bytes_received: u64,
    /// `tcpi_last_data_recv`: milliseconds since data last arrived.
    pub last_data_recv_ms: u32,
}

/// `getsockopt(TCP_INFO)`.
pub fn tcp_counters(sock: &impl AsFd) -> io::Result<TcpCounters> {
    // SAFETY: tcp_info is plain old data (integers only); all-zero is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a live tcp_info and `len` its size; the kernel
    // writes at most `len` bytes and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // bytes_received ends at byte 136 of struct tcp_info (Linux 4.1+).
    if (len as usize) < 136 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("TCP_INFO is {len} bytes, too short for tcpi_bytes_received"),
        ));
    }
    Ok(TcpCounters {
        bytes_acked: info.tcpi_bytes_acked,
        bytes_received: info.tcpi_bytes_received,
        last_data_recv_ms: info.tcpi_last_data_recv,
    })
}

/// `ioctl(SIOCOUTQ)`: bytes in the send queue not yet acknowledged (sent or
/// not).
pub fn outq(sock: &impl AsFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (== TIOCOUTQ) writes one int through the pointer.
    let r = unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// `setsockopt(SO_RCVLOWAT)` (neither `nix` nor `socket2` has it).
pub fn set_rcvlowat(sock: &impl AsFd, bytes: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a local int and its size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &bytes as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An epoll instance registered with tokio's reactor: readable when one of
/// the sockets added to it has an event. The descriptor is private and never
/// replaced, which is what [`tokio::io::unix::AsyncFd::register`] requires.
pub struct WatchFd(nix::sys::epoll::Epoll);

impl AsRawFd for WatchFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0 .0.as_raw_fd()
    }
}

impl WatchFd {
    pub fn epoll(&self) -> &nix::sys::epoll::Epoll {
        &self.0
    }
}

/// Registers `ep` with the current tokio runtime (read interest only).
pub fn register_epoll(ep: nix::sys::epoll::Epoll) -> io::Result<tokio::io::unix::AsyncFd<WatchFd>> {
    // SAFETY: `WatchFd` owns the epoll descriptor for as long as the AsyncFd
    // lives; its field is private and it offers no way to swap or close it,
    // so `as_raw_fd` returns the same open descriptor throughout.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(WatchFd(ep), tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}
