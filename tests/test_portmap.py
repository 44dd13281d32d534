"""The port mapping client (node/portmap.py) against the real miniupnpd in the internet bed
(chaos/internet.py): each method (PCP, NAT-PMP, UPnP-IGD) obtains a mapping a public host
can connect through, the mapping is renewed before it expires and deleted on stop, and a
router without a mapping service gives a clear "no port mapping" answer."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chaos/ is a folder of scripts, not installed

from chaos import internet
from chaos.internet import HomeSpec, Internet
from chaos.netns import wait_until
from valuemesh.node import natpmp
from valuemesh.node.portmap import Method, PortMapper, PortMapping

REASON = internet.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"internet bed: {REASON}")

DROP_WAIT_S = 1.0


@pytest.fixture(scope="module")
def net() -> Iterator[Internet]:
    internet.remove_stale()
    homes = [HomeSpec("upnp", "eim", upnp=True), HomeSpec("eim", "eim")]
    with Internet(homes, public_hosts=1) as bed:
        yield bed


def _reach(net: Internet, lst: socket.socket, ip: str, port: int) -> str | None:
    """Connect from pub1 to ip:port; the address the listener saw, or None if the attempt
    was dropped or refused."""
    c = net.sock("pub1")
    c.settimeout(DROP_WAIT_S)
    try:
        c.connect((ip, port))
        conn, addr = lst.accept()
        conn.close()
        return str(addr[0])
    except OSError:
        return None
    finally:
        c.close()


@pytest.mark.parametrize("method", ["pcp", "natpmp", "upnp"])
def test_each_method_maps_the_port_a_public_host_then_reaches(net: Internet, method: Method) -> None:
    port = {"pcp": 41001, "natpmp": 41002, "upnp": 41003}[method]
    lst = net.listener("upnp1", port)
    seen: list[PortMapping] = []

    async def body() -> tuple[PortMapping, str | None, PortMapping, str | None]:
        mapper = PortMapper(port, methods=(method,), lifetime_s=120)
        mapper.on_change(seen.append)
        got = await mapper.start()
        reached = await asyncio.to_thread(_reach, net, lst, got.external_ip, got.external_port)
        await mapper.stop()
        after = await asyncio.to_thread(_reach, net, lst, got.external_ip, got.external_port)
        return got, reached, mapper.current, after

    try:
        got, reached, stopped, after = net.call("upnp1", lambda: asyncio.run(body()))
    finally:
        lst.close()
    router = net.homes["upnp"].outside_ip
    assert got.obtained, got.describe()
    assert (got.method, got.external_ip, got.internal_port) == (method, router, port)
    assert got.external == f"{router}:{got.external_port}" and 0 < got.lifetime_s <= 120
    assert reached == net.host("pub1").ip  # the public host got in, seen with its own address
    assert after is None  # deleted on stop: dropped again
    assert not stopped.obtained and stopped.reason == "stopped"
    assert [m.method for m in seen] == [method, ""]


def test_the_mapping_is_renewed_before_it_expires(net: Internet) -> None:
    """Granted for 2 s (the bed's miniupnpd minimum) and renewed at half of that, a PCP
    mapping still lets the public host in after 4 s; a one-shot NAT-PMP mapping made at the
    same time for 2 s is gone by then, so it is the renewal that kept the first alive."""
    kept, once = 41010, 41011
    lk, lo = net.listener("upnp1", kept), net.listener("upnp1", once)
    router = net.homes["upnp"].outside_ip

    async def body() -> tuple[PortMapping, str | None, str | None, PortMapping]:
        mapper = PortMapper(kept, methods=("pcp",), lifetime_s=2)
        got = await mapper.start()
        gw = net.host("upnp1").gateway
        assert gw is not None
        one = await natpmp.natpmp_map(gw, once, 2, once)
        assert one.lifetime_s == 2
        await asyncio.sleep(4.0)
        reached_kept = await asyncio.to_thread(_reach, net, lk, router, got.external_port)
        reached_once = await asyncio.to_thread(_reach, net, lo, router, one.external_port)
        current = mapper.current
        await mapper.stop()
        return got, reached_kept, reached_once, current

    try:
        got, reached_kept, reached_once, current = net.call("upnp1", lambda: asyncio.run(body()))
    finally:
        lk.close()
        lo.close()
    assert got.method == "pcp" and got.lifetime_s == 2
    assert reached_once is None
    assert reached_kept == net.host("pub1").ip
    assert current.obtained and current.external_port == got.external_port


def test_a_router_without_a_mapping_service_says_so(net: Internet) -> None:
    got = net.call("eim1", lambda: asyncio.run(PortMapper(41020).start()))
    assert not got.obtained and got.external == ""
    assert "granted none" in got.reason
    for method in ("pcp:", "natpmp:", "upnp:"):
        assert method in got.reason
    assert got.describe().startswith("no port mapping: the router at 192.168.")


def test_a_public_host_has_no_router_to_ask(net: Internet) -> None:
    got = net.call("pub1", lambda: asyncio.run(PortMapper(41021).start()))
    assert not got.obtained and "no default gateway" in got.reason


def test_turned_off_asks_nothing(net: Internet) -> None:
    before = net.miniupnpd_log("upnp").count("request received from")

    async def body() -> PortMapping:
        mapper = PortMapper(41022, enabled=False)
        got = await mapper.start()
        await mapper.stop()
        return got

    got = net.call("upnp1", lambda: asyncio.run(body()))
    assert not got.obtained and "turned off" in got.reason
    assert net.miniupnpd_log("upnp").count("request received from") == before


def test_a_node_listening_on_loopback_or_another_address_maps_nothing(net: Internet) -> None:
    before = net.miniupnpd_log("upnp").count("request received from")
    on_lo = net.call("upnp1", lambda: asyncio.run(PortMapper(41023, listen_host="127.0.0.1").start()))
    assert not on_lo.obtained and "loopback" in on_lo.reason
    elsewhere = net.call("upnp1", lambda: asyncio.run(PortMapper(41024, listen_host="10.9.9.9").start()))
    assert not elsewhere.obtained and f"not on {net.host('upnp1').ip}," in elsewhere.reason
    assert net.miniupnpd_log("upnp").count("request received from") == before


def test_the_daemon_maps_its_peer_port_by_default_and_unmaps_it_on_stop(net: Internet, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "valuemesh"
    if not exe.exists():
        pytest.skip("the valuemesh command is not installed in this environment")
    log = tmp_path / "daemon.log"
    router = net.homes["upnp"].outside_ip
    with open(log, "w") as err:
        proc = net.popen("upnp1", [str(exe), "--home", str(tmp_path / "home"), "daemon", "--init-if-missing",
                                   "--network", "vmtest-portmap"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        assert wait_until(lambda: "port mapping: pcp mapped" in log.read_text(), 30.0), \
            log.read_text()[-2000:]
        assert f"pcp mapped {router}:7470 to port 7470" in log.read_text()
        c = net.sock("pub1")
        c.settimeout(5.0)
        c.connect((router, 7470))  # the daemon's peer port, from the public segment
        c.close()
    finally:
        assert net.stop(proc) == 0
    assert "port mapping: no port mapping: stopped" in log.read_text()
    lst = net.listener("upnp1", 7470)
    try:
        assert _reach(net, lst, router, 7470) is None
    finally:
        lst.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="not a TCP port"):
        PortMapper(0)
    with pytest.raises(ValueError, match="methods"):
        PortMapper(7470, methods=("socks",))  # type: ignore[arg-type]
