"""Real receivers for the bench: started from a config on loopback, measured from /proc.

A PATH shim for git logs every git the receiver (and its workers) spawns, so the gate's
cost under load is a count, not a guess.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.baselines import Unavailable
from bench.client import put_file
from bench.sizes import Sizes
from bench.workload import Pool
from tests.support import PROJECT_ROOT, ReceiverProcess, make_repo, receiver_config, write_toml

_PACKAGES = ("receiver", "episode_common", "shipper", "tools")


def compile_bytecode() -> None:
    """Compile the project's modules to .pyc, as installing a package does.

    With PYTHONDONTWRITEBYTECODE set (some CI images and shells set it), every process
    the bench starts would compile these sources again, about 0.1 s of each start that a
    deployed receiver never pays. Existing .pyc files are read even with it set.
    """
    for package in _PACKAGES:
        compileall.compile_dir(PROJECT_ROOT / package, quiet=1)


@dataclass
class Bench:
    """What every figure shares: the scratch directory, a gate repository and its commit."""

    root: Path
    sizes: Sizes
    commit: str
    repo: Path
    pool: Pool

    @classmethod
    def create(cls, root: Path, sizes: Sizes) -> Bench:
        repo = root / "repo"
        return cls(root, sizes, make_repo(repo, commits=1)[0], repo, Pool())

    def fresh_dir(self, name: str) -> Path:
        path = self.root / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


def in_threads(work: Callable[[int], None], count: int) -> None:
    """Run work(0) .. work(count - 1) in threads at once; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(number: int) -> None:
        try:
            work(number)
        except BaseException as error:  # noqa: BLE001 - re-raised after the join
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def git_shim(directory: Path) -> Path:
    """A `git` that appends one line per call to directory/git.log, then runs the real git."""
    real = shutil.which("git")
    if real is None:
        raise Unavailable("git not found on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "git.log"
    log.touch()
    shim = directory / "git"
    shim.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real}" "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return log


@contextlib.contextmanager
def receiver(
    bench: Bench,
    name: str,
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    wait: bool = True,
    **sections: dict[str, Any],
) -> Iterator[ReceiverProcess]:
    """A receiver with data under root/name; default config but for the bench's own choices."""
    home = bench.root / name
    home.mkdir(parents=True, exist_ok=True)
    sections.setdefault("server", {})["workers"] = workers
    config = receiver_config(home, bench.repo, None, **sections)
    process = ReceiverProcess(write_toml(home / "receiver.toml", config), env=env)
    process.start(wait=wait)
    try:
        yield process
    finally:
        if process.proc is not None and process.proc.poll() is None:
            try:
                process.stop(timeout=30)
            except Exception:  # noqa: BLE001 - a stuck receiver must not hide the figures
                process.kill()


def upload(process: ReceiverProcess, host: str, episode: str, path: Path, commit: str) -> None:
    status, body = put_file(
        process.port, f"/episodes/{host}/{episode}", path, {"X-Code-Commit": commit}
    )
    if status != 201:
        raise RuntimeError(f"upload {host}/{episode} answered {status}: {body[:300]!r}")


def clear_stored(process: ReceiverProcess) -> None:
    """Remove stored tarballs (the index keeps its rows: ids are never reused)."""
    episodes = process.config_path.parent / "data" / "episodes"
    for stored in episodes.glob("*/*"):
        stored.unlink()


def processes(pid: int) -> list[int]:
    """pid and its children (uvicorn's worker processes)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU time the processes have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise Unavailable(f"no VmHWM for pid {pid}")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def environment_with_shim(shim_dir: Path) -> dict[str, str]:
    return {"PATH": f"{shim_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
