"""Corrects what pybind11-stubgen cannot see in apportion._core's generated stubs, line by line.

The module gives ``Future`` its Python side at import (``apportion.futures``): ``__await__``
is an instance method there and the class reports itself as a ``concurrent.futures.Future``
(``isinstance`` holds), so type checkers must see it as one; a few native signatures take or
return types the binding spells as ``object``. Each entry replaces one whole generated line;
an entry whose line is not found fails, so an override never outlives the code it corrects.

Usage: ``python tools/stub_overrides.py STUBS_DIR`` (the generated ``apportion`` directory).
"""

from __future__ import annotations

import sys
from pathlib import Path

# file, generated lines, corrected lines (None: removed)
OVERRIDES: list[tuple[str, str, str | None]] = [
    ("_core/__init__.pyi", "import collections.abc", "import collections.abc\nimport concurrent.futures"),
    ("_core/__init__.pyi", "class Future:", "class Future(concurrent.futures.Future[typing.Any]):"),
    ("_core/__init__.pyi",
     "    @staticmethod\n    def __await__(f: typing.Any) -> typing.Generator[typing.Any, None, typing.Any]:",
     "    def __await__(self) -> typing.Generator[typing.Any, None, typing.Any]:"),
    ("_core/__init__.pyi", "    def add_done_callback(self, fn: typing.Any) -> None:",
     "    def add_done_callback(self, fn: collections.abc.Callable[[Future], object]) -> None:  "
     "# type: ignore[override]"),
    ("_core/__init__.pyi",
     "    def submit_many(self, model: str, inputs: collections.abc.Iterable, *, timeout_ms: typing.Any = None, "
     "priority: typing.Any = None) -> list:",
     "    def submit_many(self, model: str, inputs: collections.abc.Iterable[typing.Any], *, "
     "timeout_ms: float | None = None, priority: int | None = None) -> list[Future]:"),
    # The binding takes any object there to refuse a wrong one with QuotaError naming the
    # field; what it accepts is a number of milliseconds and a priority level.
    ("_core/__init__.pyi",
     "    def submit(self, model: str, inputs: typing.Any, *, timeout_ms: typing.Any = None, "
     "priority: typing.Any = None) -> Future:",
     "    def submit(self, model: str, inputs: typing.Any, *, timeout_ms: float | None = None, "
     "priority: int | None = None) -> Future:"),
    ("_core/__init__.pyi", "    def exception(self, timeout: float | None = None) -> typing.Any:",
     "    def exception(self, timeout: float | None = None) -> BaseException | None:"),
    # The standard library's wait state, set at import as read-only properties: typed as
    # concurrent.futures.Future declares them (as_completed's protocol takes attributes).
    ("_core/__init__.pyi", "    @property\n    def _condition(self):\n        ...", None),
    ("_core/__init__.pyi", "    @property\n    def _state(self) -> str:\n        ...", None),
    ("_core/__init__.pyi", "    @property\n    def _waiters(self):\n        ...", None),
]


def apply(root: Path) -> None:
    for name, old, new in OVERRIDES:
        path = root / name
        text = path.read_text()
        lines = text.split("\n")
        old_lines = old.split("\n")
        at = [i for i in range(len(lines)) if lines[i:i + len(old_lines)] == old_lines]
        if len(at) != 1:
            sys.exit(f"stub_overrides: {name}: expected the line(s) {old!r} once, found {len(at)}; "
                     "update tools/stub_overrides.py")
        lines[at[0]:at[0] + len(old_lines)] = [] if new is None else new.split("\n")
        path.write_text("\n".join(lines))


if __name__ == "__main__":
    apply(Path(sys.argv[1]))
