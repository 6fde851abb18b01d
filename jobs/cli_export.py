"""``mmfp export``: one version of the store as files other trainers read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from jobs.errors import open_store, user_errors
from jobs.options import DEFAULT_STORE, StoreOpt, VersionOpt
from jobs.report import console


@user_errors
def export_command(
    dest: Annotated[Path, typer.Argument(help="A new folder to write (refused if it exists).")],
    to: Annotated[
        Literal["parquet", "webdataset", "hf", "lance"],
        typer.Option(
            help="parquet: part files; webdataset: tar shards (.jpg .wav .txt .npy); "
            "hf: a Hugging Face datasets folder (load_from_disk; needs mmfp[hf]); "
            "lance: a Lance dataset (needs mmfp[lance])."
        ),
    ],
    version: VersionOpt = None,
    split: Annotated[
        list[str] | None, typer.Option(help="Only these splits (repeatable); default: all.")
    ] = None,
    feature_set: Annotated[
        str | None, typer.Option(help="Add this feature set's embeddings to each sample.")
    ] = None,
    feature_version: Annotated[
        str | None, typer.Option(help="The feature set's version; default: latest.")
    ] = None,
    shard_rows: Annotated[int, typer.Option(min=1, help="Samples per file or shard.")] = 1000,
    exclude_duplicates: Annotated[
        bool, typer.Option(help="Leave out the near duplicates `mmfp dedup` marked.")
    ] = False,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Export ``samples`` at a version (and a feature set's embeddings) to DEST; the same
    version always gives the same bytes, and DEST/_mmfp-export.json records its source."""
    from features.export import export

    manifest = export(
        open_store(store), dest, to=to, version=version, splits=split,
        feature_set=feature_set, feature_version=feature_version, shard_rows=shard_rows,
        exclude_duplicates=exclude_duplicates,
    )  # fmt: skip
    versions = ", ".join(f"{t} v{v}" for t, v in manifest["versions"].items())
    console.print(f"exported {manifest['rows']:,} samples ({versions}) to {dest} as {to}: "
                  f"{len(manifest['files'])} file(s)")  # fmt: skip
