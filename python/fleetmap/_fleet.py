"""Finding the fleet: a configured coordinator, or the embedded local cluster.

A fleet is configured by ``FLEETMAP_COORDINATOR`` (``host:port``),
``FLEETMAP_API_KEY`` and ``FLEETMAP_CA`` (path to the coordinator's
``ca.pem``), or by the same keys in the ``[fleet]`` section of
``~/.config/fleetmap/config`` (or the file ``FLEETMAP_CONFIG`` names)::

    [fleet]
    coordinator = head-node:7070
    api_key = fmkey_...
    ca = /etc/fleetmap/ca.pem

With neither, the first call starts a coordinator and one node daemon in this
process, on loopback; later calls reuse them and they stop when the process
exits.
"""

from __future__ import annotations

import atexit
import configparser
import os
import stat
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from . import _native
from ._errors import ConfigurationError, VersionMismatch


@dataclass(frozen=True)
class FleetAddress:
    coordinator: str
    ca_pem: bytes
    api_key: str
    description: str
    #: The embedded local cluster: its calls run in the caller's interpreter.
    embedded: bool = False


def getenv(name: str) -> Optional[str]:
    """``os.environ.get(name)``, for the variables every call looks at and
    that are mostly unset: ``os.environ.get`` raises and catches a KeyError
    for each of those, several times the cost of the look-up itself."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if type(data) is not dict:
        return environ.get(name)
    value = data.get(environ.encodekey(name))
    return None if value is None else str(environ.decodevalue(value))


def config_path() -> Path:
    return Path(_config_file())


def _config_file() -> str:
    # Strings, not Paths: every job looks here.
    explicit = getenv("FLEETMAP_CONFIG")
    if explicit is not None:
        return explicit
    base = getenv("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "fleetmap", "config")


#: The ``[fleet]`` section last read, by the file's path and what
#: ``stat`` said of it: every job reads the settings, and parses them only
#: when the file changed.
_SETTINGS_READ: Tuple[Optional[Tuple[object, ...]], Dict[str, str]] = (None, {})


def file_settings() -> Dict[str, str]:
    """The ``[fleet]`` section of the config file (empty without one); a
    caller may read it once and pass it to several of the functions here."""
    global _SETTINGS_READ
    path = _config_file()
    try:
        st = os.stat(path)
    except OSError:
        return {}
    if not stat.S_ISREG(st.st_mode):
        return {}
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    if _SETTINGS_READ[0] == key:
        return dict(_SETTINGS_READ[1])
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    settings = dict(parser["fleet"]) if parser.has_section("fleet") else {}
    _SETTINGS_READ = (key, settings)
    return dict(settings)


def configured_fleet(api_key: Optional[str], settings: Optional[Dict[str, str]] = None) -> Optional[FleetAddress]:
    """The configured fleet, or None when the embedded cluster should be used.
    ``settings``: the config file's, when the caller has read them."""
    if settings is None:
        settings = file_settings()
    coordinator = getenv("FLEETMAP_COORDINATOR") or settings.get("coordinator")
    if not coordinator:
        return None
    source = "FLEETMAP_COORDINATOR" if os.environ.get("FLEETMAP_COORDINATOR") else str(config_path())
    ca = os.environ.get("FLEETMAP_CA") or settings.get("ca")
    # A node gives its calls the CA itself (their file system may be an
    # image's, without the node's files).
    pem = os.environ.get("FLEETMAP_CA_PEM")
    if pem:
        ca_pem = pem.encode()
    elif not ca:
        raise ConfigurationError(
            f"the coordinator {coordinator} (from {source}) needs its CA certificate: set FLEETMAP_CA "
            "to the path of the coordinator's ca.pem (or `ca = PATH` in the config file)"
        )
    else:
        try:
            ca_pem = Path(ca).expanduser().read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the CA certificate {ca}: {exc}") from None
    key = api_key or os.environ.get("FLEETMAP_API_KEY") or settings.get("api_key")
    if not key:
        raise ConfigurationError(
            f"the coordinator {coordinator} needs an API key: pass api_key=, set FLEETMAP_API_KEY, "
            "or put `api_key = ...` in the config file (the key is in the coordinator's api-key file)"
        )
    return FleetAddress(coordinator, ca_pem, key, f"fleet at {coordinator}")


def require_isolation(explicit: Optional[bool], settings: Optional[Dict[str, str]] = None) -> bool:
    """Whether a job runs only on nodes that pin their calls: the argument
    if given, else ``FLEETMAP_REQUIRE_ISOLATION``, else ``require_isolation``
    in the config file's ``[fleet]`` section; off by default."""
    if explicit is not None:
        if not isinstance(explicit, bool):
            raise TypeError(f"require_isolation must be True or False, got {explicit!r}")
        return explicit
    if settings is None:
        settings = file_settings()
    value = getenv("FLEETMAP_REQUIRE_ISOLATION") or settings.get("require_isolation", "")
    if value.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(f"require_isolation must be true or false, got {value!r}")


_lock = threading.Lock()
_local: Optional["_native.LocalHandle"] = None
_connections: Dict[Tuple[str, str], "_native.Connection"] = {}
#: The embedded cluster's address, made once.
_local_address: Optional[FleetAddress] = None


def local_cluster() -> "_native.LocalHandle":
    """The embedded cluster of this process, started on first use."""
    global _local
    with _lock:
        if _local is None:
            from ._environment import find_uv, runtime_packages

            _local = _native.start_local_cluster("127.0.0.1:0", sys.executable, runtime_packages(), find_uv())
            atexit.register(_stop_local)
        return _local


def _stop_local() -> None:
    global _local
    _close_connections()
    with _lock:
        if _local is not None:
            _local.stop()
            _local = None


def fleet_address(api_key: Optional[str], settings: Optional[Dict[str, str]] = None) -> FleetAddress:
    fleet = configured_fleet(api_key, settings)
    if fleet is not None:
        return fleet
    global _local_address
    local = local_cluster()
    address = _local_address
    if address is None or address.coordinator != local.addr:
        address = FleetAddress(local.addr, local.ca_pem.encode(), local.api_key, "local cluster", embedded=True)
        _local_address = address
    return address


def connection(fleet: FleetAddress, fresh: bool = False) -> "_native.Connection":
    """A connection to the fleet, shared by the calls of this process."""
    key = (fleet.coordinator, fleet.api_key)
    with _lock:
        conn = _connections.get(key)
        if conn is not None and not fresh and not conn.closed():
            return conn
        if fleet.embedded and _local is not None and _local.addr == fleet.coordinator:
            # The cluster runs in this process: a link within it, not QUIC
            # through loopback.
            conn = _local.connect(fleet.api_key)
        else:
            conn = _native.connect(fleet.coordinator, fleet.ca_pem, fleet.api_key)
        if conn.coordinator_version != _native.VERSION:
            warnings.warn(
                f"the coordinator at {fleet.coordinator} runs fleetmap {conn.coordinator_version} and this "
                f"client {_native.VERSION}; install the same version on clients, coordinator and nodes",
                VersionMismatch,
                stacklevel=4,
            )
        _connections[key] = conn
        return conn


def _close_connections() -> None:
    with _lock:
        for conn in _connections.values():
            conn.close()
        _connections.clear()


# A closed connection tells the coordinator at once that this client is
# gone, so its jobs are cancelled now rather than after the idle timeout.
atexit.register(_close_connections)


def forget(fleet: FleetAddress) -> None:
    with _lock:
        _connections.pop((fleet.coordinator, fleet.api_key), None)
