"""The bench suite runs end to end with tiny sizes, so its code does not rot.

Asserts that every figure is measured and printed with its same-run ratio (or says why
it is unavailable, for the figures that need a tool the machine may lack); never a speed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import FIGURES
from tests.support import PROJECT_ROOT

# Figures whose tool (nginx, the zstd CLI, openssl, wrk) may be missing on a test machine.
MAY_BE_UNAVAILABLE = {"nginx", "pack", "verify", "small-wrk"}
RATIO = r"ratio \S+ / \S+ / \S+ \|"


# Every figure in --quick sizes starts real servers (receivers, SeaweedFS, PostgreSQL,
# nginx): about a minute on a quiet 2-core machine, so allow it room.
@pytest.mark.timeout(360)
def test_quick_bench_prints_every_figure_with_a_ratio(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--dir", str(tmp_path)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = {
        line.split()[1]: line
        for line in result.stdout.splitlines()
        if line.startswith("figure ") and len(line.split()) > 2
    }
    assert set(summary) == set(FIGURES), result.stdout[-3000:]
    for key, line in summary.items():
        if key in MAY_BE_UNAVAILABLE and " unavailable: " in line:
            continue
        assert re.search(RATIO, line), line
        assert re.search(r": (met|NOT MET)$", line), line
    assert list(tmp_path.iterdir()) == [], "the bench leaves its scratch directory behind"


def test_quick_sizes_are_small() -> None:
    from bench.sizes import QUICK

    assert QUICK.upload_mib <= 8 and QUICK.pack_mib <= 8 and QUICK.verify_mib <= 16
    assert QUICK.index_rows <= 10_000 and QUICK.small_uploads <= 100
    assert max(QUICK.rss_mib) <= 16 and QUICK.runs >= 3
