"""The ``default`` network: one bridge per executor, a namespace per step.

Each step gets a network namespace holding ``lo`` and ``eth0``, one end of a
veth pair whose other end is a port of our bridge. A namespace is held by an
open descriptor of this process, not pinned by a mount: the pool of ready ones
puts no mount under the state dir, and a killed worker's namespaces (and their
veths) die with it. The bridge's address is the
steps' gateway; outbound traffic is masqueraded.

Isolation (nftables, one ``inet`` and one ``bridge`` table of ours):
- frames between two ports of the bridge are dropped, so steps cannot reach
  each other (the bridge family's forward hook sees exactly those frames);
- from the bridge, the host accepts only packets to the gateway address (and
  replies), never to its other addresses, and anything to 127.0.0.0/8 is
  dropped before routing, so host loopback services stay out of reach even
  where ``route_localnet`` is on.

Why the ``nft`` command and not pyroute2's nftables netlink: pyroute2 0.9 has
no expression builder for rules (one would hand-assemble netlink expression
lists for every match, NAT included), while ``nft -f -`` takes the whole
ruleset as one readable, atomic transaction and removes it with one command.
Links, addresses and routes are pyroute2 netlink calls.

Names are derived from the 8-hex id of the worker process that owns the
network (``executor.owners``): bridge ``ociw<id>``, veths ``ow<id><n>``,
tables ``ociworker_<id>``. Each worker process has its own bridge, so a
bridge is never shared; whoever finds the owner dead removes what its id names
(``teardown_instance``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ociworker.errors import ConfigError, HostError
from ociworker.executor.network import (
    _check,
    _in_own_thread,
    _libc,
    _set_loopback_up,
)
from ociworker.log import get_logger

_log = get_logger("ociworker.executor.network")

_CLONE_NEWNET = 0x40000000

#: Where an unconfigured worker picks its /24: the shared address space of
#: RFC 6598 (carrier-grade NAT), which hosts and LANs rarely use, unlike the
#: RFC 1918 ranges (Docker takes 172.17+/16, LANs and VPNs 10/8 and 192.168/16;
#: this host's resolver is 10.255.255.53). A /24 that overlaps an address or a
#: route already on the host is skipped, so two workers never share one.
DEFAULT_POOL = ipaddress.IPv4Network("100.64.0.0/10")
#: namespaces made ahead, so a step does not wait for one to be made: one when
#: the network is first used, another whenever a step takes the last ready one
POOL_SIZE = 1
#: namespaces kept for reuse when steps give theirs back (parallel stages
#: release several at once); beyond this they are destroyed
POOL_MAX = 8


@dataclass(frozen=True)
class Slot:
    """One ready namespace, held by the open descriptor ``fd`` (no mount: a
    killed worker's namespaces, and their veths, die with its descriptors),
    with ``address`` on its eth0."""

    fd: int
    veth: str
    address: ipaddress.IPv4Address

    @property
    def path(self) -> str:
        """What the runtime opens to join the namespace."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"


def _nft(script: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise HostError("the default network needs nftables: install the nftables package")
    res = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True)
    if res.returncode != 0:
        raise HostError(f"nft failed: {res.stderr.strip()}")


def _ruleset(ident: str, bridge: str, subnet: ipaddress.IPv4Network, gateway: str) -> str:
    return f"""
table bridge ociworker_{ident} {{
  chain isolate {{
    type filter hook forward priority 0; policy accept;
    iifname "ow{ident}*" drop
  }}
}}
table inet ociworker_{ident} {{
  chain no_host_loopback {{
    type filter hook prerouting priority -300; policy accept;
    iifname "{bridge}" ip daddr 127.0.0.0/8 drop
    iifname "{bridge}" ip6 daddr ::1 drop
  }}
  chain to_host {{
    type filter hook input priority 0; policy accept;
    iifname "{bridge}" ct state established,related accept
    iifname "{bridge}" ip daddr {gateway} accept
    iifname "{bridge}" drop
  }}
  chain nat_out {{
    type nat hook postrouting priority 100;
    ip saddr {subnet} oifname != "{bridge}" masquerade
  }}
}}
"""


def _delete_tables(ident: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        return
    for family in ("bridge", "inet"):
        subprocess.run([nft, "delete", "table", family, f"ociworker_{ident}"], capture_output=True)


def _delete_links(ident: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get("ifname") or ""
            if name == f"ociw{ident}" or name.startswith(f"ow{ident}"):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=link["index"])


def _delete_link(name: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for idx in ipr.link_lookup(ifname=name):
            with contextlib.suppress(Exception):
                ipr.link("del", index=idx)


def _wait_veths_gone(ident: str, timeout: float = 2.0) -> None:
    """Wait until the kernel has dismantled the closed namespaces of ``ident``
    (their veths go with them); whatever is still there then is deleted."""
    from pyroute2 import IPRoute

    deadline = time.monotonic() + timeout
    with IPRoute() as ipr:
        while time.monotonic() < deadline:
            if not any(
                (link.get("ifname") or "").startswith(f"ow{ident}") for link in ipr.get_links()
            ):
                return
            time.sleep(0.005)
    _delete_links(ident)


def teardown_instance(ident: str) -> None:
    """Remove the bridge, veths and tables of instance ``ident`` (all idempotent)."""
    _delete_tables(ident)
    _delete_links(ident)


def _used_networks() -> list[ipaddress.IPv4Network]:
    from pyroute2 import IPRoute

    used = []
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=2):
            used.append(
                ipaddress.IPv4Network(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
            )
        for r in ipr.get_routes(family=2):
            dst = r.get("RTA_DST")
            if dst and r["dst_len"] > 0:
                used.append(ipaddress.IPv4Network(f"{dst}/{r['dst_len']}", strict=False))
    return used


def _free_subnets(pool: ipaddress.IPv4Network) -> list[ipaddress.IPv4Network]:
    """Up to 16 random /24s of ``pool`` that overlap nothing on the host.

    Sampled, not listed: materialising the pool's 16384 networks costs 0.2 s,
    which every worker's first step would pay.
    """
    used = _used_networks()
    count = 1 << (24 - pool.prefixlen)
    base = int(pool.network_address)
    out: list[ipaddress.IPv4Network] = []
    for index in random.sample(range(count), min(count, 256)):
        net = ipaddress.IPv4Network((base + (index << 8), 24))
        if not any(net.overlaps(u) for u in used):
            out.append(net)
            if len(out) == 16:
                break
    return out


class BridgeNetwork:
    """The bridge of one executor and its pool of ready namespaces."""

    def __init__(self, subnet: str = "", *, ident: str) -> None:
        self._configured = subnet
        if subnet:
            try:
                net = ipaddress.IPv4Network(subnet, strict=False)
            except ValueError as exc:
                raise ConfigError(f"invalid network subnet {subnet!r}: {exc}") from None
            if net.prefixlen > 29:
                raise ConfigError(f"network subnet {subnet} is too small (at most /29)")
        self.ident = ident
        self.bridge = f"ociw{self.ident}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway: ipaddress.IPv4Address | None = None
        self._lock = asyncio.Lock()
        self._made = False
        self._free: list[ipaddress.IPv4Address] = []
        self._ready: list[Slot] = []
        self._filling: set[asyncio.Task[None]] = set()
        self._releasing: set[asyncio.Future[None]] = set()
        self._counter = 0
        self._closed = False
        self._warming: asyncio.Task[None] | None = None

    # -- set-up ------------------------------------------------------------

    async def _ensure(self) -> None:
        async with self._lock:
            if self._closed:
                raise HostError("the worker's network is closed")
            if self.subnet is None:
                await asyncio.to_thread(self._setup)

    def _setup(self) -> None:
        self._made = True
        try:
            self._make_bridge()
        except BaseException:
            teardown_instance(self.ident)
            raise

    def _make_bridge(self) -> None:
        from pyroute2 import IPRoute

        if self._configured:
            candidates = [ipaddress.IPv4Network(self._configured, strict=False)]
        else:
            candidates = _free_subnets(DEFAULT_POOL)
            if not candidates:
                raise HostError(f"no free /24 left in {DEFAULT_POOL} for the default network")
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            idx = ipr.link_lookup(ifname=self.bridge)[0]
            # No IPv6 on the bridge: a link-local address would let steps reach
            # host services listening on :: around the nft rules on IPv4.
            _write_sysctl(f"net/ipv6/conf/{self.bridge}/disable_ipv6", "1")
            for net in candidates:
                gw = next(net.hosts())
                ipr.addr("add", index=idx, address=str(gw), prefixlen=net.prefixlen)
                # Another worker may have taken the same /24 at the same moment.
                clash = [
                    a
                    for a in ipr.get_addr(family=2)
                    if a["index"] != idx
                    and ipaddress.IPv4Network(
                        f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}", strict=False
                    ).overlaps(net)
                ]
                if not clash:
                    self.subnet, self.gateway = net, gw
                    break
                ipr.addr("del", index=idx, address=str(gw), prefixlen=net.prefixlen)
                if self._configured:
                    raise ConfigError(f"network subnet {net} is already in use on this host")
            else:
                raise HostError("could not find a free subnet for the default network")
            ipr.link("set", index=idx, state="up")
        assert self.subnet is not None
        self._free = [h for h in self.subnet.hosts() if h != self.gateway]
        _nft(_ruleset(self.ident, self.bridge, self.subnet, str(self.gateway)))
        # Steps' packets are routed out through the host; Docker turns this on too.
        _write_sysctl("net/ipv4/ip_forward", "1")

    def warm(self) -> None:
        """Start making the bridge and a namespace in the background, for a step
        that will run once its inputs are ready (a base image being pulled): the
        set-up (~0.1 s, most of it importing pyroute2) then overlaps that wait
        instead of delaying the step. A failure here is left for the step's own
        ``acquire`` to report."""
        if self._warming is not None or self._closed:
            return

        async def warming() -> None:
            with contextlib.suppress(Exception):
                await self._ensure()
                self._refill()

        self._warming = asyncio.ensure_future(warming())

    # -- namespaces ----------------------------------------------------------

    def _next_veth(self) -> str:
        self._counter += 1
        return f"ow{self.ident}{self._counter % 0x10000:04x}"

    async def _make_slot(self) -> Slot:
        if not self._free:
            raise HostError(f"the default network {self.subnet} has no free address left")
        address = self._free.pop(0)
        veth = self._next_veth()
        fds: list[int] = []
        try:
            await _in_own_thread(lambda: self._create(veth, address, fds))
        except BaseException as exc:
            await asyncio.to_thread(self._destroy, Slot(fds[0] if fds else -1, veth, address))
            if isinstance(exc, OSError):
                raise HostError(f"cannot create a network namespace: {exc}") from exc
            raise
        return Slot(fds[0], veth, address)

    def _create(self, veth: str, address: ipaddress.IPv4Address, fds: list[int]) -> None:
        """In its own thread: unshare, hold, lo up, eth0 <-> veth on the bridge.

        The namespace's descriptor is appended to ``fds`` as soon as it exists,
        so a failure later on still finds it to close.
        """
        from pyroute2 import IPRoute

        assert self.subnet is not None and self.gateway is not None
        libc = _libc()
        host_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with IPRoute() as host:  # opened before unshare: stays in the host's namespace
                _check(libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
                ns_file = f"/proc/self/task/{threading.get_native_id()}/ns/net"
                fds.append(os.open(ns_file, os.O_RDONLY | os.O_CLOEXEC))
                _set_loopback_up()
                with IPRoute() as ns:
                    ns.link(
                        "add",
                        ifname="eth0",
                        kind="veth",
                        peer={"ifname": veth, "net_ns_fd": host_fd},
                    )
                    eth0 = ns.link_lookup(ifname="eth0")[0]
                    ns.addr(
                        "add",
                        index=eth0,
                        address=str(address),
                        prefixlen=self.subnet.prefixlen,
                    )
                    ns.link("set", index=eth0, state="up")
                    ns.route("add", dst="0.0.0.0/0", gateway=str(self.gateway))
                br = host.link_lookup(ifname=self.bridge)[0]
                peer = host.link_lookup(ifname=veth)[0]
                host.link("set", index=peer, master=br, state="up")
        finally:
            os.close(host_fd)

    def _destroy(self, slot: Slot) -> None:
        # Deleting our end removes the pair now, not when the kernel gets
        # round to freeing the namespace.
        _delete_link(slot.veth)
        if slot.fd >= 0:
            os.close(slot.fd)
        self._free.append(slot.address)

    def _refill(self) -> None:
        # Only when none is left: a step's namespace comes back when it ends, so
        # in a sequential build the pool never runs dry and no namespace is made
        # (or destroyed) per step, as in BuildKit's pool; making one costs ~30 ms
        # of netlink and RCU work that would compete with the step for the CPU.
        while len(self._ready) + len(self._filling) < POOL_SIZE and not self._closed:
            task = asyncio.ensure_future(self._fill_one())
            self._filling.add(task)
            task.add_done_callback(self._filling.discard)

    async def _fill_one(self) -> None:
        try:
            slot = await self._make_slot()
        except Exception as exc:  # the next acquire makes its own and reports
            _log.warning("could not prepare a network namespace", error=str(exc))
            return
        if self._closed:
            await asyncio.to_thread(self._destroy, slot)
        else:
            self._ready.append(slot)

    async def acquire(self) -> Slot:
        """A namespace for one step; give it back with ``release``."""
        await self._ensure()
        slot = self._ready.pop(0) if self._ready else None
        self._refill()
        return slot if slot is not None else await self._make_slot()

    async def release(self, slot: Slot, *, reuse: bool) -> None:
        """Give a step's namespace back once every process in it is gone.

        ``reuse``: the step could not change the namespace (no CAP_NET_ADMIN,
        Docker's default capability set: no address, route, rule or sysctl of
        it can be altered), so it goes back to the pool, as BuildKit's pool
        does; making and deleting a veth pair per step cost ~20 ms each.
        Otherwise it is destroyed, in the background: deleting a veth waits for
        the kernel's RCU grace periods, which a finished step need not wait for.
        ``aclose`` waits for these.
        """
        if reuse and not self._closed and len(self._ready) < POOL_MAX:
            self._ready.append(slot)
            return
        task = asyncio.ensure_future(asyncio.to_thread(self._destroy, slot))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def aclose(self) -> None:
        """Remove every namespace, veth, the bridge and the tables."""
        if self._warming is not None:
            await asyncio.gather(self._warming, return_exceptions=True)
        async with self._lock:
            self._closed = True
            if self._filling or self._releasing:
                await asyncio.gather(*self._filling, *self._releasing, return_exceptions=True)
            ready, self._ready = self._ready, []
            # Closing the last descriptor of a namespace makes the kernel dismantle
            # it, veth included, in one batch in the background; deleting each veth
            # here instead would wait out an RCU grace period per link (~25 ms
            # each, serialised by the RTNL lock), a cost every embedded build pays
            # on exit.
            for slot in ready:
                os.close(slot.fd)
            if self._made:
                await asyncio.gather(
                    asyncio.to_thread(_delete_tables, self.ident),
                    asyncio.to_thread(_delete_link, self.bridge),
                )
                await asyncio.to_thread(_wait_veths_gone, self.ident)
                self._made = False


def _write_sysctl(name: str, value: str) -> None:
    path = Path("/proc/sys") / name
    with contextlib.suppress(FileNotFoundError):
        if path.read_text().strip() != value:
            path.write_text(value)
