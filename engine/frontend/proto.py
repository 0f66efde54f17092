"""The gRPC API's message and service modules, generated at import time from
``protos/engine.proto`` (nothing generated is committed).

``pb2`` holds the messages (``pb2.GenerateRequest``, ...), ``pb2_grpc`` the client stub
(``pb2_grpc.EngineStub``) and servicer helpers. ``SERVICE`` is the full service name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import grpc

PROTO_FILE = "engine.proto"
SERVICE = "engine.v1.Engine"


def proto_dir() -> Path:
    """The folder holding ``engine.proto``: ``protos/`` next to the ``engine`` package in a
    checkout (editable install), else the installed ``protos`` package's folder."""
    here = Path(__file__).resolve().parents[2] / "protos"
    if (here / PROTO_FILE).is_file():
        return here
    spec = importlib.util.find_spec("protos")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / PROTO_FILE).is_file():
            return Path(loc)
    raise FileNotFoundError(f"cannot find {PROTO_FILE}: looked in {here} and the 'protos' package")


def _load() -> tuple[Any, Any]:
    folder = str(proto_dir())
    # grpc_tools resolves the proto, and names its modules, through sys.path.
    if folder not in sys.path:
        sys.path.append(folder)
    return grpc.protos_and_services(PROTO_FILE)  # type: ignore[no-any-return]


pb2, pb2_grpc = _load()
