//! The sockmap fast path's kernel side: two socket hash maps and one
//! `sk_skb/stream_verdict` program, so that an established relayed TCP pair
//! is spliced inside the kernel and user space never touches its bytes.
//!
//! Why: an L4 relay in user space pays two `recv`, two `send` and the epoll
//! wake-ups per request; most of its CPU is kernel time around those calls.
//! With the verdict program attached, each skb received on one socket of a
//! pair is queued straight to the *egress* of the other (the kernel's psock
//! worker sends it), as in Cloudflare's "SOCKMAP - TCP splicing of the future".
//!
//! Design (each point checked on the 6.18 kernel this runs on):
//! * **Two maps against the activation race.** `targets` has no program:
//!   socket A is stored under B's key and B under A's key. `active` carries
//!   the verdict program: inserting a socket there is what activates it, so
//!   both sockets go into `active` only after both `targets` entries exist
//!   and the first skb of either side always finds its peer.
//! * **Never drop.** The program returns `SK_PASS` whatever
//!   `bpf_sk_redirect_hash` said: when the peer is not found (only possible
//!   while a pair is being torn down) the skb stays on its own socket, where
//!   user space could still read it, instead of being dropped after TCP has
//!   acknowledged it.
//! * **Key** = the receiving socket's own 4-tuple exactly as the program reads
//!   it from `struct __sk_buff` ([`FlowKey`]); user space computes the same
//!   44 bytes from `getsockname`/`getpeername`.
//! * Hand-assembled instructions (about 40), loaded with a GPL license: no
//!   ELF object, no clang, no build step.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};

use crate::sockopt::sys;

const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
const BPF_FUNC_SK_REDIRECT_HASH: i32 = 72;
/// `BPF_NOEXIST`: an insert never replaces a live entry (a stale entry for
/// a reused 4-tuple is deleted first, see [`SockPairMap::insert_pair`]).
const BPF_NOEXIST: u64 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SK_DROP: i32 = 0;
const SK_PASS: i32 = 1;

/// Size of [`FlowKey`].
pub const KEY_SIZE: usize = 44;

/// Errors of the fast path's kernel side, naming the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("sockmap: {step}: {source}")]
    Kernel {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("sockmap: {what} is {addr}, not an inet socket address")]
    NotInet { what: &'static str, addr: String },
}

fn kernel(step: &'static str) -> impl FnOnce(io::Error) -> BpfError {
    move |source| BpfError::Kernel { step, source }
}

/// A socket's key: its own 4-tuple as the verdict program builds it from
/// `struct __sk_buff` (offsets 88..140 of the uapi struct):
///
/// | bytes  | field | as the kernel's ctx conversion loads it |
/// |--------|-------|------------------------------------------|
/// | 0..4   | `family` | `skc_family`, host order (2 or 10) |
/// | 4..20  | remote address | `remote_ip4` (then 12 zero bytes) or `remote_ip6[4]`, network order |
/// | 20..36 | local address | `local_ip4` (then zeros) or `local_ip6[4]`, network order |
/// | 36..40 | `remote_port` | `skc_dport` (network order) loaded as u16 and, on little-endian, shifted left by 16 |
/// | 40..44 | `local_port` | `skc_num`, host order |
///
/// An IPv6 socket carrying IPv4-mapped addresses is keyed as IPv6 (family
/// 10 with the mapped addresses), which is what the kernel sees too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey(pub [u8; KEY_SIZE]);

impl FlowKey {
    /// The key of a socket whose own address is `local` and whose peer is
    /// `remote` (both of the socket's family).
    pub fn of(local: SocketAddr, remote: SocketAddr) -> FlowKey {
        let mut k = [0u8; KEY_SIZE];
        let family = match (local.ip(), remote.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
            _ => AF_INET6,
        };
        k[0..4].copy_from_slice(&family.to_ne_bytes());
        write_ip(&mut k[4..20], remote.ip(), family);
        write_ip(&mut k[20..36], local.ip(), family);
        // skc_dport holds the port in network order; the conversion loads it
        // as a native u16 and (little-endian only) shifts it into the upper
        // half of the u32.
        let dport_raw = u16::from_ne_bytes(remote.port().to_be_bytes()) as u32;
        let remote_port = if cfg!(target_endian = "little") {
            dport_raw << 16
        } else {
            dport_raw
        };
        k[36..40].copy_from_slice(&remote_port.to_ne_bytes());
        k[40..44].copy_from_slice(&(local.port() as u32).to_ne_bytes());
        FlowKey(k)
    }

    /// The key of a connected socket, from `getsockname`/`getpeername`.
    pub fn of_socket(sock: &impl AsFd) -> Result<FlowKey, BpfError> {
        let s = socket2::SockRef::from(sock);
        let local = s.local_addr().map_err(kernel("getsockname"))?;
        let remote = s.peer_addr().map_err(kernel("getpeername"))?;
        let inet = |a: socket2::SockAddr, what| {
            a.as_socket().ok_or_else(|| BpfError::NotInet {
                what,
                addr: format!("{:?}", a.family()),
            })
        };
        Ok(FlowKey::of(
            inet(local, "local address")?,
            inet(remote, "peer address")?,
        ))
    }
}

fn write_ip(out: &mut [u8], ip: IpAddr, family: u32) {
    match (ip, family) {
        (IpAddr::V4(v4), AF_INET) => out[..4].copy_from_slice(&v4.octets()),
        (IpAddr::V4(v4), _) => out.copy_from_slice(&v4.to_ipv6_mapped().octets()),
        (IpAddr::V6(v6), _) => out.copy_from_slice(&v6.octets()),
    }
}

/// The two maps and the attached program; one per process.
#[derive(Debug)]
pub struct SockPairMap {
    /// key(A) → B, key(B) → A. No program.
    targets: OwnedFd,
    /// key(A) → A, key(B) → B. Carries the verdict program.
    active: OwnedFd,
    capacity: u32,
}

/// What [`SockPairMap::insert_pair`] could not do.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// The maps hold `capacity` sockets already (E2BIG): relay this pair in
    /// user space.
    #[error("sockmap is full")]
    Full,
    #[error(transparent)]
    Other(#[from] BpfError),
}

/// The keys of an inserted pair, for [`SockPairMap::remove_pair`].
#[derive(Debug, Clone, Copy)]
pub struct PairKeys {
    pub a: FlowKey,
    pub b: FlowKey,
}

impl SockPairMap {
    /// Creates both maps (`capacity` sockets each, so `capacity / 2`
    /// pairs), loads the verdict program and attaches it to the active map.
    /// Fails without CAP_BPF/CAP_NET_ADMIN, on kernels without
    /// CONFIG_BPF_STREAM_PARSER or sockhash, or under a seccomp filter that
    /// blocks `bpf(2)`.
    pub fn load(capacity: u32) -> Result<SockPairMap, BpfError> {
        let capacity = capacity.max(2);
        let targets = sys::map_create(BPF_MAP_TYPE_SOCKHASH, KEY_SIZE as u32, 4, capacity)
            .map_err(kernel("create the targets sockhash"))?;
        let active = sys::map_create(BPF_MAP_TYPE_SOCKHASH, KEY_SIZE as u32, 4, capacity)
            .map_err(kernel("create the active sockhash"))?;
        let insns = verdict_program(std::os::fd::AsRawFd::as_raw_fd(&targets));
        let prog = sys::prog_load(BPF_PROG_TYPE_SK_SKB, &insns, c"GPL")
            .map_err(kernel("load the sk_skb verdict program"))?;
        sys::prog_attach(&prog, &active, BPF_SK_SKB_STREAM_VERDICT)
            .map_err(kernel("attach the verdict program to the active sockhash"))?;
        // The map holds its own reference to the attached program.
        drop(prog);
        Ok(SockPairMap {
            targets,
            active,
            capacity,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Splices `a` ⇄ `b` in the kernel from now on: both `targets` entries
    /// first, then both `active` entries. Data already queued on either
    /// socket is only seen by the program on the socket's next
    /// `sk_data_ready` (see [`kick`]). On error nothing stays inserted.
    pub fn insert_pair(&self, a: &impl AsFd, b: &impl AsFd) -> Result<PairKeys, InsertError> {
        let keys = PairKeys {
            a: FlowKey::of_socket(a)?,
            b: FlowKey::of_socket(b)?,
        };
        let steps: [(
            &OwnedFd,
            &FlowKey,
            std::os::fd::BorrowedFd<'_>,
            &'static str,
        ); 4] = [
            (
                &self.targets,
                &keys.a,
                b.as_fd(),
                "insert into the targets sockhash",
            ),
            (
                &self.targets,
                &keys.b,
                a.as_fd(),
                "insert into the targets sockhash",
            ),
            (
                &self.active,
                &keys.a,
                a.as_fd(),
                "insert into the active sockhash",
            ),
            (
                &self.active,
                &keys.b,
                b.as_fd(),
                "insert into the active sockhash",
            ),
        ];
        for (i, (map, key, sock, step)) in steps.iter().enumerate() {
            let mut r = sys::map_update_sock(map, &key.0, sock, BPF_NOEXIST);
            if matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EEXIST)) {
                // A closed socket's entry is removed by the kernel at close;
                // an entry for the same 4-tuple can only be a leftover of a
                // pair whose removal failed. Replace it.
                let _ = sys::map_delete(map, &key.0);
                r = sys::map_update_sock(map, &key.0, sock, BPF_NOEXIST);
            }
            if let Err(e) = r {
                for (map, key, _, _) in steps[..i].iter().rev() {
                    let _ = sys::map_delete(map, &key.0);
                }
                return Err(if e.raw_os_error() == Some(libc::E2BIG) {
                    InsertError::Full
                } else {
                    InsertError::Other(BpfError::Kernel { step, source: e })
                });
            }
        }
        Ok(keys)
    }

    /// Takes a pair out of the kernel path: `active` first (the program
    /// stops), then `targets`. Only call this once nothing can arrive on
    /// either socket any more and everything redirected has been sent: a
    /// socket leaving its last map loses whatever its psock still queues.
    /// Entries already gone (a socket that was closed) are not an error.
    pub fn remove_pair(&self, keys: &PairKeys) -> Result<(), BpfError> {
        let mut first = Ok(());
        for (map, key) in [
            (&self.active, &keys.a),
            (&self.active, &keys.b),
            (&self.targets, &keys.a),
            (&self.targets, &keys.b),
        ] {
            match sys::map_delete(map, &key.0) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    if first.is_ok() {
                        first = Err(BpfError::Kernel {
                            step: "delete from a sockhash",
                            source: e,
                        });
                    }
                }
            }
        }
        first
    }
}

/// Re-runs `sock`'s `sk_data_ready` so the verdict program sees data that
/// was queued before the socket was activated: `SO_RCVLOWAT` goes through
/// `tcp_set_rcvlowat`, which calls `tcp_data_ready` (6.18: net/ipv4/tcp.c).
/// 1 is the default low-water mark, so nothing else changes.
pub fn kick(sock: &impl AsFd) -> Result<(), BpfError> {
    sys::set_rcvlowat(sock, 1).map_err(kernel("kick with SO_RCVLOWAT"))
}

/// BPF instruction encoding (`struct bpf_insn`, little- or big-endian host).
mod asm {
    pub const R0: u8 = 0;
    pub const R1: u8 = 1;
    pub const R2: u8 = 2;
    pub const R3: u8 = 3;
    pub const R4: u8 = 4;
    pub const R6: u8 = 6;
    pub const R10: u8 = 10;

    pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        let regs = if cfg!(target_endian = "little") {
            dst | (src << 4)
        } else {
            (dst << 4) | src
        };
        let mut b = [0u8; 8];
        b[0] = code;
        b[1] = regs;
        b[2..4].copy_from_slice(&off.to_ne_bytes());
        b[4..8].copy_from_slice(&imm.to_ne_bytes());
        u64::from_ne_bytes(b)
    }
    /// dst = src (64-bit).
    pub fn mov64_reg(dst: u8, src: u8) -> u64 {
        insn(0xbf, dst, src, 0, 0)
    }
    /// dst = imm (64-bit).
    pub fn mov64_imm(dst: u8, imm: i32) -> u64 {
        insn(0xb7, dst, 0, 0, imm)
    }
    /// dst += imm (64-bit).
    pub fn add64_imm(dst: u8, imm: i32) -> u64 {
        insn(0x07, dst, 0, 0, imm)
    }
    /// dst = *(u32 *)(src + off).
    pub fn ldx_w(dst: u8, src: u8, off: i16) -> u64 {
        insn(0x61, dst, src, off, 0)
    }
    /// *(u32 *)(dst + off) = src.
    pub fn stx_w(dst: u8, off: i16, src: u8) -> u64 {
        insn(0x63, dst, src, off, 0)
    }
    /// *(u32 *)(dst + off) = imm.
    pub fn st_w(dst: u8, off: i16, imm: i32) -> u64 {
        insn(0x62, dst, 0, off, imm)
    }
    /// if dst == imm goto +off.
    pub fn jeq_imm(dst: u8, imm: i32, off: i16) -> u64 {
        insn(0x15, dst, 0, off, imm)
    }
    /// if dst != imm goto +off.
    pub fn jne_imm(dst: u8, imm: i32, off: i16) -> u64 {
        insn(0x55, dst, 0, off, imm)
    }
    /// goto +off.
    pub fn ja(off: i16) -> u64 {
        insn(0x05, 0, 0, off, 0)
    }
    /// dst = map (by descriptor): two instructions.
    pub fn ld_map_fd(dst: u8, fd: i32) -> [u64; 2] {
        // BPF_LD | BPF_DW | BPF_IMM with src = BPF_PSEUDO_MAP_FD (1).
        [insn(0x18, dst, 1, 0, fd), insn(0, 0, 0, 0, 0)]
    }
    pub fn call(helper: i32) -> u64 {
        insn(0x85, 0, 0, 0, helper)
    }
    pub fn exit() -> u64 {
        insn(0x95, 0, 0, 0, 0)
    }
}

/// Offsets in the uapi `struct __sk_buff` (checked against this kernel's
/// linux/bpf.h).
const SKB_LEN: i16 = 0;
const SKB_FAMILY: i16 = 88;
const SKB_REMOTE_IP4: i16 = 92;
const SKB_LOCAL_IP4: i16 = 96;
const SKB_REMOTE_IP6: i16 = 100;
const SKB_LOCAL_IP6: i16 = 116;
const SKB_REMOTE_PORT: i16 = 132;
const SKB_LOCAL_PORT: i16 = 136;
/// The key lives at fp-44 .. fp-1.
const KEY: i16 = -(KEY_SIZE as i16);

/// ```text
/// if ctx->len == 0 return SK_DROP               // a bare FIN: no data (below)
/// r6 = ctx
/// key.family = ctx->family
/// if family == AF_INET6 goto v6
///   key.remote = ctx->remote_ip4, 0, 0, 0; key.local = ctx->local_ip4, 0, 0, 0
///   goto ports
/// v6: key.remote = ctx->remote_ip6[0..4]; key.local = ctx->local_ip6[0..4]
/// ports: key.remote_port = ctx->remote_port; key.local_port = ctx->local_port
/// bpf_sk_redirect_hash(ctx, targets, &key, 0)   // egress of the peer
/// return SK_PASS                                 // never drop data
/// ```
///
/// Why bare FINs are dropped: `tcp_read_skb` hands the FIN's zero-length
/// skb to the program too. Redirected, the peer's psock worker sends 0
/// bytes, which it treats as a broken pipe: it sets EPIPE on the peer and
/// stops its transmit path (measured here: the relay ended
/// `Error(Upstream, BrokenPipe)` with data still to send). The FIN itself
/// has already been processed by TCP (user space sees it as EPOLLRDHUP), so
/// dropping the empty skb loses nothing.
pub fn verdict_program(targets_fd: i32) -> Vec<u64> {
    use asm::*;
    let mut v4 = vec![ldx_w(R2, R6, SKB_REMOTE_IP4), stx_w(R10, KEY + 4, R2)];
    for i in 1..4 {
        v4.push(st_w(R10, KEY + 4 + 4 * i, 0));
    }
    v4.push(ldx_w(R2, R6, SKB_LOCAL_IP4));
    v4.push(stx_w(R10, KEY + 20, R2));
    for i in 1..4 {
        v4.push(st_w(R10, KEY + 20 + 4 * i, 0));
    }
    let mut v6 = Vec::new();
    for i in 0..4 {
        v6.push(ldx_w(R2, R6, SKB_REMOTE_IP6 + 4 * i));
        v6.push(stx_w(R10, KEY + 4 + 4 * i, R2));
    }
    for i in 0..4 {
        v6.push(ldx_w(R2, R6, SKB_LOCAL_IP6 + 4 * i));
        v6.push(stx_w(R10, KEY + 20 + 4 * i, R2));
    }
    let mut p = vec![
        ldx_w(R2, R1, SKB_LEN),
        jne_imm(R2, 0, 2),
        mov64_imm(R0, SK_DROP),
        exit(),
        mov64_reg(R6, R1),
        ldx_w(R2, R6, SKB_FAMILY),
        stx_w(R10, KEY, R2),
        // Skip the v4 block and its closing jump.
        jeq_imm(R2, AF_INET6 as i32, v4.len() as i16 + 1),
    ];
    p.extend(v4);
    p.push(ja(v6.len() as i16));
    p.extend(v6);
    p.extend([
        ldx_w(R2, R6, SKB_REMOTE_PORT),
        stx_w(R10, KEY + 36, R2),
        ldx_w(R2, R6, SKB_LOCAL_PORT),
        stx_w(R10, KEY + 40, R2),
        mov64_reg(R1, R6),
    ]);
    p.extend(ld_map_fd(R2, targets_fd));
    p.extend([
        mov64_reg(R3, R10),
        add64_imm(R3, KEY as i32),
        mov64_imm(R4, 0),
        call(BPF_FUNC_SK_REDIRECT_HASH),
        mov64_imm(R0, SK_PASS),
        exit(),
    ]);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_key_layout() {
        let k = FlowKey::of(
            "10.0.0.1:8080".parse().unwrap(),
            "192.168.1.2:443".parse().unwrap(),
        );
        let b = &k.0;
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 2);
        assert_eq!(&b[4..8], &[192, 168, 1, 2]);
        assert_eq!(&b[8..20], &[0; 12]);
        assert_eq!(&b[20..24], &[10, 0, 0, 1]);
        assert_eq!(&b[24..36], &[0; 12]);
        // 443 = 0x01bb: network order 01 bb, loaded LE as 0xbb01, << 16.
        if cfg!(target_endian = "little") {
            assert_eq!(&b[36..40], &[0, 0, 0x01, 0xbb]);
            assert_eq!(&b[40..44], &[0x90, 0x1f, 0, 0]);
        }
        assert_eq!(u32::from_ne_bytes(b[40..44].try_into().unwrap()), 8080);
    }

    #[test]
    fn v6_key_layout() {
        let k = FlowKey::of(
            "[fd00::1]:80".parse().unwrap(),
            "[fd00::2]:40000".parse().unwrap(),
        );
        let b = &k.0;
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 10);
        let r: std::net::Ipv6Addr = "fd00::2".parse().unwrap();
        let l: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(&b[4..20], &r.octets());
        assert_eq!(&b[20..36], &l.octets());
        if cfg!(target_endian = "little") {
            // 40000 = 0x9c40.
            assert_eq!(&b[36..40], &[0, 0, 0x9c, 0x40]);
        }
        assert_eq!(u32::from_ne_bytes(b[40..44].try_into().unwrap()), 80);
    }

    #[test]
    fn peers_have_mirrored_keys() {
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        assert_ne!(FlowKey::of(a, b), FlowKey::of(b, a));
    }

    const SKIP_ENV: &str = "LIGHTPATH_SKIP_ROOT_TESTS";

    fn require_root(test: &str) -> bool {
        if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
            eprintln!("SKIPPED {test}: {SKIP_ENV}=1");
            return false;
        }
        assert!(
            nix::unistd::geteuid().is_root(),
            "{test} needs root (bpf(2)). Run as root, or set {SKIP_ENV}=1 to skip it."
        );
        true
    }

    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// (outside end, inside end) of a loopback connection on `ip`.
    fn pair(ip: &str) -> (TcpStream, TcpStream) {
        let l = TcpListener::bind((ip, 0)).unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        for t in [&c, &s] {
            t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (c, s)
    }

    /// client ⇄ [a ⇄ b] ⇄ server, spliced by the kernel: bytes queued on
    /// both inner sockets before activation arrive after the kick, then
    /// 1 MiB each way arrives intact. A wrong key layout fails here (the
    /// program finds no peer and the bytes stay on the inner socket).
    fn splice_through_kernel(ip: &str) {
        let maps = SockPairMap::load(64).expect("load the sockmap");
        let (mut client, a) = pair(ip);
        let (b, mut server) = pair(ip);
        client.write_all(b"request before activation").unwrap();
        server.write_all(b"greeting before activation").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let keys = maps.insert_pair(&a, &b).expect("insert the pair");
        kick(&a).unwrap();
        kick(&b).unwrap();
        let mut got = [0u8; 25];
        server.read_exact(&mut got).expect("queued request spliced");
        assert_eq!(&got, b"request before activation");
        let mut got = [0u8; 26];
        client
            .read_exact(&mut got)
            .expect("queued greeting spliced");
        assert_eq!(&got, b"greeting before activation");
        const N: usize = 1 << 20;
        let data: Vec<u8> = (0..N).map(|i| (i * 7 + i / 251) as u8).collect();
        let up = {
            let mut c = client.try_clone().unwrap();
            let d = data.clone();
            std::thread::spawn(move || c.write_all(&d).unwrap())
        };
        let down = {
            let mut s = server.try_clone().unwrap();
            let d = data.clone();
            std::thread::spawn(move || s.write_all(&d).unwrap())
        };
        let mut at_server = vec![0u8; N];
        server.read_exact(&mut at_server).unwrap();
        let mut at_client = vec![0u8; N];
        client.read_exact(&mut at_client).unwrap();
        up.join().unwrap();
        down.join().unwrap();
        assert!(at_server == data, "client -> server differs");
        assert!(at_client == data, "server -> client differs");
        maps.remove_pair(&keys).unwrap();
        // Removed twice: entries already gone are not an error.
        maps.remove_pair(&keys).unwrap();
    }

    #[test]
    fn kernel_splices_a_v4_pair() {
        if require_root("kernel_splices_a_v4_pair") {
            splice_through_kernel("127.0.0.1");
        }
    }

    #[test]
    fn kernel_splices_a_v6_pair() {
        if require_root("kernel_splices_a_v6_pair") {
            splice_through_kernel("::1");
        }
    }

    #[test]
    fn full_map_says_full_and_keeps_nothing() {
        if !require_root("full_map_says_full_and_keeps_nothing") {
            return;
        }
        let maps = SockPairMap::load(2).expect("load");
        let (_c1, a1) = pair("127.0.0.1");
        let (b1, _s1) = pair("127.0.0.1");
        let (_c2, a2) = pair("127.0.0.1");
        let (b2, _s2) = pair("127.0.0.1");
        let k1 = maps.insert_pair(&a1, &b1).expect("first pair fits");
        assert!(matches!(maps.insert_pair(&a2, &b2), Err(InsertError::Full)));
        maps.remove_pair(&k1).unwrap();
        maps.insert_pair(&a2, &b2)
            .expect("room again after removal");
    }
}
