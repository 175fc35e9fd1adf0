"""Run the receiver under uvicorn: one process, or several workers sharing one data_dir."""

from __future__ import annotations

import logging
import os

import msgspec
import uvicorn

from receiver.config import ReceiverConfig

log = logging.getLogger(__name__)

CONFIG_ENV = "EPISODE_RECEIVER_CONFIG_JSON"


def config_from_environment() -> ReceiverConfig:
    """Workers started by uvicorn's supervisor get the parent's resolved config this way."""
    return msgspec.json.decode(os.environ[CONFIG_ENV], type=ReceiverConfig)


def run_server(config: ReceiverConfig, log_level: str = "info") -> int:
    server = config.server
    url = f"http://{server.host}:{server.port}"
    log.info(
        "serving on %s data_dir=%s workers=%d gate=%s", url, config.storage.data_dir,
        server.workers, "on" if config.version_gate.enabled else "OFF",
    )
    os.environ[CONFIG_ENV] = msgspec.json.encode(config).decode()
    uvicorn.run(
        "receiver.app:app_from_environment",
        factory=True,
        host=server.host,
        port=server.port,
        workers=server.workers,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=30,
    )
    return 0
