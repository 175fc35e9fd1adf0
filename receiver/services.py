"""What a serving receiver process holds, built and torn down by the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NoReturn

from receiver.auth import TokenStore
from receiver.config import ReceiverConfig
from receiver.gate import VersionGate
from receiver.ingest import Ingestor
from receiver.limits import UploadAdmission
from receiver.storage import Storage, open_storage
from receiver.telemetry import Telemetry

log = logging.getLogger(__name__)

EXIT_DURABILITY = 70  # EX_SOFTWARE: restart and let recovery look at the disk


def exit_for_recovery(message: str) -> NoReturn:
    """Durability is unknown after a failed write: stop, so that a restart recovers."""
    log.critical("durability failure, exiting so that a restart runs recovery: %s", message)
    logging.shutdown()
    os._exit(EXIT_DURABILITY)


@dataclass
class Services:
    """Read by the endpoints from `request.state.services`."""

    config: ReceiverConfig
    gate: VersionGate
    storage: Storage
    admission: UploadAdmission
    telemetry: Telemetry
    tokens: TokenStore | None
    ingestor: Ingestor


@asynccontextmanager
async def serving(config: ReceiverConfig) -> AsyncIterator[Services]:
    """Open storage, tokens and the gate; on the way out, let uploads clean up first."""
    storage = open_storage(config)
    await asyncio.to_thread(storage.blobs.prepare)
    await asyncio.to_thread(storage.catalogue.open)
    tokens = _tokens(config)
    gate = VersionGate(config.version_gate)
    await gate.start()
    server = config.server
    admission = UploadAdmission(
        server.max_concurrent_uploads,
        server.max_concurrent_uploads_per_host,
        config.storage.min_free_bytes,
    )
    ingestor = Ingestor(config, gate, storage, admission, exit_for_recovery)
    telemetry = Telemetry(marks=storage.catalogue)  # shared by the workers, kept over restarts
    try:
        yield Services(config, gate, storage, admission, telemetry, tokens, ingestor)
    finally:
        # uvicorn cancels uploads that outlast the grace period and then runs this at
        # once; let them remove their temp files and release their claims first.
        if not await admission.wait_idle(timeout=10):
            log.warning("%d upload(s) still cleaning up at shutdown", admission.active)
        await gate.close()
        await asyncio.to_thread(telemetry.close)
        storage.close()


def _tokens(config: ReceiverConfig) -> TokenStore | None:
    if config.auth.mode != "tokens":
        return None
    assert config.auth.tokens_file is not None  # config checks this
    tokens = TokenStore(config.auth.tokens_file)
    tokens.load()
    return tokens
