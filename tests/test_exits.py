"""The exit codes: one IntEnum (train/exits.py), used by the entry points' shared parts and listed in the README."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from train.checkpoints import CheckpointSaveError
from train.exits import INTERRUPTED, ExitCode

README = Path(__file__).resolve().parent.parent / "README.md"


def test_codes_are_the_shells_and_the_readme_lists_each_one():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5, 6, 128]
    assert ExitCode.for_signal(signal.SIGTERM) == 143 and INTERRUPTED == 130  # 128 + N, as a shell reports it
    assert CheckpointSaveError.exit_code == 5
    table = re.search(r"^Exit codes .*?\n\n(\|.*?)\n\n", README.read_text(), flags=re.M | re.S)
    assert table, "README.md has no exit-code table"
    listed = [row.split("|")[1].strip() for row in table.group(1).splitlines()[2:]]
    assert listed == ["0", "1", "2", "3", "4", "5", "6", "128 + N"]


def test_no_exit_code_is_a_bare_number_in_train():
    """`raise SystemExit(3)` and `return 4` in the run's fault paths were numbers scattered over three files."""
    bare = []
    for path in sorted((README.parent / "train").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"SystemExit\(\s*(?:\d|128\b)", line) or re.search(r"exit_code\s*=\s*\d", line):
                bare.append(f"{path.name}:{n}: {line.strip()}")
    assert not bare, "exit codes written as numbers (use train.exits.ExitCode):\n" + "\n".join(bare)
