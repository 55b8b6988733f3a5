"""The ``apportion`` command line: ``apportion <command> [options]`` (also ``python -m apportion``).

Commands:

- ``topology [--root PATH] [--json]``: the machine as apportion sees it.
- ``plan CONFIG [--root PATH] [--json]``: which CPUs, threads and memory each model of a
  config file would get.

A config file is TOML with one ``[models.<name>]`` table per model holding quota fields::

    [models.ranker]
    cores = 2                 # physical cores, or a CPU list such as "0-3,8"
    isolation = "exclusive"   # or "shared"
    threads = 2

Exit status: 0 on success; 1 when valid input does not fit the machine (a PlacementError) or
the machine cannot be read; 2 for usage and config errors (the message names the file, the key
and what is allowed).

Each command is a :class:`Command` in ``COMMANDS``: a name, a one-line help, a function that
adds its arguments and one that runs it, so further commands (run, bench, tune, demo) are one
more entry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TextIO

from .errors import PlacementError, QuotaError
from .placement import Plan, Quota
from .topology import Topology, topology

__all__ = ["COMMANDS", "Command", "ConfigError", "DoesNotFit", "load_quotas", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Quota fields a config may set; the model's name is its table's name.
QUOTA_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Quota) if f.init and f.name != "name")


class ConfigError(ValueError):
    """A config file that cannot be used. ``str()`` names the file, the key and what is allowed."""

    def __init__(self, path: str, key: str | None, message: str) -> None:
        self.path = path
        self.key = key
        super().__init__(f"{path}: {key}: {message}" if key else f"{path}: {message}")


class DoesNotFit(ConfigError):
    """A valid config whose models do not fit the machine together (a PlacementError)."""


def _without_prefix(err: QuotaError | PlacementError) -> str:
    # Quota errors start with "model 'x', field 'y': "; the config key already says that.
    text = str(err)
    model, field = getattr(err, "model", None), getattr(err, "field", None)
    prefix = f"model {model!r}, field {field!r}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def load_quotas(path: str | Path) -> list[Quota]:
    """Reads the ``[models.<name>]`` tables of a TOML file into validated Quotas.

    Raises ConfigError for an unreadable file, invalid TOML, an unknown key or an invalid
    value; the message names the file and the key (``models.<name>.<field>``).
    """
    where = str(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as e:
        raise ConfigError(where, None, f"cannot read it: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(where, None, f"not valid TOML: {e}") from None

    unknown = sorted(set(doc) - {"models"})
    if unknown:
        raise ConfigError(where, unknown[0], "unknown top-level key; allowed: [models.<name>] tables")
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(where, "models", "no models; add a table per model, e.g. [models.ranker] "
                          "with cores = 1")
    quotas = []
    for name, table in models.items():
        key = f"models.{name}"
        if not isinstance(table, dict):
            raise ConfigError(where, key, f"must be a table of quota fields ({', '.join(QUOTA_KEYS)}), "
                              f"got {type(table).__name__}")
        for field in table:
            if field not in QUOTA_KEYS:
                raise ConfigError(where, f"{key}.{field}", f"unknown key; allowed: {', '.join(QUOTA_KEYS)}")
        try:
            quotas.append(Quota(name=name, **table))
        except QuotaError as e:
            field = getattr(e, "field", None)
            raise ConfigError(where, f"{key}.{field}" if field else key, _without_prefix(e)) from None
    return quotas


# -- commands --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, TextIO], int]


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="/", metavar="PATH",
                   help="read the machine from the sysfs tree under PATH (default: this machine)")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _print(out: TextIO, obj: Topology | Plan, as_json: bool) -> None:
    if as_json:
        json.dump(obj.to_dict(), out, indent=2)
        out.write("\n")
    else:
        print(obj, file=out)


def _topology_args(p: argparse.ArgumentParser) -> None:
    _add_root(p)
    _add_json(p)


def _topology_run(args: argparse.Namespace, out: TextIO) -> int:
    _print(out, topology(args.root), args.json)
    return EXIT_OK


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="TOML file with one [models.<name>] table per model "
                   f"(keys: {', '.join(QUOTA_KEYS)})")
    _add_root(p)
    _add_json(p)


def _never_called(ctx: Any) -> Any:  # pragma: no cover - planning never builds instances
    raise AssertionError("apportion plan does not start models")


def _plan_run(args: argparse.Namespace, out: TextIO) -> int:
    from .runtime import Runtime

    quotas = load_quotas(args.config)
    # Plan through a runtime that is never started, so the printed plan is exactly what
    # rt.plan() gives for the same models (the runtime lets a shared model without a core
    # count float over the whole pool, which a bare ap.plan() would not).
    rt = Runtime(topology_root=args.root)
    try:
        for q in quotas:
            quota = {k: getattr(q, k) for k in QUOTA_KEYS}
            rt.add_model(q.name, factory=_never_called, **quota)
        result = rt.plan()
    except (QuotaError, PlacementError) as e:
        # QuotaError: valid on its own but impossible on this machine (more cores than exist,
        # no such node). PlacementError: each fits, not all together.
        field = getattr(e, "field", None)
        model = getattr(e, "model", None)
        key = f"models.{model}.{field}" if model and field else None
        if isinstance(e, PlacementError):
            raise DoesNotFit(args.config, key, f"the models do not fit this machine: {_without_prefix(e)}") from None
        raise ConfigError(args.config, key, _without_prefix(e)) from None
    finally:
        rt.close(drain=False)
    _print(out, result, args.json)
    return EXIT_OK


COMMANDS: tuple[Command, ...] = (
    Command("topology", "show the CPUs, cores, NUMA nodes and L3 domains this process may use",
            _topology_args, _topology_run),
    Command("plan", "show which CPUs, threads and memory each model of a config file gets",
            _plan_args, _plan_run),
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="apportion",
        description="Divide one machine's cores, threads and memory between ML models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help[0].upper() + cmd.help[1:] + ".")
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Runs one command; returns the exit status (argparse's own usage errors exit with 2).

    ``out``/``err`` default to sys.stdout/sys.stderr (tests pass buffers)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    args = build_parser().parse_args(argv)
    prog = f"apportion {args.command}"
    try:
        return int(args._run(args, out))
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=err)
        return EXIT_FAILURE if isinstance(e, DoesNotFit) else EXIT_USAGE
    except RuntimeError as e:  # an unreadable or malformed topology tree; the message names it
        print(f"{prog}: error: {str(e).removeprefix('apportion topology: ')}", file=err)
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`apportion plan x.toml | head`): not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover - `python -m apportion` goes through __main__.py
    sys.exit(main())
