"""The line to a CARLA 0.9.16 server: the client, its time-outs and errors, synchronous mode and the town.

The client connects on the backend's first `reset` (a server that does not answer raises SimulatorError
naming host:port). It records the world settings it found, switches the world to synchronous mode with a
fixed delta (and the Traffic Manager with it), and restores those settings when the backend closes.

Time-outs and crashes: every RuntimeError from the client (a time-out, a lost connection, a failed spawn)
becomes SimulatorError (`call`); after a time-out the connection is `dead` and the next episode connects
a fresh client first. `probe_server` asks a server for its version once, before a run drives anything.
"""
from __future__ import annotations

import logging

from prunedrive.harness.backends.base import SimulatorError

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 10.0  # the one version call before a run
DEAD_CLOSE_TIMEOUT_S = 5.0  # closing on a server that stopped answering: a short attempt, then give up


def import_carla():
    try:
        import carla  # noqa: PLC0415 -- optional dependency, imported only when a CARLA suite runs
    except ImportError:
        raise ImportError("the CARLA backend needs the CARLA client: pip install prunedrive[carla] "
                          "(carla==0.9.16, Python 3.11 wheel) and a CARLA 0.9.16 server") from None
    return carla


def probe_server(host, port, timeout_s: float = PROBE_TIMEOUT_S, client_factory=None, api=None) -> None:
    """Ask the server for its version once, with a short time-out: a server that is not there fails the run
    in seconds, naming host:port, instead of costing every route its retries of `timeout_s` each."""
    carla = api or import_carla()
    address = f"{host}:{port}"
    try:
        client = (client_factory or carla.Client)(str(host), int(port))
        client.set_timeout(timeout_s)
        version = client.get_server_version()
    except RuntimeError as exc:
        raise SimulatorError(f"no CARLA server answered at {address} within {timeout_s:g} s ({exc}); "
                             "start one (./CarlaUE4.sh -RenderOffScreen -carla-rpc-port=PORT) or pass "
                             "--carla-host/--carla-port") from None
    log.info("CARLA server %s at %s", version, address)


class CarlaConnection:
    """One client of the server at host:port and what hangs off it: the world, its map and the Traffic
    Manager. `api` is the `carla` module (tests pass a stand-in); `client_factory(host, port)` makes the client
    (default `api.Client`). `client` is None until `connect` and after `drop`."""

    def __init__(self, api, host: str, port: int, tm_port: int, timeout_s: float, client_factory=None):
        self.carla, self.host, self.port, self.tm_port, self.timeout_s = api, host, port, tm_port, timeout_s
        self._client_factory = client_factory or api.Client
        self.client = self.world = self.tm = self.map = None
        self.original_settings = None  # the world settings found on the first connect, restored by `restore`
        self.dead = False  # the last call timed out: reconnect before the next episode

    def connect(self) -> None:
        client = self._client_factory(self.host, self.port)
        client.set_timeout(self.timeout_s)
        world = client.get_world()  # the first call that needs the server
        if self.original_settings is None:
            self.original_settings = world.get_settings()
        self.client, self.world, self.tm = client, world, client.get_trafficmanager(self.tm_port)
        self.map = None
        self.dead = False

    def drop(self) -> None:
        """Forget the client and everything read through it (the server side is left as it is)."""
        self.client = self.world = self.tm = self.map = None

    def call(self, fn, *args):
        """Run `fn`; any client error becomes SimulatorError (and a time-out marks the connection dead)."""
        try:
            return fn(*args)
        except SimulatorError:
            raise
        except RuntimeError as exc:
            text = str(exc)
            self.dead = "time-out" in text or "timeout" in text.lower()
            if self.dead:
                message = (f"CARLA server at {self.host}:{self.port} did not answer ({text}); is the simulator "
                           f"running there? (set --carla-host/--carla-port or the suite's host/port options)")
            else:
                message = f"CARLA server at {self.host}:{self.port}: {text}"
            raise SimulatorError(message) from exc

    def load_town(self, town: str, load_timeout_s: float) -> bool:
        """Make `town` the loaded world (reading the map on first use); True when it was loaded now, so that
        whatever was read off the previous world is stale."""
        if self.map is None:
            self.map = self.world.get_map()
        if self.map.name.split("/")[-1] == town:
            return False
        self.client.set_timeout(load_timeout_s)
        self.world = self.client.load_world(town, False)  # keep synchronous mode across the load
        self.client.set_timeout(self.timeout_s)
        self.map = self.world.get_map()
        return True

    def synchronous(self, fixed_delta: float, no_rendering: bool) -> None:
        """The world and the Traffic Manager in synchronous mode, one tick = `fixed_delta` simulated seconds."""
        settings = self.world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = fixed_delta
        settings.no_rendering_mode = no_rendering
        self.world.apply_settings(settings)
        self.tm.set_synchronous_mode(True)

    def shorten_timeout_if_dead(self) -> None:
        """The server may be gone: make the clean-up calls a short attempt."""
        if self.dead:
            self.client.set_timeout(min(self.timeout_s, DEAD_CLOSE_TIMEOUT_S))

    def restore(self) -> None:
        """The Traffic Manager and the world back in the mode they were found in."""
        self.tm.set_synchronous_mode(False)
        if self.original_settings is not None:
            self.world.apply_settings(self.original_settings)
