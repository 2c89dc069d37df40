"""Loaded by every Python process of the end-to-end test (via PYTHONPATH): blocks and records network use.

Loopback and Unix sockets stay allowed (DVC and torch use them locally); any other connection or DNS
lookup raises and is appended to the file named by FTSTUDY_NETBLOCK_LOG, which the test asserts is empty.
"""

import os
import socket

_LOG = os.environ.get("FTSTUDY_NETBLOCK_LOG")
_LOCAL = ("127.", "localhost", "::1", "0.0.0.0")
_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo


def _record(what: str) -> None:
    if _LOG:
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()} {what}\n")


def _is_local(host) -> bool:
    return not isinstance(host, str) or host.startswith(_LOCAL) or host == ""


def connect(self, address):
    if self.family == getattr(socket, "AF_UNIX", None) or _is_local(address[0]):
        return _connect(self, address)
    _record(f"connect {address!r}")
    raise OSError(f"network blocked by the test: connect {address!r}")


def getaddrinfo(host, *args, **kwargs):
    if _is_local(host):
        return _getaddrinfo(host, *args, **kwargs)
    _record(f"getaddrinfo {host!r}")
    raise socket.gaierror(f"network blocked by the test: lookup {host!r}")


socket.socket.connect = connect
socket.getaddrinfo = getaddrinfo
