"""Free TCP ports for listeners that bind seconds after the pick (our local Ray head, test servers)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS_END = 19999  # Ray's default max_worker_port: its workers bind 10002-19999


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux; the usual default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii").split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))  # every interface: a listener on any address makes the port unusable
        except OSError:
            return False
    return True


def listen_ports(count: int) -> list[int]:
    """`count` distinct ports free now, above Ray's worker ports and below the kernel's ephemeral range.

    Not bind(0): that hands out an ephemeral port, which any outgoing connection on the machine may take
    as its local port in the seconds between our pick and the bind.
    """
    low, high = RAY_WORKER_PORTS_END + 1, ephemeral_port_range()[0] - 1
    ports: list[int] = []
    rng = random.SystemRandom()
    for _ in range(1000):
        if len(ports) == count:
            return ports
        port = rng.randint(low, high) if high - low > 100 * count else 0
        if port == 0:  # an unusual ephemeral range leaves no room below it: take the kernel's pick
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
        if port not in ports and _bindable(port):
            ports.append(port)
    raise OSError(f"found only {len(ports)} of {count} free ports")
