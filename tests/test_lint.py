"""The code stays ruff- and mypy-clean, keeps its import contracts and its event contracts' lock
(``eventbus contracts check``): the same checks as ``make lint``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import-linter has no ``python -m`` entry: its console script sits next to this interpreter.
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "ruff", "check", "."],
        [sys.executable, "-m", "ruff", "format", "--check", "."],
        [sys.executable, "-m", "mypy"],
        [LINT_IMPORTS, "--no-cache"],
        [sys.executable, "-m", "project.cli", "contracts", "check"],
    ],
    ids=["ruff-check", "ruff-format", "mypy", "import-contracts", "contracts-lock"],
)
def test_linter_is_clean(argv: list[str]) -> None:
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=170, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
