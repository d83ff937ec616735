"""``python -m echo_scp.bytecode``: cached bytecode without docstrings, everything else as compiled.

Each check imports the compiled module in a fresh interpreter, so what is
observed is what a plain ``python`` loads from ``__pycache__``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from echo_scp import bytecode

MODULE = textwrap.dedent(
    '''\
    """The module's docstring."""
    from __future__ import annotations


    class Documented:
        """A class docstring."""

        def method(self) -> int:
            """A method docstring."""
            return 1


    def only_a_docstring():
        """Nothing but this."""


    def checks(value: Unknown) -> None:
        """Asserts stay."""
        assert value, "asserted"


    async def coroutine():
        """An async docstring."""
        return "not a docstring"


    def fails():
        raise RuntimeError("on line 28")
    '''
)

# Runs in the fresh interpreter: what the loaded module looks like.
INSPECT = textwrap.dedent(
    """\
    import asyncio, json, sys, traceback
    import sample
    try:
        sample.checks(0)
        asserted = False
    except AssertionError:
        asserted = True
    try:
        sample.fails()
    except RuntimeError as exc:
        line = traceback.extract_tb(exc.__traceback__)[-1].lineno
    print(json.dumps({
        "docs": [sample.__doc__, sample.Documented.__doc__, sample.Documented.method.__doc__,
                 sample.only_a_docstring.__doc__, sample.checks.__doc__, sample.coroutine.__doc__],
        "method": sample.Documented().method(),
        "empty": sample.only_a_docstring(),
        "coroutine": asyncio.run(sample.coroutine()),
        "asserted": asserted,
        "annotations": sample.checks.__annotations__,
        "line": line,
        "cached": sample.__cached__,
    }))
    """
)


def _load(folder: Path, *flags: str) -> dict[str, object]:
    # -B: the interpreter reads the cache but never writes one of its own.
    result = subprocess.run(
        [sys.executable, "-B", *flags, "-c", INSPECT],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(folder)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, object] = json.loads(result.stdout)
    return loaded


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    (tmp_path / "sample.py").write_text(MODULE)
    return tmp_path


def _header_flags(source: Path) -> int:
    cached = Path(importlib.util.cache_from_source(str(source), optimization=""))
    return int.from_bytes(cached.read_bytes()[4:8], "little")


def test_docstrings_go_and_asserts_lines_futures_and_bodies_stay(sample):
    """The loaded module has no docstrings, yet its asserts fire, its lines and futures hold and it runs."""
    before = _load(sample)
    assert before["docs"] == [
        "The module's docstring.",
        "A class docstring.",
        "A method docstring.",
        "Nothing but this.",
        "Asserts stay.",
        "An async docstring.",
    ]
    assert bytecode.main([str(sample)]) == 0

    after = _load(sample)
    assert after["docs"] == [None] * 6
    assert after["asserted"] is True
    assert after["line"] == before["line"] == 28
    # from __future__ import annotations still applies: the annotation is text, never evaluated.
    assert after["annotations"] == {"value": "Unknown", "return": "None"}
    assert (after["method"], after["empty"], after["coroutine"]) == (1, None, "not a docstring")
    assert _header_flags(sample / "sample.py") == 0, "timestamp-based, as py_compile writes by default"


def test_asserts_stay_even_when_compiled_under_minus_o(sample):
    """The compile ignores the compiling interpreter's own -O: the cache keeps its asserts."""
    subprocess.run(
        [sys.executable, "-O", "-m", "echo_scp.bytecode", str(sample)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    loaded = _load(sample)
    assert loaded["asserted"] is True and loaded["docs"] == [None] * 6


def test_an_edited_source_is_compiled_again_with_its_docstrings(sample):
    """The cache is bound to its source's size and time: after an edit, Python compiles the source itself."""
    bytecode.main([str(sample)])
    source = sample / "sample.py"
    source.write_text(MODULE + "\nEDITED = True\n")
    assert _load(sample)["docs"][0] == "The module's docstring."


def test_source_date_epoch_gives_checked_hash_caches(sample, monkeypatch):
    """With SOURCE_DATE_EPOCH (reproducible builds) the cache is a checked hash, as py_compile makes it."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    bytecode.main([str(sample)])
    assert _header_flags(sample / "sample.py") == 0b11
    assert _load(sample)["docs"] == [None] * 6
    # A checked hash follows the content, not the clock: a same-size edit is still noticed.
    source = sample / "sample.py"
    source.write_text(MODULE.replace("on line 28", "on line 2X"))
    assert _load(sample)["docs"][0] == "The module's docstring."


def test_a_file_that_does_not_compile_is_skipped_and_counted(tmp_path, capsys):
    """A source with a syntax error keeps whatever cache it had, and the summary line counts it."""
    (tmp_path / "broken.py").write_text("def broken(:\n")
    (tmp_path / "fine.py").write_text('"""Doc."""\nVALUE = 1\n')
    assert bytecode.main([str(tmp_path)]) == 0
    assert not Path(importlib.util.cache_from_source(str(tmp_path / "broken.py"))).exists()
    assert Path(importlib.util.cache_from_source(str(tmp_path / "fine.py"))).exists()
    summary = capsys.readouterr().err
    assert "1 files compiled without 1 docstrings" in summary and "1 skipped" in summary


def test_a_folder_that_does_not_exist_is_a_usage_error(tmp_path, capsys):
    """A mistyped venv path fails the build (exit 2) instead of compiling nothing."""
    with pytest.raises(SystemExit) as exited:
        bytecode.main([str(tmp_path / "missing")])
    assert exited.value.code == 2
    assert "not a folder" in capsys.readouterr().err
