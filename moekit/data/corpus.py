"""The embedded default corpus: the Python standard library's own source files.

``moekit train`` with no data must work on any machine, offline, with no download. Every
Python installation carries its standard library as plain ``.py`` source: several megabytes of
real, varied, human-written text (code, docstrings, comments). We take the ``*.py`` files at the
top level of ``sysconfig.get_paths()["stdlib"]`` (not the ``test`` package, not site-packages,
not the machine-generated ``_sysconfigdata*`` build tables) in sorted file-name order, and
concatenate them up to a fixed byte budget (2 MiB by default), each file followed by the
end-of-text separator. Sorted names and a fixed budget make the corpus identical from run to
run on one Python installation. Another one gives similar but other text: patch releases edit
these files, and distributions patch and add some (Debian's 3.11.2 differs from a pyenv 3.11.7
in about 50 of them), so a run resumed or evaluated on another machine's default corpus is
refused; pass the same ``data.path`` file on both for the same data.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

DEFAULT_CORPUS_BYTES = 2 * 1024 * 1024
MIN_CORPUS_BYTES = 1024 * 1024


def stdlib_source_files(packages: bool = False) -> list[Path]:
    """Standard-library source files in a deterministic (sorted) order: the top-level modules, or
    with ``packages`` every ``*.py`` below the library root as well (sub-packages and the test suite,
    about 30 MB: enough text that a long benchmark run never repeats a window). site-packages and
    the machine-generated ``_sysconfigdata*`` tables are never included."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = root.rglob("*.py") if packages else root.glob("*.py")
    files = (p for p in found if not p.name.startswith("_sysconfigdata")
             and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(budget_bytes: int = DEFAULT_CORPUS_BYTES, packages: bool = False) -> list[str]:
    """Documents (one per file) whose UTF-8 size totals exactly ``budget_bytes`` (the last one cut),
    from ``stdlib_source_files(packages)``.

    Raises ``ValueError`` if the installation carries less than ``MIN_CORPUS_BYTES`` of source
    (a stripped-down Python): then pass your own text with ``data.path=``.
    """
    if budget_bytes < MIN_CORPUS_BYTES:
        raise ValueError(f"data.corpus_bytes must be >= {MIN_CORPUS_BYTES}, got {budget_bytes}")
    docs: list[str] = []
    used = 0
    for path in stdlib_source_files(packages):
        raw = path.read_bytes()
        take = raw[: budget_bytes - used]
        docs.append(take.decode("utf-8", errors="ignore"))
        used += len(take)
        if used >= budget_bytes:
            return docs
    raise ValueError(
        f"the embedded corpus needs {budget_bytes} bytes of standard-library source under "
        f"{sysconfig.get_paths()['stdlib']} but found only {used}; pass data.path=YOUR_TEXT_FILE"
    )
