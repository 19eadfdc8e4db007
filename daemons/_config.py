"""Daemon configuration: a pydantic model filled from a TOML file and the environment.

Precedence: defaults < TOML file < environment (``<PREFIX><KEY>``, e.g.
``P2PIMAGE_TRACKER_INTERVAL_S=10``). Environment values that are JSON arrays or objects
(``[...]``, ``{...}``) are parsed as JSON; every other value is a string that pydantic
converts. Any problem raises :class:`ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel, SecretStr, ValidationError

__all__ = [
    "ConfigError",
    "config_options",
    "dump_settings",
    "load_settings",
    "settings_for_command",
]

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(Exception):
    """Configuration that cannot be used; ``str()`` is one line naming the key."""


def load_settings(
    model: type[M],
    *,
    path: Path | None = None,
    env_prefix: str,
    environ: Mapping[str, str] | None = None,
) -> M:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    environ = os.environ if environ is None else environ
    fields = set(model.model_fields)
    for name, value in environ.items():
        if not name.startswith(env_prefix):
            continue
        key = name[len(env_prefix) :].lower()
        if key not in fields:
            raise ConfigError(f"environment {name}: unknown setting {key!r}")
        if value.lstrip().startswith(("[", "{")):
            try:
                data[key] = json.loads(value)
            except ValueError:
                raise ConfigError(f"environment {name}: not valid JSON") from None
        else:
            data[key] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise ConfigError(f"config key {key!r}: {err['msg']} (got {err.get('input')!r})") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # TOML has no null: an unset nested value is left out
        inner = ", ".join(
            f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None
        )
        return "{ " + inner + " }" if inner else "{}"
    return json.dumps(str(value))


def dump_settings(settings: BaseModel, *, secrets: bool = False) -> str:
    """The effective settings as TOML (unset optional values as comments).

    Secrets print as ``**********`` unless ``secrets`` (writing a config file for a
    child process).
    """
    lines = []
    data = settings.model_dump(mode="json")
    if secrets:
        for key in data:
            value = getattr(settings, key)
            if isinstance(value, SecretStr):
                data[key] = value.get_secret_value()
    for key, value in data.items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def config_options(daemon: str) -> Callable[[F], F]:
    """The options every daemon command takes: ``--config PATH`` (passed on as
    ``config_path``) and ``--print-config``; see :func:`settings_for_command`."""

    def wrap(command: F) -> F:
        command = click.option(
            "--print-config", is_flag=True, help="print the effective config and exit"
        )(command)
        return click.option(
            "--config",
            "config_path",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help=f"TOML config file (env P2PIMAGE_{daemon.upper()}_<KEY> overrides it)",
        )(command)

    return wrap


def settings_for_command(
    model: type[M],
    *,
    daemon: str,
    config_path: Path | None,
    print_config: bool,
    check: Callable[[M], object] | None = None,
) -> M | None:
    """What every daemon command does first: load its settings (``--config`` file, then
    ``P2PIMAGE_<DAEMON>_*``), run its cross-field ``check``, exit 2 with a one-line error
    naming the key, or print the effective settings and return None for
    ``--print-config``."""
    try:
        settings = load_settings(model, path=config_path, env_prefix=f"P2PIMAGE_{daemon.upper()}_")
        if check is not None:
            check(settings)
    except ConfigError as exc:
        click.echo(f"p2pimage {daemon}: {exc}", err=True)
        sys.exit(2)
    if print_config:
        click.echo(dump_settings(settings), nl=False)
        return None
    return settings
