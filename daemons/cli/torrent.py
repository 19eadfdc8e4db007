"""``p2pimage torrent``: create and inspect p2pimage torrents.

Exit codes: 0 success, 1 the torrent or file is bad (one line on stderr), 2 bad usage or a
missing file (click's convention).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from p2pimage.errors import P2PImageError
from p2pimage.metainfo.torrent import Metainfo, create_metainfo_from_file


@click.group()
def torrent() -> None:
    """Create and inspect single-file torrents for blobs."""


@torrent.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the .torrent.",
)
@click.option("--name", help="Name inside the torrent (default: the file's name).")
@click.option(
    "--piece-length",
    type=int,
    help="Piece length in bytes, a power of two from 16 KiB to 16 MiB (default: automatic).",
)
@click.option("--announce", help="Tracker announce URL.")
def create(
    file: Path, out: Path, name: str | None, piece_length: int | None, announce: str | None
) -> None:
    """Hash FILE and write its torrent; prints the info-hash in hex."""
    try:
        meta = create_metainfo_from_file(file, name, piece_length=piece_length, announce=announce)
    except P2PImageError as exc:
        raise click.ClickException(str(exc)) from None
        return
    except OSError as exc:
        raise click.ClickException(f"cannot read {file}: {exc.strerror}") from None
        return
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_bytes(meta.to_bytes())
        os.replace(tmp, out)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror}") from None
    click.echo(meta.info_hash.hex())


@torrent.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(file: Path, as_json: bool) -> None:
    """Print a torrent's info-hash, name, sizes and digest."""
    try:
        meta = Metainfo.from_bytes(file.read_bytes())
    except P2PImageError as exc:
        raise click.ClickException(f"{file}: {exc}") from None
        return
    except OSError as exc:
        raise click.ClickException(f"cannot read {file}: {exc.strerror}") from None
        return
    fields: dict[str, str | int | None] = {
        "info_hash": meta.info_hash.hex(),
        "name": meta.name,
        "length": meta.length,
        "piece_length": meta.piece_length,
        "num_pieces": meta.num_pieces,
        "sha256": meta.sha256,
        "announce": meta.announce,
    }
    if as_json:
        click.echo(json.dumps(fields))
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in fields.items():
        table.add_row(key, "" if value is None else str(value))
    Console(width=200).print(table)
