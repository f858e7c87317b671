//! Socket options for the transparent data path: the only module that sets
//! raw socket options.
//!
//! Why one module: each option here changes what the kernel routes to or from
//! a socket, and getting one wrong fails silently (a listener that never sees
//! TPROXY'd connections, an upstream connection the rules capture again).
//! Everything goes through `socket2`'s safe wrappers, so the crate needs no
//! `unsafe` at all.
//!
//! * [`transparent_listener`]: IP_TRANSPARENT / IPV6_TRANSPARENT (so TPROXY
//!   may deliver connections for non-local addresses), SO_REUSEADDR (restart
//!   while old connections sit in TIME_WAIT) and SO_REUSEPORT (a new process
//!   can bind before the old one has drained: no refused window on upgrade).
//! * [`original_dst`]: under TPROXY the accepted socket's local address *is*
//!   the original destination; under a REDIRECT/DNAT setup it is the
//!   listener's own address, and conntrack's SO_ORIGINAL_DST has the truth
//!   (so that is asked first; without a conntrack entry it fails at once).
//! * [`upstream_socket`]: SO_MARK on lightpath's own connections, so the
//!   `output` rule never sends them back to lightpath.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Listen backlog: a burst of SYNs while the accept loop is busy must not be
/// dropped (the kernel caps it at `net.core.somaxconn` anyway).
pub const LISTEN_BACKLOG: i32 = 4096;

/// Creates a non-blocking transparent TCP listener on `addr` (hand it to
/// `tokio::net::TcpListener::from_std`). Needs CAP_NET_ADMIN. An IPv6
/// listener is v6-only: IPv4 frontends go to the IPv4 listener.
pub fn transparent_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    match addr {
        SocketAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => {
            sock.set_only_v6(true)?;
            sock.set_ip_transparent_v6(true)?;
        }
    }
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    Ok(sock.into())
}

/// The destination the client originally dialled, for an accepted stream.
///
/// Conntrack's SO_ORIGINAL_DST when it has an entry (it is the truth both
/// for REDIRECT/DNAT, where the local address is the listener's own, and for
/// TPROXY, where nothing was rewritten), else the local address: under
/// TPROXY that *is* the original destination, with or without conntrack.
/// One getsockopt per connection. v4-mapped IPv6 addresses are returned as
/// IPv4.
pub fn original_dst<S: AsFd>(stream: &S) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an inet socket"))?;
    let conntrack = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock
            .original_dst_v6()
            .or_else(|_| sock.original_dst_v4()),
    };
    let addr = conntrack.ok().and_then(|a| a.as_socket()).unwrap_or(local);
    Ok(canonical(addr))
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A TCP socket for connecting to `dest`, carrying SO_MARK `mark` (skipped
/// when `mark` is 0, e.g. in tests without CAP_NET_ADMIN). Call
/// `.connect(dest)` on the result, under the caller's timeout.
pub fn upstream_socket(dest: SocketAddr, mark: u32) -> io::Result<tokio::net::TcpSocket> {
    let sock = match dest {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if mark != 0 {
        set_mark(&sock, mark)?;
    }
    sock.set_nodelay(true)?;
    Ok(sock)
}

/// Sets SO_MARK on any socket. Needs CAP_NET_ADMIN.
pub fn set_mark<S: AsFd>(sock: &S, mark: u32) -> io::Result<()> {
    SockRef::from(sock).set_mark(mark)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    #[test]
    fn plain_socket_original_dst_is_local_addr() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(original_dst(&s).unwrap(), addr);
    }

    #[test]
    fn v4_mapped_is_canonicalised() {
        let a: SocketAddr = "[::ffff:10.96.0.1]:80".parse().unwrap();
        assert_eq!(canonical(a), "10.96.0.1:80".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn transparent_listener_needs_privilege_or_works() {
        // As root this binds; without CAP_NET_ADMIN the kernel says EPERM.
        // Either way the error is a clean io::Error, never a panic.
        match transparent_listener("127.0.0.1:0".parse().unwrap()) {
            Ok(l) => {
                let addr = l.local_addr().unwrap();
                l.set_nonblocking(false).unwrap();
                let _c = TcpStream::connect(addr).unwrap();
                let (s, _) = l.accept().unwrap();
                assert_eq!(original_dst(&s).unwrap(), addr);
                assert!(SockRef::from(&s).ip_transparent_v4().unwrap());
                assert!(SockRef::from(&s).reuse_port().unwrap());
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }

    #[tokio::test]
    async fn upstream_socket_without_mark_connects() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let s = upstream_socket(addr, 0).unwrap();
        let _c = s.connect(addr).await.unwrap();
        let _ = l.accept().await.unwrap();
    }
}
