//! Socket options for the transparent data path: the only module that sets
//! raw socket options.
//!
//! Why one module: each option here changes what the kernel routes to or from
//! a socket, and getting one wrong fails silently (a listener that never sees
//! TPROXY'd connections, an upstream connection the rules capture again).
//! Everything goes through `socket2`'s and `nix`'s safe wrappers, so the
//! crate needs no `unsafe` at all.
//!
//! * [`transparent_listener`]: IP_TRANSPARENT / IPV6_TRANSPARENT (so TPROXY
//!   may deliver connections for non-local addresses), SO_REUSEADDR (restart
//!   while old connections sit in TIME_WAIT) and SO_REUSEPORT (a new process
//!   can bind before the old one has drained: no refused window on upgrade).
//! * [`original_dst`]: under TPROXY the accepted socket's local address *is*
//!   the original destination; under a REDIRECT/DNAT setup it is the
//!   listener's own address, and conntrack's SO_ORIGINAL_DST has the truth
//!   (so that is asked first; without a conntrack entry it fails at once).
//! * UDP under TPROXY: [`transparent_udp`] (a transparent socket that asks
//!   for each datagram's original destination), [`recv_orig_dst`] (recvmsg
//!   with the IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control message: UDP has no
//!   accepted socket whose local address would tell) and [`reply_socket`]
//!   (bound to the non-local service address, so replies carry it as source).
//! * [`upstream_connect`]: SO_MARK on lightpath's own connections, so the
//!   `output` rule never sends them back to lightpath; and, to keep the
//!   client's address as the source, IP_TRANSPARENT plus a bind to that
//!   (non-local) address with IP_BIND_ADDRESS_NO_PORT (the port is chosen at
//!   connect time per 4-tuple, so one busy client cannot exhaust a port
//!   range of its own). The endpoint's replies, addressed to the client,
//!   are steered back to the socket by the nftables reply rule
//!   ([`crate::nft`]).
//! * [`set_congestion`]: TCP_CONGESTION, lightpath's `--tcp-congestion`. A
//!   relayed connection is two TCP connections where kube-proxy's DNAT
//!   leaves one, and lightpath's leg sends with the node's default
//!   algorithm. Under BBR without an `fq` qdisc (veth, loopback) every
//!   segment is paced by a kernel timer, which on a pod-to-pod path costs a
//!   bulk transfer a quarter of its rate (BENCHMARKS.md, "Bulk and the
//!   congestion control"). Set on the listener, it is inherited by every
//!   accepted socket (the kernel keeps a listener's explicit choice for its
//!   children); set on an upstream socket before its connect.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
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
        SocketAddr::V6(_) => sock.original_dst_v6().or_else(|_| sock.original_dst_v4()),
    };
    let addr = conntrack.ok().and_then(|a| a.as_socket()).unwrap_or(local);
    Ok(canonical(addr))
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Starts a non-blocking TCP connect to `dest` from a socket carrying
/// SO_MARK `mark` (skipped when `mark` is 0, e.g. in tests without
/// CAP_NET_ADMIN) and TCP_NODELAY. The connect is usually still in progress
/// when this returns: register the stream with the reactor and wait for it
/// to become writable (or to report an error) under the caller's timeout.
///
/// With `source`, the connection comes from that address (any port), which
/// need not be local: the client's own, as kube-proxy leaves it when it does
/// not masquerade. Needs CAP_NET_ADMIN, and the reply rule in the node's
/// nftables table for the endpoint's answers to reach the socket.
///
/// Why not `tokio::net::TcpSocket::connect`: it always asks `SO_ERROR`
/// after the socket turns writable, one `getsockopt` per connection that
/// only tells something when the readiness already said error or hang-up.
///
/// With `congestion`, the socket uses that TCP congestion control algorithm
/// ([`set_congestion`]).
pub fn upstream_connect(
    dest: SocketAddr,
    mark: u32,
    source: Option<IpAddr>,
    congestion: Option<&str>,
) -> io::Result<std::net::TcpStream> {
    let sock = Socket::new(
        Domain::for_address(dest),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if mark != 0 {
        set_mark(&sock, mark)?;
    }
    sock.set_tcp_nodelay(true)?;
    if let Some(name) = congestion {
        set_congestion(&sock, name)?;
    }
    if let Some(ip) = source {
        // TCP: the port is picked at connect, per 4-tuple.
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .map_err(io::Error::from)?;
        transparent_bind(&sock, ip, dest)?;
    }
    match sock.connect(&dest.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}

/// Binds `sock` (not yet connected) to `source`, any port, with
/// IP_TRANSPARENT / IPV6_TRANSPARENT so `source` need not be local: the
/// client's address, for a connection to `dest` that keeps it. Needs
/// CAP_NET_ADMIN, and the nftables reply rule for `dest`'s answers to reach
/// the socket.
pub fn transparent_bind(sock: &Socket, source: IpAddr, dest: SocketAddr) -> io::Result<()> {
    if source.is_ipv4() != dest.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("source {source} and destination {dest} are of different families"),
        ));
    }
    match dest {
        SocketAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => sock.set_ip_transparent_v6(true)?,
    }
    sock.bind(&SocketAddr::new(source, 0).into())
}

/// Sets SO_MARK on any socket. Needs CAP_NET_ADMIN.
pub fn set_mark<S: AsFd>(sock: &S, mark: u32) -> io::Result<()> {
    SockRef::from(sock).set_mark(mark)
}

/// Sets a TCP socket's congestion control algorithm (TCP_CONGESTION) by its
/// kernel name: `cubic`, `bbr`, `reno`, ... The kernel refuses a name it has
/// no module for (ENOENT), and, without CAP_NET_ADMIN, one missing from
/// `net.ipv4.tcp_allowed_congestion_control` (EPERM).
pub fn set_congestion<S: AsFd>(sock: &S, algorithm: &str) -> io::Result<()> {
    SockRef::from(sock).set_tcp_congestion(algorithm.as_bytes())
}

/// A TCP socket's congestion control algorithm, by its kernel name.
pub fn congestion<S: AsFd>(sock: &S) -> io::Result<String> {
    let name = SockRef::from(sock).tcp_congestion()?;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Creates a non-blocking transparent UDP socket on `addr` that reports each
/// datagram's original destination (IP_RECVORIGDSTADDR /
/// IPV6_RECVORIGDSTADDR): the UDP counterpart of [`transparent_listener`].
/// Read it with [`recv_orig_dst`]. Needs CAP_NET_ADMIN. IPv6 is v6-only.
pub fn transparent_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = udp_socket(addr, true)?;
    set_recv_orig_dst(&sock, addr)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// A non-blocking UDP socket bound to `from`, which need not be a local
/// address (IP_TRANSPARENT): replies to a TPROXY'd client are sent from it,
/// so they carry the service address the client sent to. SO_REUSEADDR lets
/// a restarted process bind the same address at once. Needs CAP_NET_ADMIN.
pub fn reply_socket(from: SocketAddr) -> io::Result<UdpSocket> {
    let sock = udp_socket(from, true)?;
    sock.bind(&from.into())?;
    Ok(sock.into())
}

fn udp_socket(addr: SocketAddr, transparent: bool) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    match addr {
        SocketAddr::V4(_) => {
            if transparent {
                sock.set_ip_transparent_v4(true)?;
            }
        }
        SocketAddr::V6(_) => {
            sock.set_only_v6(true)?;
            if transparent {
                sock.set_ip_transparent_v6(true)?;
            }
        }
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// Asks the kernel to attach each datagram's original destination to
/// `recvmsg` (IP_RECVORIGDSTADDR for an IPv4 `family`, IPV6_RECVORIGDSTADDR
/// for IPv6). Needs no privilege.
pub fn set_recv_orig_dst<S: AsFd>(sock: &S, family: SocketAddr) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    match family {
        SocketAddr::V4(_) => setsockopt(sock, sockopt::Ipv4OrigDstAddr, &true),
        SocketAddr::V6(_) => setsockopt(sock, sockopt::Ipv6OrigDstAddr, &true),
    }
    .map_err(io::Error::from)
}

/// One datagram read by [`recv_orig_dst`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Bytes written into the buffer.
    pub len: usize,
    /// The datagram was longer than the buffer and was cut.
    pub truncated: bool,
    /// The sender.
    pub from: SocketAddr,
    /// The address the sender sent to (under TPROXY: the service address).
    /// `None` when the socket did not ask for it.
    pub orig_dst: Option<SocketAddr>,
}

/// Reads one datagram with its original destination (see
/// [`set_recv_orig_dst`]). Non-blocking sockets return `WouldBlock` as usual,
/// so this fits `tokio::net::UdpSocket::try_io`. v4-mapped addresses are
/// returned as IPv4.
pub fn recv_orig_dst<S: AsFd>(sock: &S, buf: &mut [u8]) -> io::Result<Datagram> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
    use std::io::IoSliceMut;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::AsRawFd;

    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_fd().as_raw_fd(),
        &mut iov,
        Some(cmsg.as_mut_slice()),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let from = msg
        .address
        .and_then(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(SocketAddr::V4(SocketAddrV4::from(*v4)))
            } else {
                a.as_sockaddr_in6()
                    .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
            }
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "datagram without an inet sender",
            )
        })?;
    let mut orig_dst = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(sin) => {
                orig_dst = Some(SocketAddr::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into(),
                    u16::from_be(sin.sin_port),
                ));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(sin6) => {
                orig_dst = Some(SocketAddr::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(),
                    u16::from_be(sin6.sin6_port),
                ));
            }
            _ => {}
        }
    }
    Ok(Datagram {
        len: msg.bytes,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        from: canonical(from),
        orig_dst: orig_dst.map(canonical),
    })
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
    async fn upstream_connect_without_mark_connects() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let s = upstream_connect(addr, 0, None, None).unwrap();
        assert!(SockRef::from(&s).tcp_nodelay().unwrap());
        assert!(!SockRef::from(&s).ip_transparent_v4().unwrap());
        let s = tokio::net::TcpStream::from_std(s).unwrap();
        let (w, a) = tokio::join!(s.writable(), l.accept());
        w.unwrap();
        assert_eq!(a.unwrap().1, s.local_addr().unwrap());
        assert_eq!(s.take_error().unwrap().map(|e| e.kind()), None);
    }

    #[tokio::test]
    async fn upstream_connect_from_a_given_source() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let from: IpAddr = "127.0.0.5".parse().unwrap();
        match upstream_connect(addr, 0, Some(from), None) {
            Ok(s) => {
                assert!(SockRef::from(&s).ip_transparent_v4().unwrap());
                let s = tokio::net::TcpStream::from_std(s).unwrap();
                let (w, a) = tokio::join!(s.writable(), l.accept());
                w.unwrap();
                // The listener sees the given source, with a port the
                // kernel chose at connect time.
                let peer = a.unwrap().1;
                assert_eq!(peer.ip(), from);
                assert_ne!(peer.port(), 0);
                assert_eq!(peer, s.local_addr().unwrap());
            }
            // IP_TRANSPARENT needs CAP_NET_ADMIN.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
        let e = upstream_connect(addr, 0, Some("::1".parse().unwrap()), None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }

    /// The algorithm set on a listener is every accepted socket's, and the
    /// one given to `upstream_connect` is the upstream socket's; an unknown
    /// name is refused. `reno` is built into every kernel, and differs from
    /// the usual defaults (`cubic`, `bbr`), so the checks can fail.
    #[tokio::test]
    async fn congestion_control_reaches_accepted_and_upstream_sockets() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let default = congestion(&l).unwrap();
        assert_ne!(
            default, "reno",
            "the node's default must differ for this test"
        );
        set_congestion(&l, "reno").unwrap();
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let addr = l.local_addr().unwrap();
        let s = upstream_connect(addr, 0, None, Some("reno")).unwrap();
        assert_eq!(congestion(&s).unwrap(), "reno");
        let s = tokio::net::TcpStream::from_std(s).unwrap();
        let (w, a) = tokio::join!(s.writable(), l.accept());
        w.unwrap();
        let (accepted, _) = a.unwrap();
        assert_eq!(congestion(&accepted).unwrap(), "reno");
        // Without the option, the node's default.
        let plain = upstream_connect(addr, 0, None, None).unwrap();
        assert_eq!(congestion(&plain).unwrap(), default);
        let e = upstream_connect(addr, 0, None, Some("no-such-algorithm")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }

    fn orig_dst_roundtrip(bind: &str) {
        let r = UdpSocket::bind(bind).unwrap();
        let addr = r.local_addr().unwrap();
        set_recv_orig_dst(&r, addr).unwrap();
        let c = UdpSocket::bind(SocketAddr::new(addr.ip(), 0)).unwrap();
        c.send_to(b"hello", addr).unwrap();
        r.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 3];
        let d = recv_orig_dst(&r, &mut buf).unwrap();
        assert_eq!(d.from, c.local_addr().unwrap());
        assert_eq!(d.orig_dst, Some(addr));
        assert_eq!(d.len, 3);
        assert!(d.truncated);
        assert_eq!(&buf, b"hel");
    }

    #[test]
    fn udp_orig_dst_v4() {
        orig_dst_roundtrip("127.0.0.1:0");
    }

    #[test]
    fn udp_orig_dst_v6() {
        orig_dst_roundtrip("[::1]:0");
    }

    #[test]
    fn udp_without_option_has_no_orig_dst() {
        let r = UdpSocket::bind("127.0.0.1:0").unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.send_to(b"x", r.local_addr().unwrap()).unwrap();
        r.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let d = recv_orig_dst(&r, &mut buf).unwrap();
        assert_eq!((d.len, d.truncated, d.orig_dst), (1, false, None));
    }

    #[test]
    fn nonblocking_udp_would_block() {
        let r = UdpSocket::bind("127.0.0.1:0").unwrap();
        r.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        let e = recv_orig_dst(&r, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn transparent_udp_and_non_local_reply_socket() {
        // As root: a transparent UDP socket reports original destinations,
        // and a reply socket binds an address this host does not own
        // (TEST-NET-1; nothing is sent to it). Without CAP_NET_ADMIN: EPERM.
        match transparent_udp("127.0.0.1:0".parse().unwrap()) {
            Ok(r) => {
                assert!(SockRef::from(&r).ip_transparent_v4().unwrap());
                let addr = r.local_addr().unwrap();
                let c = UdpSocket::bind("127.0.0.1:0").unwrap();
                c.send_to(b"q", addr).unwrap();
                let mut buf = [0u8; 8];
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                let d = loop {
                    match recv_orig_dst(&r, &mut buf) {
                        Ok(d) => break d,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            assert!(std::time::Instant::now() < deadline, "no datagram");
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        Err(e) => panic!("{e}"),
                    }
                };
                assert_eq!(d.orig_dst, Some(addr));
                let from: SocketAddr = "192.0.2.53:53".parse().unwrap();
                let s = reply_socket(from).unwrap();
                assert_eq!(s.local_addr().unwrap(), from);
                let from6: SocketAddr = "[2001:db8::53]:53".parse().unwrap();
                let s6 = reply_socket(from6).unwrap();
                assert_eq!(s6.local_addr().unwrap(), from6);
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }
}
