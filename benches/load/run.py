#!/usr/bin/env python3
"""Side-by-side load benchmark: lightpath against kernel DNAT and haproxy.

Why this exists: lightpath's claims ("close to kernel DNAT, ahead of haproxy,
no client-visible errors when a backend dies") only mean something when every
contender runs on the same topology, in the same run, with the same clients
and the same backends. This script builds that topology out of network
namespaces, runs each mode in turn (interleaved, repeated), and appends one
markdown section with the numbers and the target verdicts to BENCHMARKS.md.

Topology (all created here, removed on exit, also on Ctrl-C):

    client ns --veth-- node ns (proxy under test) --veth-- backend ns x 3
    10.201.0.2         10.201.0.1 / 10.202.i.1             10.202.i.2

The client dials the Service address 10.96.0.10 (port 80 HTTP/1.1, port 81
h2c), routed to the node namespace, where the mode under test steers it:
kernel DNAT (nftables map like kube-proxy's nftables mode, or 10,000
services of kube-proxy-style iptables rules), or TPROXY to a userspace proxy
(haproxy or lightpath) on 127.0.0.1:15001. Every backend runs the same nginx
(HTTP/1.1 on :80, prior-knowledge h2c on :81, a 1 GiB body at /bulk). No
traffic ever leaves the namespaces this script creates.

Run as root:  benches/load/run.py                    (full run, appends to BENCHMARKS.md)
              benches/load/run.py --smoke            (1 s per case and mode, hang included; checks each mode carries traffic)
Only the Python 3 standard library is used; tools: ip, nft, iptables-restore,
nginx, haproxy, wrk, h2load, curl.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Addresses live only inside the namespaces created below.
VIP = "10.96.0.10"
CLIENT_IP = "10.201.0.2"
NODE_CLIENT_SIDE = "10.201.0.1"
HTTP_PORT = 80
H2_PORT = 81
UDP_PORT = 53  # UDP request/response: each backend's `lightpath backend` UDP echo
PROXY_LISTEN = "127.0.0.1:15001"  # lightpath's TPROXY listener (proxy/src/defaults.rs); haproxy uses the same
FILLER_CLUSTER_NET = (10, 97)  # filler ClusterIPs 10.97.x.y / 10.98.x.y ...: never dialled
FILLER_POD_NET = 10  # filler endpoints 10.1xx.x.y: never dialled
BACKENDS = 3
TPROXY_MARK = "0x1"
TPROXY_TABLE = "100"

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

ALL_MODES = [
    "direct",
    "nft-dnat",
    "iptables-dnat",
    "haproxy-tcp",
    "haproxy-http",
    "lightpath-l4",
    "lightpath-l7",
]
ALL_CASES = ["keepalive", "newconn", "h2", "bulk", "failure", "failure-newconn", "udp", "hang", "churn"]
# `hang` and `churn` are not run unless asked for (--cases): no issue-8 target depends on them.
OPT_IN_CASES = {"hang", "churn"}
DEFAULT_CASES = [c for c in ALL_CASES if c not in OPT_IN_CASES]
# Modes that carry the UDP case (haproxy has no UDP; the iptables mode only mirrors kube-proxy's TCP rules).
UDP_MODES = {"direct", "nft-dnat", "lightpath-l4", "lightpath-l7"}
# Modes that carry the churn case: it rewrites lightpath's manifest file (the DNAT rule sets and
# haproxy's config have no live-update path here).
CHURN_MODES = {"lightpath-l4", "lightpath-l7"}
# The churn case cycles backend 3 through these EndpointSlice states, one step per period.
CHURN_PERIOD_S = 1.0
CHURN_MAX_SERVICES = 1000  # the file source re-parses every manifest on each change
CHURN_POLL_MS = 250
CHURN_MIN_S = 3.0  # the churn case's shortest run (the smoke pass's 1 s would make no change)
FAILURE_CASES = {"failure", "failure-newconn", "hang"}
CASE_TITLES = {
    "keepalive": "HTTP/1.1 keep-alive, small GET (wrk, 32 connections)",
    "newconn": "New connection per request (wrk, 32 connections, `Connection: close`)",
    "h2": "HTTP/2 multiplexed (h2load, 4 connections x 8 streams = 32 streams)",
    "bulk": "Bulk transfer (curl, sequential GETs of the bulk body for the case duration; time = median per GET)",
    "failure": "Failure run: backend 3 of 3 killed (SIGKILL) half-way (wrk keep-alive GETs)",
    "failure-newconn": "Failure run, new connection per request: backend 3 of 3 killed (SIGKILL) half-way",
    "hang": "Frozen backend: backend 3 of 3 stopped (SIGSTOP) for the middle half of the case, then resumed "
            "(wrk keep-alive GETs): it holds the requests sent to it, answers them late, and a request answered "
            "after more than 2 s counts as a wrk timeout",
    "churn": "Endpoint churn: backend 3 of 3 cycles ready → terminating (still serving) → removed from its "
             "EndpointSlice, one step per second, written to lightpath's manifest file or, with --source kube, PUT to "
             "the API server (wrk keep-alive GETs; lightpath modes only)",
    "scale": "New connection per request at 10 services vs the full service count",
    "udp": "UDP request/response, 64-byte datagrams (Python client, 16 sockets with one request in flight each; "
           "the client's own cost caps the rate, so compare p50/p99 and proxy CPU%)",
}
# Modes that are userspace HTTP proxies compare against haproxy-http; the rest against haproxy-tcp.
L7_MODES = {"haproxy-http", "lightpath-l7"}


def log(msg: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def sh(cmd: list[str], *, input: str | None = None, timeout: float = 120, check: bool = True) -> str:
    try:
        p = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"`{' '.join(cmd[:6])}` timed out after {timeout}s") from e
    if check and p.returncode != 0:
        raise BenchError(f"`{' '.join(cmd[:8])}` failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    return p.stdout


def in_ns(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns] + cmd


def in_net_ns(ns: str, cmd: list[str]) -> list[str]:
    """Runs `cmd` in network namespace `ns` only, with the host's mount namespace.

    Why the backends start this way and not with `ip netns exec`: that gives each process tree a
    mount namespace of its own (to remount /sys), and the last process of it to exit tears it down
    in `do_exit`, waiting in `synchronize_rcu_expedited` *before* its sockets are closed. On this
    saturated 2-core machine that wait took 0.4-2.4 s (bpftrace on `sched_switch` of exiting nginx
    tasks: `namespace_unlock` <- `free_nsproxy` <- `do_exit`), so a killed backend went on holding
    the requests it had accepted, answering nothing and resetting nothing, past wrk's 2 s timeout.
    The failure case means "the pod died": its sockets reset at once (BENCHMARKS.md, session 9).
    """
    return ["nsenter", f"--net=/run/netns/{ns}"] + cmd


# --------------------------------------------------------------------------------------------
# /proc sampling: proxy CPU and memory
# --------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is state (field 3); utime/stime are fields 14/15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float | None:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * PAGE_KB / 1024


class RssSampler:
    """Samples a process's RSS every 200 ms while a load case runs (the peak is 'RSS under load'),
    or while a mode starts (the peak is 'RSS peak during setup')."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.peak: float | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.pid is not None:
                r = rss_mb(self.pid)
                if r is not None and (self.peak is None or r > self.peak):
                    self.peak = r
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(timeout=2)


class Churn:
    """Cycles one endpoint of the bench Service through ready → terminating (still serving) →
    removed, one step per CHURN_PERIOD_S. With the file source it rewrites lightpath's manifest
    file (atomically: a temporary file renamed over it, as a ConfigMap update does); with the kube
    source it PUTs the changed EndpointSlice to the API server (`put`). On exit the original is put
    back, so the next case and round start from three ready endpoints."""

    STATES = ("terminating", "removed", "ready")

    def __init__(self, path: Path, address: str, put=None):
        self.path = path
        self.address = address
        self.put = put
        self.original = path.read_text()
        self.docs = [json.loads(d) for d in self.original.split("---\n") if d.strip()]
        self.steps = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _write(self, text: str) -> None:
        tmp = self.path.with_suffix(".churn")
        tmp.write_text(text)
        tmp.rename(self.path)

    def _render(self, state: str) -> list[dict]:
        out = []
        for o in self.docs:
            if o["kind"] == "EndpointSlice" and o["metadata"]["namespace"] == "bench":
                o = json.loads(json.dumps(o))
                eps = []
                for e in o["endpoints"]:
                    if e["addresses"] != [self.address]:
                        eps.append(e)
                    elif state == "terminating":
                        eps.append({**e, "conditions": {"ready": False, "serving": True, "terminating": True}})
                    elif state == "ready":
                        eps.append(e)
                o["endpoints"] = eps
            out.append(o)
        return out

    def _apply(self, docs: list[dict]) -> None:
        if self.put is None:
            self._write("".join(f"---\n{json.dumps(o)}\n" for o in docs))
            return
        for o in docs:
            if o["kind"] == "EndpointSlice" and o["metadata"]["namespace"] == "bench":
                self.put(o)

    def _run(self) -> None:
        while not self._stop.wait(CHURN_PERIOD_S):
            self._apply(self._render(self.STATES[self.steps % len(self.STATES)]))
            self.steps += 1

    def __enter__(self) -> Churn:
        if not any(o["kind"] == "EndpointSlice" and any(e["addresses"] == [self.address] for e in o["endpoints"])
                   for o in self.docs):
            raise BenchError(f"churn: {self.address} is in no EndpointSlice of {self.path}")
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(timeout=5)
        if self.put is None:
            self._write(self.original)
        else:
            self._apply(self._render("ready"))


# --------------------------------------------------------------------------------------------
# The topology
# --------------------------------------------------------------------------------------------


class Topology:
    """Client, node and backend namespaces joined by veth pairs; torn down in `close`."""

    def __init__(self, tag: str, workdir: Path, bulk_file: Path, udp_echo: Path | None = None,
                 backend_mount_ns: bool = False, congestion: str | None = None):
        self.tag = tag
        # The TCP congestion control of every namespace (None: each inherits the machine's default).
        self.congestion = congestion
        # True: backends start with `ip netns exec` (a mount namespace each), see `in_net_ns`.
        self.backend_mount_ns = backend_mount_ns
        self.udp_echo = udp_echo  # a lightpath binary: each backend also runs its UDP echo
        self.client = f"{tag}-c"
        self.node = f"{tag}-n"
        self.backends = [f"{tag}-b{i}" for i in range(BACKENDS)]
        self.workdir = workdir
        self.bulk_file = bulk_file
        self.procs: list[subprocess.Popen] = []
        self.nginx: dict[int, subprocess.Popen] = {}
        self.created: list[str] = []

    @staticmethod
    def backend_ip(i: int) -> str:
        return f"10.202.{i}.2"

    @staticmethod
    def node_backend_ip(i: int) -> str:
        return f"10.202.{i}.1"

    def up(self) -> None:
        for ns in [self.client, self.node] + self.backends:
            sh(["ip", "netns", "add", ns])
            self.created.append(ns)
            sh(in_ns(ns, ["ip", "link", "set", "lo", "up"]))
        # client <-> node
        sh(["ip", "link", "add", "eth0", "netns", self.client, "type", "veth",
            "peer", "name", "cl0", "netns", self.node])
        sh(in_ns(self.client, ["ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0"]))
        sh(in_ns(self.client, ["ip", "link", "set", "eth0", "up"]))
        sh(in_ns(self.client, ["ip", "route", "add", "default", "via", NODE_CLIENT_SIDE]))
        sh(in_ns(self.node, ["ip", "addr", "add", f"{NODE_CLIENT_SIDE}/24", "dev", "cl0"]))
        sh(in_ns(self.node, ["ip", "link", "set", "cl0", "up"]))
        for i, ns in enumerate(self.backends):
            sh(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"be{i}", "netns", self.node])
            sh(in_ns(ns, ["ip", "addr", "add", f"{self.backend_ip(i)}/24", "dev", "eth0"]))
            sh(in_ns(ns, ["ip", "link", "set", "eth0", "up"]))
            sh(in_ns(ns, ["ip", "route", "add", "default", "via", self.node_backend_ip(i)]))
            sh(in_ns(self.node, ["ip", "addr", "add", f"{self.node_backend_ip(i)}/24", "dev", f"be{i}"]))
            sh(in_ns(self.node, ["ip", "link", "set", f"be{i}", "up"]))
        sysctls = {
            self.node: ["net.ipv4.ip_forward=1", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000",
                        "net.core.somaxconn=65535", "net.ipv4.tcp_max_syn_backlog=65535"],
            self.client: ["net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000"],
        }
        for ns in self.backends:
            sysctls[ns] = ["net.core.somaxconn=65535", "net.ipv4.tcp_max_syn_backlog=65535"]
        if self.congestion:
            # Before any socket exists: a listener's algorithm is fixed when it is created.
            for items in sysctls.values():
                items.append(f"net.ipv4.tcp_congestion_control={self.congestion}")
        for ns, items in sysctls.items():
            for item in items:
                sh(in_ns(ns, ["sysctl", "-q", "-w", item]))
        for i in range(BACKENDS):
            self.start_backend(i)
        for i in range(BACKENDS):
            self.wait_http(self.client, f"http://{self.backend_ip(i)}:{HTTP_PORT}/", 10, f"nginx in {self.backends[i]}")

    def start_backend(self, i: int) -> None:
        d = self.workdir / f"nginx-b{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "logs").mkdir(exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=d, name=f"backend-{i}", bulk_dir=self.bulk_file.parent,
                                          bulk_name=self.bulk_file.name, http=HTTP_PORT, h2=H2_PORT))
        wrap = in_ns if self.backend_mount_ns else in_net_ns
        p = subprocess.Popen(wrap(self.backends[i], ["nginx", "-c", str(conf), "-p", str(d)]),
                             stdout=subprocess.DEVNULL, stderr=open(d / "stderr.log", "wb"))
        self.nginx[i] = p
        self.procs.append(p)
        if self.udp_echo is not None and os.access(self.udp_echo, os.X_OK):
            self.spawn(self.backends[i], [str(self.udp_echo), "backend", "--name", f"backend-{i}",
                                          "--echo", "0.0.0.0:9000", "--http", "0.0.0.0:8080",
                                          "--udp-echo", f"0.0.0.0:{UDP_PORT}"], d / "udp-echo.log",
                       net_only=not self.backend_mount_ns)

    def kill_backend(self, i: int, sig: int = signal.SIGKILL) -> None:
        """`sig` to every process in backend namespace i: SIGKILL is the 'pod died' failure, SIGSTOP a
        hung pod (SIGCONT resumes it)."""
        for pid in sh(["ip", "netns", "pids", self.backends[i]], check=False).split():
            try:
                os.kill(int(pid), sig)
            except (ProcessLookupError, ValueError):
                pass

    def wait_http(self, ns: str, url: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "1", url]
            p = subprocess.run(in_ns(ns, curl),
                               capture_output=True, text=True)
            if p.stdout.strip() == "200":
                return
            last = f"curl exit {p.returncode}, status {p.stdout.strip() or '-'}"
            time.sleep(0.2)
        raise BenchError(f"{what} did not answer {url} within {timeout:.0f}s ({last})")

    def spawn(self, ns: str, cmd: list[str], log_path: Path, net_only: bool = False) -> subprocess.Popen:
        wrap = in_net_ns if net_only else in_ns
        p = subprocess.Popen(wrap(ns, cmd), stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for ns in self.created:
            for pid in sh(["ip", "netns", "pids", ns], check=False).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in self.created:
            sh(["ip", "netns", "del", ns], check=False)
        self.created.clear()


NGINX_CONF = """\
daemon off;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log error;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; multi_accept on; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path {dir}/tmp;
  proxy_temp_path {dir}/tmp;
  default_type text/plain;
  server {{
    listen 0.0.0.0:{http} reuseport backlog=65535;
    location = /bulk {{ alias {bulk_dir}/{bulk_name}; }}
    location / {{ return 200 "{name}\\n"; }}
  }}
  server {{
    listen 0.0.0.0:{h2} http2 reuseport backlog=65535;
    http2_max_requests 100000000;
    http2_max_concurrent_streams 1024;
    location / {{ return 200 "{name}\\n"; }}
  }}
}}
"""


# --------------------------------------------------------------------------------------------
# Generated rule sets and manifests (kube-proxy shaped)
# --------------------------------------------------------------------------------------------


@dataclass
class Svc:
    """One service port of the generated cluster."""

    ns: str
    name: str
    ip: str
    port: int
    port_name: str
    endpoints: list[str]


def filler_services(n: int, per_service: int) -> list[Svc]:
    """`n` services that nobody dials, each with `per_service` endpoints, for scale."""
    out = []
    for k in range(n):
        a, b = divmod(k, 250)
        ip = f"10.{97 + a // 250}.{a % 250}.{b + 1}"
        eps = []
        for e in range(per_service):
            idx = k * per_service + e
            x, rest = divmod(idx, 250 * 250)
            y, z = divmod(rest, 250)
            eps.append(f"10.{100 + x}.{y}.{z + 1}")
        out.append(Svc("filler", f"svc-{k}", ip, 80, "tcp", eps))
    return out


def bench_services() -> list[Svc]:
    eps = [Topology.backend_ip(i) for i in range(BACKENDS)]
    return [Svc("bench", "web", VIP, HTTP_PORT, "http", eps), Svc("bench", "web", VIP, H2_PORT, "h2c", eps),
            Svc("bench", "web", VIP, UDP_PORT, "udp", eps)]


def l4proto(svc: Svc) -> str:
    """The bench's UDP port is the one named `udp`; every other port is TCP."""
    return "udp" if svc.port_name == "udp" else "tcp"


def port_proto_hash(svc: Svc, extra: str = "") -> str:
    # kube-proxy: base32(sha256(servicePortName + protocol [+ endpoint]))[:16]
    s = f"{svc.ns}/{svc.name}:{svc.port_name}tcp{extra}"
    return base64.b32encode(hashlib.sha256(s.encode()).digest()).decode()[:16]


def cluster(services: int, per_service: int) -> list[Svc]:
    """The benchmark service plus fillers, `services` service ports in all, the benchmark in the middle."""
    fillers = filler_services(max(services - 1, 0), per_service)
    mid = len(fillers) // 2
    return fillers[:mid] + bench_services() + fillers[mid:]


def iptables_rules(svcs: list[Svc]) -> str:
    """kube-proxy iptables mode: KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* with statistic random."""
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]", ":KUBE-POSTROUTING - [0:0]"]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    for s in svcs:
        spn = f"{s.ns}/{s.name}:{s.port_name}"
        svc_chain = f"KUBE-SVC-{port_proto_hash(s)}"
        chains.append(f":{svc_chain} - [0:0]")
        rules.append(f'-A KUBE-SERVICES -d {s.ip}/32 -p {l4proto(s)} -m comment --comment "{spn} cluster IP" '
                     f"-m {l4proto(s)} --dport {s.port} -j {svc_chain}")
        n = len(s.endpoints)
        for i, ep in enumerate(s.endpoints):
            sep = f"KUBE-SEP-{port_proto_hash(s, ep)}"
            chains.append(f":{sep} - [0:0]")
            prob = "" if i == n - 1 else f"-m statistic --mode random --probability {1.0 / (n - i):.11f} "
            rules.append(f'-A {svc_chain} -m comment --comment "{spn} -> {ep}:{s.port}" {prob}-j {sep}')
            rules.append(f'-A {sep} -s {ep}/32 -m comment --comment "{spn}" -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -p {l4proto(s)} -m comment --comment "{spn}" -m {l4proto(s)} -j DNAT '
                         f'--to-destination {ep}:{s.port}')
    return "*nat\n" + "\n".join(chains) + "\n" + "\n".join(rules) + "\nCOMMIT\n"


def nft_dnat_rules(svcs: list[Svc]) -> list[str]:
    """kube-proxy nftables mode: one verdict map lookup, then numgen random over endpoint chains.

    Returned as several transactions: on this kernel one transaction creating 110,000 chains took
    2 minutes (the cost grows with the square of the chains per transaction), 1,000 services per
    transaction take under a second each. The per-packet path is the same either way.
    """
    txs = ["table ip lpb-kube-proxy {\n"
           "  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n"
           "  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }\n"
           "  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }\n}\n"]
    for k in range(0, len(svcs), 1000):
        lines, elements = [], []
        for s in svcs[k:k + 1000]:
            h, proto = port_proto_hash(s), l4proto(s)
            svc_chain = f"service-{h[:8]}-{s.ns}/{s.name}/{proto}/{s.port_name}"
            eps = []
            for i, ep in enumerate(s.endpoints):
                ep_chain = f"endpoint-{port_proto_hash(s, ep)[:8]}-{s.ns}/{s.name}/{proto}/{s.port_name}__{ep}/{s.port}"
                lines.append(f"  chain {ep_chain} {{ meta l4proto {proto} dnat to {ep}:{s.port}; }}")
                eps.append(f"{i} : goto {ep_chain}")
            lines.append(f"  chain {svc_chain} {{ numgen random mod {len(eps)} vmap {{ {', '.join(eps)} }}; }}")
            elements.append(f"{s.ip} . {proto} . {s.port} : goto {svc_chain}")
        txs.append("table ip lpb-kube-proxy {\n" + "\n".join(lines) + "\n}\n"
                   "add element ip lpb-kube-proxy service-ips { " + ", ".join(elements) + " }\n")
    return txs


def tproxy_rules(port: int) -> str:
    """TPROXY like lightpath's own rules (see /work/shared/notes/tproxy-on-this-kernel.md)."""
    return f"""table inet lpb-tproxy {{
  set frontends {{ type ipv4_addr . inet_service; elements = {{ {VIP} . {HTTP_PORT}, {VIP} . {H2_PORT} }} }}
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    ip daddr . tcp dport @frontends tproxy ip to 127.0.0.1:{port} meta mark set {TPROXY_MARK} accept
    ip daddr . tcp dport @frontends reject with tcp reset
  }}
}}
"""


def manifest(svcs: list[Svc], l7: bool, l7_annotations: list[str] = ()) -> list[dict]:
    """Services + EndpointSlices for `lightpath run --manifests`, written one object per YAML document.

    Not one `kind: List`: the file source parses a document at a time, and a single 14 MB List
    document tripled lightpath's RSS (530 MB instead of 170 MB at 10,000 services) with a parser
    peak that the kube source, which receives objects one by one, never has.
    """
    items: list[dict] = []
    by_svc: dict[tuple[str, str], list[Svc]] = {}
    for s in svcs:
        by_svc.setdefault((s.ns, s.name), []).append(s)
    for (ns, name), ports in by_svc.items():
        meta: dict = {"name": name, "namespace": ns}
        bench = ns == "bench"
        if bench and not l7:
            meta["annotations"] = {"lightpath.io/protocol": "tcp"}
        if bench and l7 and l7_annotations:
            meta["annotations"] = dict(a.split("=", 1) for a in l7_annotations)
        spec_ports = []
        for s in ports:
            p = {"name": s.port_name, "port": s.port, "targetPort": s.port, "protocol": l4proto(s).upper()}
            if bench and l7 and l4proto(s) == "tcp":
                p["appProtocol"] = "http" if s.port_name == "http" else "kubernetes.io/h2c"
            spec_ports.append(p)
        items.append({"apiVersion": "v1", "kind": "Service", "metadata": meta,
                      "spec": {"type": "ClusterIP", "clusterIP": ports[0].ip, "clusterIPs": [ports[0].ip],
                               "ports": spec_ports}})
        items.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": s.port_name, "port": s.port, "protocol": l4proto(s).upper()} for s in ports],
            "endpoints": [{"addresses": [ep], "conditions": {"ready": True}, "nodeName": "node-bench"}
                          for ep in ports[0].endpoints],
        })
    return items


def haproxy_cfg(mode: str, topo: Topology, listen: str) -> str:
    """haproxy as commonly deployed: health checks, redispatch on connect failure, 2 threads (= cores)."""
    servers80 = "\n".join(f"  server b{i} {topo.backend_ip(i)}:{HTTP_PORT} check inter 1s fall 2 rise 1"
                          for i in range(BACKENDS))
    if mode == "tcp":
        # No port: haproxy connects to the client's original destination port (80 or 81).
        servers = "\n".join(f"  server b{i} {topo.backend_ip(i)} check port {HTTP_PORT} inter 1s fall 2 rise 1"
                            for i in range(BACKENDS))
        return f"""global
  nbthread 2
  maxconn 8000
defaults
  mode tcp
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  retries 2
  option redispatch 1
frontend fe
  bind {listen} transparent
  default_backend be
backend be
  balance roundrobin
{servers}
"""
    servers81 = "\n".join(f"  server b{i} {topo.backend_ip(i)}:{H2_PORT} proto h2 "
                          f"check port {HTTP_PORT} inter 1s fall 2 rise 1"
                          for i in range(BACKENDS))
    return f"""global
  nbthread 2
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  retries 2
  option redispatch 1
  option http-keep-alive
  http-reuse safe
frontend fe
  bind {listen} transparent
  use_backend be_h2 if {{ dst_port {H2_PORT} }}
  default_backend be_h1
backend be_h1
  balance roundrobin
{servers80}
backend be_h2
  balance roundrobin
{servers81}
"""


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


@dataclass
class ModeSpec:
    name: str
    services: int  # service ports loaded in the node (kernel rules or lightpath table)

    @property
    def label(self) -> str:
        base = self.name.removesuffix("@scale")
        if base in ("nft-dnat", "iptables-dnat", "lightpath-l4", "lightpath-l7"):
            base += f" ({self.services:,} svc)"
        return base


@dataclass
class Running:
    """A mode set up in a topology: where the client dials and which process is the proxy."""

    http_url: str
    h2_url: str
    proxy: subprocess.Popen | None = None
    setup_s: float = 0.0
    idle_rss: float | None = None
    # Peak from the proxy's start to the idle sample: a full sync decodes and translates the whole
    # cluster, and a memory request must cover that too, not only the steady state.
    setup_peak_rss: float | None = None
    udp_target: str = ""  # host:port the UDP case sends to

    @property
    def pid(self) -> int | None:
        return self.proxy.pid if self.proxy else None


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="lpb-"))
        self.tag_base = f"lpb{os.getpid() % 100000}"
        self.seq = 0
        self.topo: Topology | None = None
        self.api_url: str | None = None  # the fake API server of the current topology (--source kube)
        self.bulk_file = self.workdir / "bulk.bin"
        with open(self.bulk_file, "wb") as f:
            f.truncate(args.bulk_mib * 1024 * 1024)  # sparse: the page cache serves zeros, no disk I/O
        os.chmod(self.workdir, 0o755)
        os.chmod(self.bulk_file, 0o644)
        # Read it once so the page cache holds it before the first mode (else that mode pays for it).
        with open(self.bulk_file, "rb") as f:
            while f.read(1 << 20):
                pass
        self.rule_cache: dict[tuple[str, int], Path] = {}

    # ---- rule files are generated once per (kind, services) and reused across rounds
    def rules_file(self, kind: str, services: int) -> Path:
        key = (kind, services)
        if key not in self.rule_cache:
            svcs = cluster(services, self.args.endpoints_per_service)
            path = self.workdir / f"{kind}-{services}"
            if kind == "iptables":
                path.write_text(iptables_rules(svcs))
            elif kind == "nft":
                path.mkdir()
                for i, tx in enumerate(nft_dnat_rules(svcs)):
                    (path / f"{i:04d}.nft").write_text(tx)
            elif kind in ("manifest-l4", "manifest-l7"):
                path = path.with_suffix(".yaml")
                # JSON is YAML: one compact JSON object per document.
                objs = manifest(svcs, kind == "manifest-l7", self.args.l7_annotation)
                path.write_text("".join(f"---\n{json.dumps(o)}\n" for o in objs))
            self.rule_cache[key] = path
        return self.rule_cache[key]

    def start_mode(self, spec: ModeSpec) -> Running:
        topo = self.topo
        assert topo is not None
        t0 = time.monotonic()
        node = topo.node
        vip_http = f"http://{VIP}:{HTTP_PORT}/"
        vip_h2 = f"http://{VIP}:{H2_PORT}/"
        run: Running
        if spec.name == "direct":
            run = Running(f"http://{topo.backend_ip(0)}:{HTTP_PORT}/", f"http://{topo.backend_ip(0)}:{H2_PORT}/")
        elif spec.name == "nft-dnat":
            for tx in sorted(self.rules_file("nft", spec.services).iterdir()):
                sh(in_ns(node, ["nft", "-f", str(tx)]), timeout=300)
            run = Running(vip_http, vip_h2)
        elif spec.name == "iptables-dnat":
            sh(in_ns(node, ["iptables-restore"]), input=self.rules_file("iptables", spec.services).read_text(),
               timeout=900)
            run = Running(vip_http, vip_h2)
        elif spec.name in ("haproxy-tcp", "haproxy-http"):
            self.policy_routing(node)
            sh(in_ns(node, ["nft", "-f", "-"]), input=tproxy_rules(int(PROXY_LISTEN.rsplit(":", 1)[1])))
            cfg = self.workdir / f"{spec.name}.cfg"
            cfg.write_text(haproxy_cfg(spec.name.split("-")[1], topo, PROXY_LISTEN))
            p = topo.spawn(node, ["haproxy", "-db", "-f", str(cfg)], self.workdir / f"{spec.name}.log")
            run = Running(vip_http, vip_h2, proxy=p)
        elif spec.name in ("lightpath-l4", "lightpath-l7"):
            kind = "manifest-l7" if spec.name == "lightpath-l7" else "manifest-l4"
            man = self.rules_file(kind, spec.services)
            logf = self.workdir / f"{spec.name}-{self.seq}.log"
            env_cmd = ["env", f"RUST_LOG={os.environ.get('RUST_LOG', 'warn')}"]
            # The file source re-reads and hashes the manifests every poll; at 10,000 services that
            # is file I/O unrelated to the data path, so poll once a minute (the kube source has no such
            # cost) unless the churn case needs its changes seen (`manifest_poll_ms`).
            if self.args.source == "kube":
                source = ["--kubeconfig", str(self.start_fakeapi(man))]
            else:
                source = ["--manifests", str(man), "--manifest-poll-ms", str(manifest_poll_ms(self.args))]
            p = topo.spawn(node, env_cmd + [str(self.args.lightpath), "run", *source, "--node-name", "node-bench"]
                           + self.args.lightpath_arg, logf)
            run = Running(vip_http, vip_h2, proxy=p)
        else:
            raise BenchError(f"unknown mode {spec.name}")
        run.udp_target = f"{topo.backend_ip(0) if spec.name == 'direct' else VIP}:{UDP_PORT}"
        deadline = 120 if spec.services > 1000 else 30
        # Started once the proxy has been spawned (the fake API server of --source kube is
        # already loaded by then), so it sees the initial sync.
        sampler = RssSampler(run.pid)
        with sampler:
            try:
                topo.wait_http(topo.client, run.http_url, deadline, spec.label)
            except BenchError as e:
                if run.proxy is not None and run.proxy.poll() is not None:
                    tail = self.proc_log_tail(spec)
                    raise BenchError(f"{spec.label}: proxy exited with {run.proxy.returncode}: {tail}") from e
                raise
            run.setup_s = time.monotonic() - t0
            if run.pid is not None:
                time.sleep(0.5)
                run.idle_rss = rss_mb(run.pid)
        if run.pid is not None:
            run.setup_peak_rss = max((m for m in (sampler.peak, run.idle_rss) if m is not None), default=None)
        return run

    def start_fakeapi(self, objects: Path) -> Path:
        """Starts the fake API server in the node namespace, loaded with `objects`; returns its
        kubeconfig once every object is in. The API server's URL is kept for the churn case."""
        topo = self.topo
        assert topo is not None
        kubeconfig = self.workdir / f"kubeconfig-{self.seq}.yaml"
        logf = self.workdir / f"fakeapi-{self.seq}.log"
        p = topo.spawn(topo.node, [str(self.args.fakeapi), "--objects", str(objects),
                                   "--kubeconfig", str(kubeconfig)], logf)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            m = re.search(r"^READY (\S+)", logf.read_text(errors="replace"), re.M)
            if m:
                self.api_url = m.group(1)
                return kubeconfig
            if p.poll() is not None:
                raise BenchError(f"fakeapi exited with {p.returncode}: {logf.read_text(errors='replace')[-400:]}")
            time.sleep(0.1)
        raise BenchError("fakeapi did not load its objects within 120 s")

    def proc_log_tail(self, spec: ModeSpec) -> str:
        logs = sorted(self.workdir.glob(f"{spec.name}*.log"), key=lambda p: p.stat().st_mtime)
        if not logs:
            return "(no log)"
        return logs[-1].read_text(errors="replace")[-600:].strip().replace("\n", " | ")

    def keep_proxy_log(self, spec: ModeSpec, what: str) -> Path:
        """Copies the proxy's current log out of the workdir (which is removed at the end), so a
        round with client-visible errors can be explained afterwards. Returns where it went."""
        logs = sorted(self.workdir.glob(f"{spec.name}*.log"), key=lambda p: p.stat().st_mtime)
        self.args.log_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.args.log_dir / f"{stamp}-{spec.name}-{what}.log"
        if logs:
            shutil.copyfile(logs[-1], dest)
        else:
            dest.write_text("(the proxy wrote no log)\n")
        return dest

    @staticmethod
    def policy_routing(node: str) -> None:
        sh(in_ns(node, ["ip", "rule", "add", "fwmark", f"{TPROXY_MARK}/{TPROXY_MARK}", "lookup", TPROXY_TABLE]))
        sh(in_ns(node, ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", TPROXY_TABLE]))

    # ---- cases
    def run_case(self, spec: ModeSpec, run: Running, case: str) -> dict:
        topo = self.topo
        assert topo is not None
        d = self.args.duration
        cpu0 = cpu_seconds(run.pid) if run.pid else None
        t0 = time.monotonic()
        with RssSampler(run.pid) as sampler:
            if case in ("keepalive", "newconn", "scale") or case in FAILURE_CASES:
                if case == "hang":
                    # Frozen from d/4 to 3d/4: resumed while wrk still runs, so a request held through
                    # the freeze completes late and wrk counts it (one that never completes is not
                    # counted at all).
                    res = self.wrk(run.http_url, d, close=False, kill_at=d / 4, sig=signal.SIGSTOP,
                                   resume_after=d / 2)
                else:
                    res = self.wrk(run.http_url, d, close=case in ("newconn", "scale", "failure-newconn"),
                                   kill_at=d / 2 if case in FAILURE_CASES else None)
            elif case == "h2":
                res = self.h2load(run.h2_url, d)
            elif case == "bulk":
                res = self.bulk(run.http_url.rstrip("/") + "/bulk", d)
            elif case == "udp":
                res = self.udp(run.udp_target, d)
            elif case == "churn":
                v0 = self.config_version()
                man = self.rules_file("manifest-l7" if spec.name == "lightpath-l7" else "manifest-l4", spec.services)
                put = self.put_object if self.args.source == "kube" else None
                # At least CHURN_MIN_S, so even the smoke pass makes changes and can see them ignored.
                with Churn(man, topo.backend_ip(BACKENDS - 1), put) as churn:
                    res = self.wrk(run.http_url, max(d, CHURN_MIN_S), close=False, kill_at=None)
                # The last write (the original back) is applied within a poll.
                time.sleep(max(1.0, 2 * manifest_poll_ms(self.args) / 1000) if put is None else 1.0)
                applied = self.config_version() - v0
                # Two steps (to terminating, then removed) are at least one new table version.
                if churn.steps >= 2 and applied == 0:
                    raise BenchError(f"churn: {churn.steps} EndpointSlice changes made, lightpath applied none")
                res["churn_steps"] = f"{churn.steps} written, {applied} applied"
            else:
                raise BenchError(f"unknown case {case}")
        wall = time.monotonic() - t0
        cpu1 = cpu_seconds(run.pid) if run.pid else None
        res["cpu_pct"] = (cpu1 - cpu0) / wall * 100 if cpu0 is not None and cpu1 is not None else None
        res["rss_mb"] = sampler.peak
        res["proxy_alive"] = run.proxy is None or run.proxy.poll() is None
        if case == "hang":
            topo.wait_http(topo.client, f"http://{topo.backend_ip(BACKENDS - 1)}:{HTTP_PORT}/", 10, "resumed backend")
            time.sleep(2.5)  # haproxy's health check (inter 1s, rise 1) sees it again
        elif case in FAILURE_CASES:
            # Bring the killed backend back so the next case starts from three healthy backends.
            topo.start_backend(BACKENDS - 1)
            topo.wait_http(topo.client, f"http://{topo.backend_ip(BACKENDS - 1)}:{HTTP_PORT}/", 10, "restarted backend")
            time.sleep(2.5)  # haproxy's health check (inter 1s, rise 1) sees it again
        return res

    def put_object(self, obj: dict) -> None:
        """Replaces `obj` on the fake API server (HTTP PUT from the node namespace), as a controller does."""
        assert self.topo is not None
        m = obj["metadata"]
        assert obj["kind"] == "EndpointSlice", obj["kind"]  # the only kind the churn case changes
        url = f"{self.api_url}/apis/discovery.k8s.io/v1/namespaces/{m['namespace']}/endpointslices/{m['name']}"
        sh(in_ns(self.topo.node, ["curl", "-sS", "--fail-with-body", "--max-time", "5", "-X", "PUT",
                                  "-H", "Content-Type: application/json", "--data-binary", "@-", url]),
           input=json.dumps(obj))

    def config_version(self) -> int:
        """lightpath's `lightpath_config_version`: the version of the table it serves (admin API, node ns)."""
        assert self.topo is not None
        text = sh(in_ns(self.topo.node, ["curl", "-sS", "--max-time", "5", "http://127.0.0.1:15000/metrics"]))
        m = re.search(r"^lightpath_config_version (\d+)", text, re.M)
        if not m:
            raise BenchError("lightpath's /metrics has no lightpath_config_version")
        return int(m.group(1))

    def wrk(self, url: str, duration: float, close: bool, kill_at: float | None,
            sig: int = signal.SIGKILL, resume_after: float | None = None) -> dict:
        topo = self.topo
        assert topo is not None
        script = self.workdir / "report.lua"
        script.write_text(WRK_LUA)
        cmd = ["wrk", "-t2", "-c32", f"-d{max(1, round(duration))}s", "--timeout", "2s", "-s", str(script)]
        if close:
            cmd += ["-H", "Connection: close"]
        p = subprocess.Popen(in_ns(topo.client, cmd + [url]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kill_at is not None:
            time.sleep(kill_at)
            topo.kill_backend(BACKENDS - 1, sig)
            if resume_after is not None:
                try:
                    time.sleep(resume_after)
                finally:
                    topo.kill_backend(BACKENDS - 1, signal.SIGCONT)
        try:
            out, err = p.communicate(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            raise BenchError("wrk did not finish in time")
        m = re.search(r"^LPB (\{.*\})$", out, re.M)
        if not m:
            raise BenchError(f"wrk printed no report (exit {p.returncode}): {(out + err).strip()[-400:]}")
        r = json.loads(m.group(1))
        secs = r["duration_us"] / 1e6
        errors = r["connect"] + r["read"] + r["write"] + r["timeout"] + r["status"]
        return {"rps": r["requests"] / secs if secs else 0.0, "requests": r["requests"],
                "p50_ms": r["p50"] / 1000, "p99_ms": r["p99"] / 1000, "errors": errors,
                "error_detail": f"connect {r['connect']}, read {r['read']}, write {r['write']}, "
                                f"timeout {r['timeout']}, non-2xx {r['status']}"}

    def h2load(self, url: str, duration: float) -> dict:
        topo = self.topo
        assert topo is not None
        logf = self.workdir / "h2load.log"
        if logf.exists():
            logf.unlink()
        cmd = ["h2load", "-t2", "-c4", "-m8", "-D", str(max(1, round(duration))), "--log-file", str(logf), url]
        p = subprocess.run(in_ns(topo.client, cmd), capture_output=True, text=True, timeout=duration + 60)
        out = p.stdout
        fin = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
        req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                        r"(\d+) errored, (\d+) timeout", out)
        if not fin or not req:
            raise BenchError(f"h2load printed no summary (exit {p.returncode}): {(out + p.stderr).strip()[-400:]}")
        lat = []
        if logf.exists():
            with open(logf) as f:
                for line in f:
                    parts = line.split("\t")
                    if len(parts) >= 3:
                        lat.append(int(parts[2]))
        lat.sort()
        pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000) if lat else (lambda q: None)
        failed, errored, timeout = int(req.group(5)), int(req.group(6)), int(req.group(7))
        return {"rps": float(fin.group(2)), "requests": int(req.group(4)), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
                "errors": failed, "error_detail": f"failed {failed} (errored {errored}, timeout {timeout})"}

    def bulk(self, url: str, duration: float) -> dict:
        """Sequential GETs of the bulk body for `duration` seconds (at least one): Gbit/s over all of them."""
        topo = self.topo
        assert topo is not None
        want = self.args.bulk_mib * 1024 * 1024
        cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}",
               "--max-time", "300", url]
        times, total_bytes, errors, detail = [], 0, 0, []
        t0 = time.monotonic()
        while not times or time.monotonic() - t0 < duration:
            p = subprocess.run(in_ns(topo.client, cmd), capture_output=True, text=True, timeout=320)
            parts = p.stdout.split()
            if len(parts) != 3:
                errors += 1
                detail.append(f"curl exit {p.returncode}")
                break
            code, size, secs = parts[0], int(parts[1]), float(parts[2])
            if code != "200" or size != want or p.returncode != 0:
                errors += 1
                detail.append(f"status {code}, {size} of {want} bytes, curl exit {p.returncode}")
                break
            times.append(secs)
            total_bytes += size
            if len(times) >= 50:
                break
        busy = sum(times)
        return {"rps": None, "requests": len(times), "p50_ms": median(times) * 1000 if times else None,
                "p99_ms": None, "errors": errors, "gbps": total_bytes * 8 / busy / 1e9 if busy else 0.0,
                "error_detail": "; ".join(detail)}

    def udp(self, target: str, duration: float) -> dict:
        """UDP request/response from the client namespace (UDP_CLIENT): a closed loop, so the rate is bounded."""
        topo = self.topo
        assert topo is not None
        cmd = [sys.executable, "-c", UDP_CLIENT, target, str(max(1.0, duration)), "16"]
        p = subprocess.run(in_ns(topo.client, cmd), capture_output=True, text=True, timeout=duration + 60)
        m = re.search(r"^LPB (\{.*\})$", p.stdout, re.M)
        if not m:
            raise BenchError(f"UDP client printed no report (exit {p.returncode}): "
                             f"{(p.stdout + p.stderr).strip()[-400:]}")
        return json.loads(m.group(1))

    def profile(self, run: Running, case: str) -> str:
        """perf's flat profile (self time by symbol) of the proxy process during one extra run of `case`."""
        topo = self.topo
        assert topo is not None and run.pid is not None
        data = self.workdir / f"perf-{self.seq}.data"
        d = max(1, round(self.args.duration))
        graph = ["--call-graph", "dwarf,16384"] if self.args.perf_callgraph else []
        perf = subprocess.Popen(["perf", "record", "-F", "999", *graph, "-o", str(data), "-p", str(run.pid), "--",
                                 "sleep", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        r = self.run_case(ModeSpec("profile", 0), run, case)
        try:
            perf.communicate(timeout=d + 30)
        except subprocess.TimeoutExpired:
            perf.kill()
            raise BenchError("perf record did not finish")
        def report(sort: str, limit: str) -> list[str]:
            # `-g none`: with --perf-callgraph the data holds call chains, which would otherwise
            # be printed under each line and read as more lines of the flat profile.
            rep = sh(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",
                      "--sort", sort, "--percent-limit", limit], timeout=120)
            return [" ".join(line.split()).removesuffix(" - -") for line in rep.splitlines()
                    if line.strip() and not line.startswith("#")]

        # In a VM perf samples on a timer, so kernel time piles up where interrupts are re-enabled
        # (_raw_spin_unlock_irqrestore): show the kernel/user split, then user-space symbols only.
        by_dso = report("dso", "0.5")
        user = [line for line in report("dso,symbol", "0.3") if "[.]" in line][:15]
        return (f"{summary_line(r)} (under perf)\nby object: " + "; ".join(by_dso[:6]) +
                "\nuser-space symbols (share of all samples):\n" + "\n".join(user))

    # ---- the run
    def new_topology(self) -> Topology:
        self.seq += 1
        topo = Topology(f"{self.tag_base}-{self.seq}", self.workdir / f"topo{self.seq}", self.bulk_file,
                        udp_echo=self.args.lightpath, backend_mount_ns=self.args.backend_mount_ns,
                        congestion=self.args.congestion_control)
        self.topo = topo
        topo.up()
        return topo

    def close_topology(self) -> None:
        if self.topo is not None:
            self.topo.close()
            self.topo = None

    def cleanup(self) -> None:
        self.close_topology()
        if not self.args.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# The UDP case's client, run with the interpreter running this script inside the client namespace.
# argv: HOST:PORT SECONDS SOCKETS. Each connected socket keeps one 64-byte request in flight; a reply
# must end with the request (the backends' echo prefixes its name); no reply within 1 s is a loss and
# the request is sent again. Prints one `LPB {json}` line in the shape the other cases report.
UDP_CLIENT = r"""
import json, selectors, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
duration, n = float(sys.argv[2]), int(sys.argv[3])
sel = selectors.DefaultSelector()
socks, want, sent_at, seq = [], [b""] * n, [0.0] * n, [0] * n
lat, lost, refused = [], 0, 0
def send(i):
    seq[i] += 1
    want[i] = (b"%d %d " % (i, seq[i])).ljust(64, b"x")
    sent_at[i] = time.monotonic()
    socks[i].send(want[i])
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, int(port)))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, i)
    socks.append(s)
t0 = time.monotonic()
for i in range(n):
    send(i)
while time.monotonic() - t0 < duration:
    for key, _ in sel.select(timeout=0.05):
        i = key.data
        try:
            data = socks[i].recv(2048)
        except BlockingIOError:
            continue
        except ConnectionRefusedError:
            refused += 1
            send(i)
            continue
        if data.endswith(want[i]):
            lat.append(time.monotonic() - sent_at[i])
            send(i)
    now = time.monotonic()
    for i in range(n):
        if now - sent_at[i] > 1.0:
            lost += 1
            send(i)
secs = time.monotonic() - t0
lat.sort()
pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else None
print("LPB " + json.dumps({"rps": len(lat) / secs, "requests": len(lat), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                           "errors": lost + refused, "error_detail": f"lost {lost}, refused {refused}"}))
"""

WRK_LUA = """\
-- Prints one machine-readable line with exact percentiles (microseconds) and error counts.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('LPB {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50":%d,"p99":%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec: str = ",.0f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, kernel {platform.release()}"


def tool_versions(lightpath: Path) -> str:
    def first(cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    return "; ".join([first(["wrk", "-v"]).split(" Copyright")[0], first(["h2load", "--version"]),
                      first(["haproxy", "-v"]).split(" - ")[0], first(["nginx", "-v"]),
                      first(["iptables", "-V"]), first(["nft", "-v"]), first([str(lightpath), "--version"])])


@dataclass
class Results:
    # (mode label, case) -> list of per-round result dicts
    rows: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # lightpath errors, with the kept log
    setup: dict[str, list[float]] = field(default_factory=dict)
    idle_rss: dict[str, list[float]] = field(default_factory=dict)
    setup_rss: dict[str, list[float]] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)

    def add(self, label: str, case: str, r: dict) -> None:
        self.rows.setdefault((label, case), []).append(r)

    def agg(self, label: str, case: str) -> dict | None:
        rs = self.rows.get((label, case))
        if not rs:
            return None
        return {
            "rps": median([r["rps"] for r in rs]),
            "gbps": median([r.get("gbps") for r in rs]),
            "p50_ms": median([r["p50_ms"] for r in rs]),
            "p99_ms": median([r["p99_ms"] for r in rs]),
            "errors": [r["errors"] for r in rs],
            "cpu_pct": median([r["cpu_pct"] for r in rs]),
            "rss_mb": max([r["rss_mb"] for r in rs if r["rss_mb"] is not None], default=None),
            "rounds": len(rs),
            "detail": "; ".join(sorted({r["error_detail"] for r in rs if r["errors"]})),
            "churn_steps": [r["churn_steps"] for r in rs if "churn_steps" in r],
        }


def manifest_poll_ms(args) -> int:
    """lightpath's manifest poll interval: --manifest-poll-ms, else fast only when the churn case runs."""
    if args.manifest_poll_ms is not None:
        return args.manifest_poll_ms
    return CHURN_POLL_MS if "churn" in args.cases.split(",") else 60000


def congestion_line(args) -> str:
    machine = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    if args.congestion_control:
        return f"{args.congestion_control} in every namespace (`--congestion-control`; the machine's is {machine})"
    return f"{machine} in every namespace (the machine's default, inherited)"


def ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def render(res: Results, specs: list[ModeSpec], cases: list[str], args, cmdline: str, started: str,
           elapsed: float) -> str:
    out = []
    commit = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    out.append(f"## Load benchmark run — {started}\n")
    out.append(f"- Command: `{cmdline}` ({elapsed / 60:.1f} min)")
    out.append(f"- Machine: {machine()}; client, proxy and backends share these cores")
    out.append(f"- Commit: `{commit}`{' (working tree had uncommitted changes)' if dirty else ''}")
    out.append(f"- Tools: {tool_versions(args.lightpath)}")
    out += [f"- Note: {n}" for n in args.note]
    out.append(f"- TCP congestion control: {congestion_line(args)}")
    if args.lightpath_arg:
        out.append(f"- lightpath run flags added: `{' '.join(args.lightpath_arg)}`")
    out.append("- lightpath's source: " + (
        "the Kubernetes watcher (`--kubeconfig`), fed by the repo's fake API server (`fakeapi`) in the node "
        "namespace with the same objects" if args.source == "kube" else
        f"manifest files (`--manifests`, polled every {manifest_poll_ms(args)} ms)"))
    out.append(f"- Load average (1/5/15 min) at start {args.load_start}, at end {args.load_end}: anything else "
               f"running on the machine competes for the same cores")
    out.append(f"- {args.rounds} round(s) × {args.duration:g} s per case, modes interleaved "
               f"(order rotates each round); "
               f"table cells are medians over rounds, errors are listed per round; bulk body {args.bulk_mib} MiB; "
               f"{args.services:,} service ports × {args.endpoints_per_service} endpoints loaded where a mode "
               f"has rules or a table")
    out.append("- CPU% = proxy process utime+stime over the case's wall time (100% = one core); RSS = peak sampled "
               "every 200 ms during the case; kernel modes have no proxy process (–)")
    out.append("")
    by_label = {s.label: s for s in specs}
    main_specs = [s for s in specs if not s.name.endswith("@scale")]

    def base_label(name: str) -> str | None:
        for s in main_specs:
            if s.name == name:
                return s.label
        return None

    for case in cases:
        out.append(f"### {CASE_TITLES[case]}\n")
        bulk = case == "bulk"
        head = ["mode", "Gbit/s" if bulk else "req/s", "time (ms)" if bulk else "p50 (ms)",
                "" if bulk else "p99 (ms)", "errors", "proxy CPU%", "proxy RSS (MB)", "vs direct", "vs haproxy"]
        if bulk:
            head = [h for h in head if h]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        d_label = base_label("direct")
        for s in main_specs:
            a = res.agg(s.label, case)
            if a is None:
                continue
            key = "gbps" if bulk else "rps"
            d = res.agg(d_label, case) if d_label else None
            h_name = "haproxy-http" if s.name in L7_MODES else "haproxy-tcp"
            h_label = base_label(h_name)
            h = res.agg(h_label, case) if h_label else None
            cells = [s.label, fmt(a[key], ",.2f" if bulk else ",.0f"), fmt(a["p50_ms"], ",.2f")]
            if not bulk:
                cells.append(fmt(a["p99_ms"], ",.2f"))
            cells += [" / ".join(str(e) for e in a["errors"]), fmt(a["cpu_pct"], ".0f"), fmt(a["rss_mb"], ".1f"),
                      ratio(a[key], d[key] if d else None),
                      "–" if s.name.startswith("haproxy") else ratio(a[key], h[key] if h else None)]
            out.append("| " + " | ".join(cells) + " |")
        details = [f"{s.label}: {res.agg(s.label, case)['detail']}" for s in main_specs
                   if res.agg(s.label, case) and res.agg(s.label, case)["detail"]]
        if details:
            out.append("\nErrors: " + "; ".join(details) + ".")
        steps = [f"{s.label}: {' / '.join(map(str, res.agg(s.label, case)['churn_steps']))}" for s in main_specs
                 if res.agg(s.label, case) and res.agg(s.label, case)["churn_steps"]]
        if steps:
            how = ("PUT to the API server" if args.source == "kube" else
                   f"written to the manifest file, which lightpath polls every {manifest_poll_ms(args)} ms")
            out.append(f"\nEndpointSlice changes per round, written and applied (changes {how}; table versions "
                       f"served; the last change puts the original back; terminating → removed leaves the served table as it was, because a "
                       f"terminating endpoint gets no traffic while others are ready): " + "; ".join(steps) + ".")
        out.append("")
    scale_specs = [s for s in specs if s.name.endswith("@scale")]
    if scale_specs:
        out.append(f"### {CASE_TITLES['scale']}\n")
        out.append("| mode | conn/s at 10 svc | conn/s at full count | full / 10 |")
        out.append("|---|---|---|---|")
        for s in scale_specs:
            base = s.name.removesuffix("@scale")
            small = res.agg(s.label, "scale")
            full_label = base_label(base)
            full = res.agg(full_label, "newconn") if full_label else None
            if small is None:
                continue
            out.append(f"| {base} | {fmt(small['rps'])} | {fmt(full['rps'] if full else None)} | "
                       f"{ratio(full['rps'] if full else None, small['rps'])} |")
        out.append("")
    out.append("### Setup and memory\n")
    out.append("| mode | setup to first 200 (s) | proxy RSS peak during setup (MB) | proxy RSS idle after setup (MB) |")
    out.append("|---|---|---|---|")
    for s in specs:
        if s.label in res.setup:
            out.append(f"| {s.label} | {fmt(median(res.setup[s.label]), '.2f')} | "
                       f"{fmt(median(res.setup_rss.get(s.label, [])), '.1f')} | "
                       f"{fmt(median(res.idle_rss.get(s.label, [])), '.1f')} |")
    out.append("")
    if res.profiles:
        out.append("### Where the proxies spend their CPU (keep-alive, perf record -F 999, self time)\n")
        for label, text in res.profiles.items():
            out.append(f"{label}:\n\n```\n{text}\n```\n")
    if res.failures:
        out.append("### Steps that failed\n")
        out += [f"- {f}" for f in res.failures]
        out.append("")
    if res.unexpected:
        out.append("### lightpath errors, with the proxy's log kept\n")
        out += [f"- {f}" for f in res.unexpected]
        out.append("")
    out.append("### Targets (issue 8)\n")
    out += targets(res, main_specs, scale_specs, args)
    out.append("")
    return "\n".join(out)


def targets(res: Results, main_specs: list[ModeSpec], scale_specs: list[ModeSpec], args) -> list[str]:
    def label(name: str) -> str | None:
        return next((s.label for s in main_specs if s.name == name), None)

    def agg(name: str, case: str):
        lbl = label(name)
        return res.agg(lbl, case) if lbl else None

    def verdict(ok) -> str:
        return "not measured" if ok is None else ("**met**" if ok else "**missed**")

    def rounds(a: str, b: str, case: str, key: str) -> str:
        """The ratio a/b round by round: the modes are interleaved, so each round pairs runs made
        moments apart, and the spread shows how far one run's median can be trusted."""
        ra, rb = res.rows.get((label(a), case), []), res.rows.get((label(b), case), [])
        pairs = [(x.get(key), y.get(key)) for x, y in zip(ra, rb)]
        if len(pairs) < 2 or len(ra) != len(rb) or any(not x or not y for x, y in pairs):
            return ""
        return "; per round " + " / ".join(f"{x / y:.2f}×" for x, y in pairs)

    def cpu_per_req(a: dict) -> str:
        if not a.get("cpu_pct") or not a.get("rps"):
            return "–"
        return f"{a['cpu_pct'] / 100 / a['rps'] * 1e6:.1f}"

    lines = []
    l4, ht = agg("lightpath-l4", "keepalive"), agg("haproxy-tcp", "keepalive")
    if l4 and ht and l4["rps"] and ht["rps"]:
        r = l4["rps"] / ht["rps"]
        ok = r >= 1.2 and (l4["p99_ms"] or 0) <= (ht["p99_ms"] or 0)
        lines.append(f"- lightpath-l4 keep-alive ≥ 1.2× haproxy-tcp, p99 ≤ haproxy-tcp: {verdict(ok)} "
                     f"({r:.2f}×, p99 {fmt(l4['p99_ms'], '.2f')} vs {fmt(ht['p99_ms'], '.2f')} ms"
                     f"{rounds('lightpath-l4', 'haproxy-tcp', 'keepalive', 'rps')}; proxy CPU per request "
                     f"{cpu_per_req(l4)} vs {cpu_per_req(ht)} µs)")
    else:
        lines.append(f"- lightpath-l4 keep-alive ≥ 1.2× haproxy-tcp: {verdict(None)}")
    l7, hh = agg("lightpath-l7", "keepalive"), agg("haproxy-http", "keepalive")
    if l7 and hh and l7["rps"] and hh["rps"]:
        r = l7["rps"] / hh["rps"]
        ok = r >= 1.2 and (l7["p99_ms"] or 0) <= (hh["p99_ms"] or 0)
        lines.append(f"- lightpath-l7 keep-alive ≥ 1.2× haproxy-http, p99 ≤ haproxy-http: {verdict(ok)} "
                     f"({r:.2f}×, p99 {fmt(l7['p99_ms'], '.2f')} vs {fmt(hh['p99_ms'], '.2f')} ms"
                     f"{rounds('lightpath-l7', 'haproxy-http', 'keepalive', 'rps')}; proxy CPU per request "
                     f"{cpu_per_req(l7)} vs {cpu_per_req(hh)} µs)")
    else:
        lines.append(f"- lightpath-l7 keep-alive ≥ 1.2× haproxy-http: {verdict(None)}")
    l4n, htn = agg("lightpath-l4", "newconn"), agg("haproxy-tcp", "newconn")
    if l4n and htn and l4n["rps"] and htn["rps"]:
        r = l4n["rps"] / htn["rps"]
        lines.append(f"- new-connection rate lightpath-l4 ≥ haproxy-tcp: {verdict(r >= 1.0)} ({r:.2f}×"
                     f"{rounds('lightpath-l4', 'haproxy-tcp', 'newconn', 'rps')})")
    else:
        lines.append(f"- new-connection rate lightpath-l4 ≥ haproxy-tcp: {verdict(None)}")
    small = next((res.agg(s.label, "scale") for s in scale_specs if s.name == "lightpath-l4@scale"), None)
    if small and l4n and small["rps"] and l4n["rps"]:
        r = l4n["rps"] / small["rps"]
        lines.append(f"- lightpath-l4 new-connection rate flat from 10 to {args.services:,} services (≥ 0.9×): "
                     f"{verdict(r >= 0.9)} ({r:.2f}×)")
    else:
        lines.append(f"- lightpath-l4 new-connection rate flat from 10 to {args.services:,} services: {verdict(None)}")
    l4b, nb = agg("lightpath-l4", "bulk"), agg("nft-dnat", "bulk")
    if l4b and nb and l4b["gbps"] and nb["gbps"]:
        r = l4b["gbps"] / nb["gbps"]
        lines.append(f"- bulk lightpath-l4 ≥ 80% of nft-dnat: {verdict(r >= 0.8)} ({r * 100:.0f}%"
                     f"{rounds('lightpath-l4', 'nft-dnat', 'bulk', 'gbps')}; TCP congestion control "
                     f"{args.congestion_control or 'the machine default'}"
                     f"{', lightpath ' + ' '.join(args.lightpath_arg) if args.lightpath_arg else ''})")
    else:
        lines.append(f"- bulk lightpath-l4 ≥ 80% of nft-dnat: {verdict(None)}")
    for fcase in ("failure", "failure-newconn"):
        l7f = agg("lightpath-l7", fcase)
        others = ", ".join(f"{n} {'/'.join(str(e) for e in a['errors'])}" for n in (
            "nft-dnat", "iptables-dnat", "haproxy-tcp", "haproxy-http", "lightpath-l4") if (a := agg(n, fcase)))
        if l7f:
            lines.append(f"- {fcase} run, 0 client-visible errors through lightpath-l7: "
                         f"{verdict(all(e == 0 for e in l7f['errors']))} (errors per round "
                         f"{'/'.join(str(e) for e in l7f['errors'])}; same run: {others or 'no other mode'})")
        else:
            lines.append(f"- {fcase} run, 0 errors through lightpath-l7: {verdict(None)}")
    peaks = [m for s in main_specs if s.name.startswith("lightpath")
             for m in [res.agg(s.label, c)["rss_mb"] for c in ALL_CASES if res.agg(s.label, c)] if m]
    idle = [m for s in main_specs if s.name.startswith("lightpath") for m in res.idle_rss.get(s.label, [])]
    setup = [m for s in main_specs if s.name.startswith("lightpath") for m in res.setup_rss.get(s.label, [])]
    if (peaks or idle or setup) and args.services >= 10000:
        worst = max(peaks + idle + setup)
        lines.append(f"- lightpath RSS ≤ 150 MB at {args.services:,} services / "
                     f"{args.services * args.endpoints_per_service:,} endpoints: {verdict(worst <= 150)} "
                     f"(during setup {fmt(max(setup) if setup else None, '.1f')} MB, "
                     f"idle {fmt(max(idle) if idle else None, '.1f')} MB, "
                     f"under load {fmt(max(peaks) if peaks else None, '.1f')} MB)")
    else:
        lines.append(f"- lightpath RSS ≤ 150 MB at 10,000 services / 100,000 endpoints: {verdict(None)}")
    return lines


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="1 s per case (every case, hang included), 1 round, 64 MiB bulk, 1,000 services; exit "
                         "non-zero unless every mode carried traffic; prints 'smoke: N passed, N failed'")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per case (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma list from {','.join(ALL_MODES)}")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help=f"comma list from {','.join(ALL_CASES)} (default: all but hang)")
    ap.add_argument("--services", type=int, default=10000, help="service ports loaded (default 10,000)")
    ap.add_argument("--endpoints-per-service", type=int, default=10, help="endpoints per filler service (default 10)")
    ap.add_argument("--no-scale", action="store_true", help="skip the 10-service new-connection comparison")
    ap.add_argument("--bulk-mib", type=int, default=1024, help="bulk body size in MiB (default 1024 = 1 GiB)")
    ap.add_argument("--lightpath", type=Path, default=None,
                    help="lightpath binary (default target/release/lightpath; --smoke falls back to target/debug)")
    ap.add_argument("--append", type=Path, default=None,
                    help="markdown file to append the report to (default BENCHMARKS.md; none with --smoke)")
    ap.add_argument("--no-append", action="store_true", help="print the report only")
    ap.add_argument("--keep-workdir", action="store_true", help="keep generated configs and logs")
    ap.add_argument("--backend-mount-ns", action="store_true",
                    help="start the backends with `ip netns exec` (a mount namespace each), as before session 9: "
                         "a killed backend's sockets then close only once that namespace is torn down, up to "
                         "seconds later on a saturated machine (a dying pod that holds requests)")
    ap.add_argument("--l7-annotation", action="append", default=[], metavar="KEY=VALUE",
                    help="an annotation on the benchmarked Service in lightpath-l7's manifest, e.g. "
                         "lightpath.io/per-try-timeout=500ms; repeatable")
    ap.add_argument("--lightpath-arg", action="append", default=[], metavar="ARG",
                    help="an extra argument for `lightpath run` in the lightpath modes, e.g. "
                         "--lightpath-arg=--tcp-congestion=cubic; repeatable")
    ap.add_argument("--source", choices=("file", "kube"), default="file",
                    help="where lightpath gets its Services and EndpointSlices: `file` (--manifests, the "
                         "default) or `kube` (--kubeconfig to the repo's fake API server, `fakeapi`, started "
                         "in the node namespace with the same objects: the Kubernetes watcher as on a node)")
    ap.add_argument("--fakeapi", type=Path, default=None,
                    help="the fakeapi binary for --source kube (default: next to --lightpath; build it with "
                         "`cargo build --release -p fakeapi`)")
    ap.add_argument("--manifest-poll-ms", type=int, default=None,
                    help=f"lightpath's --manifest-poll-ms (default 60000, or {CHURN_POLL_MS} when the churn case "
                         "runs: at 10,000 services every poll re-reads and hashes tens of MB, work the kube "
                         "source does not do)")
    ap.add_argument("--congestion-control", default=None, metavar="ALGO",
                    help="net.ipv4.tcp_congestion_control in every namespace (client, node, backends) for every "
                         "mode (default: the machine's, which each new namespace inherits)")
    ap.add_argument("--log-dir", type=Path, default=REPO / "target/load-logs",
                    help="where a lightpath log is copied when a case saw client-visible errors "
                         "(default target/load-logs; the workdir itself is removed at the end)")
    ap.add_argument("--note", action="append", default=[],
                    help="a line of context for the report (e.g. what the lightpath build contains); repeatable")
    ap.add_argument("--profile", action="store_true",
                    help="after the rounds, one extra keep-alive run per userspace proxy under `perf record`; "
                         "the flat profile goes into the report")
    ap.add_argument("--perf-callgraph", action="store_true",
                    help="with --profile: record DWARF call graphs too (with --keep-workdir, read them later with "
                         "`perf report -i WORKDIR/perf-N.data --children`)")
    args = ap.parse_args(argv)
    bad = [a for a in args.l7_annotation if "=" not in a or not a.split("=", 1)[0]]
    if bad:
        ap.error(f"--l7-annotation {bad[0]!r}: want KEY=VALUE")
    if args.smoke:
        args.duration, args.rounds, args.bulk_mib = 1.0, 1, 64
        if "--cases" not in argv:
            args.cases = ",".join(ALL_CASES)  # the opt-in cases too: the smoke pass checks every code path
        if "--services" not in argv:
            args.services = 1000
        if args.append is None:
            args.no_append = True
    churn = "churn" in args.cases.split(",")
    if churn and args.manifest_poll_ms is not None and args.manifest_poll_ms > CHURN_PERIOD_S * 1000:
        ap.error(f"the churn case changes the manifest every {CHURN_PERIOD_S:g} s: --manifest-poll-ms "
                 f"{args.manifest_poll_ms} would miss changes (use {int(CHURN_PERIOD_S * 1000)} or less)")
    if churn and args.source == "file" and args.services > CHURN_MAX_SERVICES:
        ap.error(f"the churn case rewrites lightpath's whole manifest file every second and the file source "
                 f"re-parses all of it: use --services {CHURN_MAX_SERVICES} or fewer (the kube source applies "
                 f"one object per change; its propagation is measured by benches/benches/propagation.rs)")
    if args.append is None:
        args.append = REPO / "BENCHMARKS.md"
    if args.lightpath is None:
        rel, dbg = REPO / "target/release/lightpath", REPO / "target/debug/lightpath"
        args.lightpath = rel if rel.exists() or not args.smoke else dbg
    args.lightpath = args.lightpath.resolve()
    if args.fakeapi is None:
        args.fakeapi = args.lightpath.parent / "fakeapi"
    args.fakeapi = args.fakeapi.resolve()
    if args.source == "kube" and not os.access(args.fakeapi, os.X_OK):
        ap.error(f"--source kube needs the fakeapi binary: {args.fakeapi} is missing "
                 f"(cargo build --release -p fakeapi, or --fakeapi BIN)")
    return args


def check_env(args, modes: list[str]) -> None:
    if os.geteuid() != 0:
        raise BenchError("must run as root (it creates network namespaces and nftables rules)")
    need = ["ip", "nsenter", "nft", "nginx", "wrk", "h2load", "curl"]
    if "iptables-dnat" in modes:
        need.append("iptables-restore")
    if any(m.startswith("haproxy") for m in modes):
        need.append("haproxy")
    missing = [t for t in need if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (Debian: iproute2 nftables nginx-light wrk "
                         f"nghttp2-client curl iptables haproxy; .ci/run installs them)")
    if any(m.startswith("lightpath") for m in modes) and not os.access(args.lightpath, os.X_OK):
        raise BenchError(f"lightpath binary {args.lightpath} not found: build it with "
                         f"`cargo build --release -p lightpath` or pass --lightpath")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    cases = [c for c in args.cases.split(",") if c]
    bad = [m for m in modes if m not in ALL_MODES] + [c for c in cases if c not in ALL_CASES]
    if bad:
        print(f"unknown mode/case: {', '.join(bad)}", file=sys.stderr)
        return 2
    try:
        check_env(args, modes)
    except BenchError as e:
        print(f"load benchmark: {e}", file=sys.stderr)
        return 2

    specs = [ModeSpec(m, args.services) for m in modes]
    if not args.no_scale and "newconn" in cases:
        specs += [ModeSpec(f"{m}@scale", 10) for m in ("iptables-dnat", "nft-dnat", "lightpath-l4") if m in modes]

    bench = Bench(args)
    interrupted = []

    def on_signal(signum, _frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.monotonic()
    args.load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    res = Results()
    checks: list[tuple[str, bool, str]] = []
    try:
        for rnd in range(args.rounds):
            order = specs[rnd % len(specs):] + specs[:rnd % len(specs)]
            for spec in order:
                scale = spec.name.endswith("@scale")
                real = ModeSpec(spec.name.removesuffix("@scale"), spec.services)
                my_cases = ["scale"] if scale else [c for c in cases if (c != "udp" or real.name in UDP_MODES)
                                                    and (c != "churn" or real.name in CHURN_MODES)]
                log(f"round {rnd + 1}/{args.rounds}: {spec.label}")
                try:
                    bench.new_topology()
                    run = bench.start_mode(real)
                except BenchError as e:
                    res.failures.append(f"round {rnd + 1}, {spec.label}: setup failed: {e}")
                    checks += [(f"{spec.label} {c}", False, f"setup failed: {e}") for c in my_cases]
                    log(f"  setup failed: {e}")
                    bench.close_topology()
                    continue
                res.setup.setdefault(spec.label, []).append(run.setup_s)
                if run.idle_rss is not None:
                    res.idle_rss.setdefault(spec.label, []).append(run.idle_rss)
                if run.setup_peak_rss is not None:
                    res.setup_rss.setdefault(spec.label, []).append(run.setup_peak_rss)
                for case in my_cases:
                    try:
                        r = bench.run_case(spec, run, case)
                    except BenchError as e:
                        res.failures.append(f"round {rnd + 1}, {spec.label}, {case}: {e}")
                        checks.append((f"{spec.label} {case}", False, str(e)))
                        log(f"  {case}: failed: {e}")
                        continue
                    res.add(spec.label, case, r)
                    # Errors lightpath may have to explain (all but L4's failure and hang runs, where
                    # a dead or frozen backend's open connections are lost as with any L4 relay; for
                    # L7's hang run they are expected unless a per-try timeout is set): keep its log.
                    if r.get("errors") and real.name.startswith("lightpath") and (
                            case not in FAILURE_CASES or real.name == "lightpath-l7"):
                        kept = bench.keep_proxy_log(real, f"round{rnd + 1}-{case}")
                        res.unexpected.append(f"round {rnd + 1}, {spec.label}, {case}: {r['errors']} errors "
                                              f"({r['error_detail']}); proxy log kept in {kept}")
                        log(f"  {case}: proxy log kept in {kept}")
                    ok, why = smoke_check(case, r)
                    checks.append((f"{spec.label} {case}", ok, why))
                    log(f"  {case}: {summary_line(r)}{'' if ok else '  <-- ' + why}")
                    if not r["proxy_alive"]:
                        res.failures.append(f"round {rnd + 1}, {spec.label}, {case}: proxy process died: "
                                            f"{bench.proc_log_tail(real)}")
                        break
                bench.close_topology()
        if args.profile and "keepalive" in cases:
            for spec in specs:
                if spec.name.endswith("@scale") or not spec.name.startswith(("lightpath", "haproxy")):
                    continue
                log(f"profile: {spec.label}")
                try:
                    bench.new_topology()
                    res.profiles[spec.label] = bench.profile(bench.start_mode(spec), "keepalive")
                except BenchError as e:
                    res.failures.append(f"profile of {spec.label}: {e}")
                finally:
                    bench.close_topology()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        bench.cleanup()
        return 130
    finally:
        bench.cleanup()
    elapsed = time.monotonic() - t_start
    args.load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    cmdline = shlex.join(["benches/load/run.py"] + argv)
    report = render(res, specs, cases, args, cmdline, started, elapsed)
    print(report)
    if not args.no_append:
        with open(args.append, "a") as f:
            f.write("\n" + report)
        log(f"appended to {args.append}")
    failed = [c for c in checks if not c[1]]
    if args.smoke:
        for name, ok, why in checks:
            print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + why}")
        print(f"smoke: {len(checks) - len(failed)} passed, {len(failed)} failed")
        return 1 if failed or not checks else 0
    return 0


def smoke_check(case: str, r: dict) -> tuple[bool, str]:
    """What 'this mode works' means for the smoke pass: traffic flowed, and (except in the failure
    case, whose errors are the measurement) no request failed."""
    if not r["proxy_alive"]:
        return False, "proxy process exited"
    if r["requests"] <= 0:
        return False, f"no successful request ({r['error_detail']})"
    if case not in FAILURE_CASES and r["errors"] > 0:
        return False, f"{r['errors']} errors ({r['error_detail']})"
    return True, ""


def summary_line(r: dict) -> str:
    if r.get("gbps") is not None:
        return f"{r['gbps']:.2f} Gbit/s, errors {r['errors']}, cpu {fmt(r['cpu_pct'], '.0f')}%"
    return (f"{r['rps']:,.0f} req/s, p50 {fmt(r['p50_ms'], '.2f')} ms, p99 {fmt(r['p99_ms'], '.2f')} ms, "
            f"errors {r['errors']}, cpu {fmt(r['cpu_pct'], '.0f')}%, rss {fmt(r['rss_mb'], '.1f')} MB")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
