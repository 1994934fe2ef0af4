"""A free TCP port on the loopback interface: where a single-node multi-process fine-tune meets
(diffusion/distributed.py), and where the tests start their servers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now. The kernel may hand it out again before the caller binds it,
    so a caller that loses the race fails to bind and says so; nothing here reserves the port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
