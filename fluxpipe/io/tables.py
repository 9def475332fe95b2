"""Parquet tables (manifest, cache indexes): atomic writes with key/value metadata, strict reads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fluxpipe.errors import FluxpipeError
from fluxpipe.io.atomic import publish, temp_beside


def write_parquet_atomic(table: pd.DataFrame, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``table`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    merged = {**(arrow.schema.metadata or {}), **{k.encode(): v.encode() for k, v in (metadata or {}).items()}}
    arrow = arrow.replace_schema_metadata(merged)
    tmp = temp_beside(path)
    try:
        pq.write_table(arrow, tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_parquet(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """(table, fluxpipe metadata) of a table written by ``write_parquet_atomic``."""
    try:
        arrow = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise FluxpipeError(f"{path}: unreadable table ({e}); rerun the stage that writes it") from e
    meta = {k.decode(): v.decode() for k, v in (arrow.schema.metadata or {}).items() if k.startswith(b"fluxpipe.")}
    return arrow.to_pandas(), meta
