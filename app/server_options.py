"""The command-line flags of server-based simulator backends, from what each backend declares.

A backend whose class has `SERVER = ServerOptions("carla", "CARLA")` (harness.backends.base) gets
`--carla-host`, `--carla-port` and `--carla-servers HOST:PORT ...` on `prunedrive run`; nothing here names a
backend. What the flags say travels on as one generic pair: the backend options of every env (`host`, `port`)
and the servers, one per Ray worker (app.run.drive, harness.distributed.RayExecutor).
"""
from __future__ import annotations

import argparse
from typing import Callable

from prunedrive.harness.backends import BACKENDS, backend_class, backend_for_kind
from prunedrive.harness.backends.base import ServerOptions
from prunedrive.plugins.registry import RegistryError
from prunedrive.scenarios.loader import Suite


def server_backends() -> dict[str, ServerOptions]:
    """Backend name -> its ServerOptions, for every registered backend that drives a server. A plug-in that
    cannot be loaded is left out here: a suite that uses it says why when it is checked."""
    found: dict[str, ServerOptions] = {}
    for name in BACKENDS.names():
        try:
            server = getattr(backend_class(name), "SERVER", None)
        except RegistryError:
            continue
        if server is not None:
            found[name] = server
    return found


def add_server_options(parser: argparse.ArgumentParser, port_type: Callable[[str], int]) -> None:
    """--FLAG-host, --FLAG-port and --FLAG-servers for each server-based backend."""
    for server in server_backends().values():
        parser.add_argument(f"--{server.flag}-host", help=f"{server.label} server host ({server.flag} suites)")
        parser.add_argument(f"--{server.flag}-port", type=port_type,
                            help=f"{server.label} server RPC port, 1..65535 ({server.flag} suites)")
        parser.add_argument(f"--{server.flag}-servers", nargs="+", metavar="HOST:PORT",
                            help=f"one {server.label} server per worker (with --workers); worker i always uses "
                                 "server i")


def server_options(args: argparse.Namespace, suite: Suite) -> tuple[dict, list[str] | None]:
    """(backend options for every env, servers one per worker) from the flags given; refused, naming the flags,
    when the suite drives no scenario of that backend, when --FLAG-servers comes without --workers, or when
    two backends' server flags are given in one run (their host and port would be one mapping)."""
    given = {}
    for name, server in server_backends().items():
        options = {key: value for key in ("host", "port")
                   if (value := getattr(args, f"{server.flag}_{key}", None)) is not None}
        servers = getattr(args, f"{server.flag}_servers", None)
        if not options and not servers:
            continue
        flags = f"--{server.flag}-host/--{server.flag}-port/--{server.flag}-servers"
        if servers and not args.workers:
            raise ValueError(f"--{server.flag}-servers needs --workers (one server per worker); "
                             f"for one server use --{server.flag}-host/--{server.flag}-port")
        if not any(backend_for_kind(s.kind) == name for s in suite.scenarios):
            raise ValueError(f"{flags}: suite {suite.name!r} has no {server.label} scenario")
        _check_servers(servers or [], f"--{server.flag}-servers", args.workers)
        given[name] = (options, servers)
    if len(given) > 1:
        raise ValueError(f"server options of {' and '.join(given)} given together; a run takes one backend's")
    return next(iter(given.values()), ({}, None))


def _check_servers(servers: list[str], flag: str, workers: int | None) -> None:
    """Each server is HOST:PORT, one per worker: refused here, naming the flag, not later by the Ray executor."""
    from prunedrive.harness.distributed import parse_server

    for text in servers:
        try:
            parse_server(text)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: expected HOST:PORT with PORT in 1..65535") from None
    if servers and workers and workers > len(servers):
        raise ValueError(f"--workers {workers} needs as many servers in {flag} (one per worker), got {len(servers)}: "
                         f"{' '.join(servers)}")
