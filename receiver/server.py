"""Run the receiver under uvicorn: one process, or several workers sharing one data_dir.

SIGTERM/SIGINT mean a graceful stop: uvicorn drains in-flight requests, the app's
lifespan shuts down, and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import TYPE_CHECKING

import msgspec
import uvicorn
from uvicorn.supervisors import Multiprocess

from episode_common.config_loading import decode_hook, encode_hook
from receiver.config import ReceiverConfig
from receiver.http_protocol import protocol_class
from receiver.recovery import recover, take_instance_lock
from receiver.supervision import follow_supervisor, mark_supervisor

if TYPE_CHECKING:
    from starlette.applications import Starlette

log = logging.getLogger(__name__)

CONFIG_ENV = "EPISODE_RECEIVER_CONFIG_JSON"


def config_from_environment() -> ReceiverConfig:
    """Workers started by uvicorn's supervisor get the parent's resolved config this way."""
    return msgspec.json.decode(os.environ[CONFIG_ENV], type=ReceiverConfig, dec_hook=decode_hook)


def app_factory() -> Starlette:
    """uvicorn's app factory, run in every worker: first tie the worker to its supervisor."""
    # Imported here: the CLI's other commands and the supervisor never build the app.
    from receiver.app import create_app

    config = config_from_environment()
    follow_supervisor(config.server.shutdown_grace_seconds)
    return create_app(config)


def _note_signal(signum: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down; with this
    # handler in place that is a no-op and a graceful stop exits 0.
    log.debug("received signal %d after shutdown", signum)


def run_server(config: ReceiverConfig, log_level: str = "info") -> int:
    """Recover, then serve until SIGTERM. Raises StartupError for a one-line failure."""
    instance_lock = take_instance_lock(config)
    try:
        recover(config)
        return _serve(config, log_level)
    finally:
        os.close(instance_lock)


def _serve(config: ReceiverConfig, log_level: str) -> int:
    server = config.server
    url = f"http://{server.host}:{server.port}"
    log.info(
        "serving on %s data_dir=%s workers=%d gate=%s",
        url,
        config.storage.data_dir,
        server.workers,
        "on" if config.version_gate.enabled else "OFF",
    )
    os.environ[CONFIG_ENV] = msgspec.json.encode(config, enc_hook=encode_hook).decode()
    mark_supervisor(server.workers)
    uvicorn_config = uvicorn.Config(
        "receiver.server:app_factory",
        factory=True,
        host=server.host,
        port=server.port,
        workers=server.workers,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        http=protocol_class(),
        timeout_graceful_shutdown=max(1, round(server.shutdown_grace_seconds)),
    )
    signal.signal(signal.SIGTERM, _note_signal)
    signal.signal(signal.SIGINT, _note_signal)
    if server.workers > 1:
        Multiprocess(uvicorn_config, sockets=[uvicorn_config.bind_socket()]).run()
        return 0
    uvicorn_server = uvicorn.Server(uvicorn_config)
    uvicorn_server.run()
    return 0 if uvicorn_server.started else 1
