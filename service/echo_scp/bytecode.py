"""Cached bytecode without docstrings, every ``assert`` kept: how the image's venv is compiled.

The daemon runs for months and never shows a docstring, yet the docstrings of
its dependencies (pynetdicom, pydicom, pydantic) are about 1.8 MiB of its
resident memory at rest. ``python -OO`` would drop them, and every ``assert``
with them: pynetdicom's PDU decoders assert that an item's bytes match its
length, so ``-OO`` would change what a malformed PDU does. This writes each
module's cached bytecode (``__pycache__/NAME.cpython-311.pyc``, the file a
plain ``python`` imports) compiled from its source with the docstrings taken
out and nothing else changed: asserts, line numbers, column positions and
``from __future__`` flags stay. ``__doc__`` is ``None``, as under ``-OO``.

Each file is bound to its source as ``py_compile`` binds it (size and
modification time, or a checked hash when SOURCE_DATE_EPOCH is set, for
reproducible builds), so an edited source is compiled again, docstrings and all.

Usage: ``python -m echo_scp.bytecode DIR [DIR ...]`` (``deploy/runtime-venv.sh``
runs it on the venv, for the image and for ``make bench``).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import marshal
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# PEP 552's flags word: 0 is timestamp-based; 0b11 is a hash checked against the source.
_TIMESTAMP = 0
_CHECKED_HASH = 0b11


@dataclass
class Tally:
    """What a run did, for the build log."""

    files: int = 0
    docstrings: int = 0
    docstring_chars: int = 0
    skipped: int = 0


_Documented = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def strip_docstrings(tree: ast.Module) -> tuple[int, int]:
    """Take the docstring out of the module and of every class and function in it; (count, characters).

    A body that was only a docstring becomes ``pass``, at the docstring's
    position, so the code object keeps its line numbers.
    """
    count = chars = 0
    for node in ast.walk(tree):
        if not isinstance(node, _Documented) or not node.body:
            continue
        first = node.body[0]
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            count += 1
            chars += len(first.value.value)
            node.body[0:1] = [] if len(node.body) > 1 else [ast.copy_location(ast.Pass(), first)]
    return count, chars


def _header(source: bytes, path: Path, hashed: bool) -> bytes:
    if hashed:
        return (
            importlib.util.MAGIC_NUMBER
            + _CHECKED_HASH.to_bytes(4, "little")
            + importlib.util.source_hash(source)
        )
    stat = path.stat()
    # The two words importlib compares with the source: its mtime and size, each modulo 2**32.
    mtime, size = int(stat.st_mtime) & 0xFFFFFFFF, stat.st_size & 0xFFFFFFFF
    return (
        importlib.util.MAGIC_NUMBER
        + _TIMESTAMP.to_bytes(4, "little")
        + mtime.to_bytes(4, "little")
        + size.to_bytes(4, "little")
    )


def compile_file(path: Path, *, hashed: bool = False) -> tuple[int, int]:
    """Write ``path``'s cached bytecode without docstrings; (docstrings removed, their characters).

    Raises SyntaxError (and leaves any existing cache file alone) when the
    source does not compile.
    """
    source = path.read_bytes()
    tree = ast.parse(source, filename=str(path))
    removed = strip_docstrings(tree)
    # optimize=0: asserts stay under any flags; dont_inherit: the module's own futures only.
    code = compile(tree, str(path), "exec", dont_inherit=True, optimize=0)
    target = Path(importlib.util.cache_from_source(str(path), optimization=""))
    target.parent.mkdir(exist_ok=True)
    data = _header(source, path, hashed) + marshal.dumps(code)
    # Atomic, as importlib writes it: an interpreter starting meanwhile reads the old file or the new one.
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
    return removed


def _sources(folders: Sequence[Path]) -> Iterator[Path]:
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            yield from (Path(root, name) for name in sorted(files) if name.endswith(".py"))


def compile_tree(folders: Sequence[Path], *, hashed: bool = False) -> Tally:
    """Every ``.py`` file under ``folders``, compiled without docstrings."""
    tally = Tally()
    for path in _sources(folders):
        try:
            count, chars = compile_file(path, hashed=hashed)
        except (SyntaxError, ValueError):
            # pip and compileall skip what does not compile (templates, other Pythons' files); so does this.
            tally.skipped += 1
            continue
        tally.files += 1
        tally.docstrings += count
        tally.docstring_chars += chars
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    """Compile the folders given; prints one summary line, exits 2 on a folder that does not exist."""
    parser = argparse.ArgumentParser(
        prog="python -m echo_scp.bytecode", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "folders", nargs="+", type=Path, help="folders whose .py files are compiled (a venv's lib)"
    )
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    tally = compile_tree(args.folders, hashed=bool(os.environ.get("SOURCE_DATE_EPOCH")))
    print(
        f"echo-scp bytecode: {tally.files} files compiled without {tally.docstrings} docstrings"
        f" ({tally.docstring_chars / 2**20:.1f} M characters); {tally.skipped} skipped (do not compile)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
