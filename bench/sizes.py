"""Every size the suite uses, in one place, so `--quick` (and each flag) can shrink it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sizes:
    runs: int = 3
    upload_mib: int = 1024
    concurrent_uploads: int = 8
    concurrent_mib: int = 128
    workers: int = 2
    rss_mib: tuple[int, ...] = (64, 2048)
    small_uploads: int = 2000
    small_kib: int = 64
    small_clients: int = 16
    gate_refresh_seconds: float = 1.0
    index_rows: int = 1_000_000
    view_rows: int = 10_000_000
    view_uploads: int = 1000  # uploads before the view-rss figure is read
    pack_mib: int = 1024
    verify_mib: int = 4096
    verify_file_mib: int = 256
    # The s3 backend (SeaweedFS) and the fleet (two receivers behind nginx): part size,
    # each of the 8 concurrent uploads, each of the 8 uploads whose RSS is measured.
    s3_part_mib: int = 16
    s3_concurrent_mib: int = 256
    s3_rss_mib: int = 1024
    fleet_mib: int = 256
    # Figures to run (all when empty).
    only: frozenset[str] = field(default_factory=frozenset)


QUICK = Sizes(
    upload_mib=4,
    concurrent_mib=1,
    rss_mib=(2, 8),
    small_uploads=64,
    gate_refresh_seconds=0.25,
    index_rows=2000,
    view_rows=5000,
    view_uploads=40,
    pack_mib=4,
    verify_mib=8,
    verify_file_mib=2,
    s3_part_mib=5,
    s3_concurrent_mib=6,
    s3_rss_mib=6,
    fleet_mib=6,
)
