"""Check a DeepSpeed hostfile before submitting a multi-node job: ``python -m train.hostfile hosts``.

The deepspeed runner reads the hostfile before train/imagenet.py starts and stops at the first line it cannot
parse ("Hostfile contains a bad entry: ..."), without a line number or the expected form. This check applies the
runner's own parser to each line, so it accepts exactly what the runner accepts, and reports every problem with
file, line number and the form expected; it also refuses hosts with no slots. It prints the world it describes.
"""

from __future__ import annotations

import sys
from pathlib import Path

EXPECTED = "'HOSTNAME slots=N' (N GPUs on that host), one host per line; '#' starts a comment"


class HostfileError(ValueError):
    pass


def parse(path: str | Path) -> dict[str, int]:
    """Hosts and their slots, in file order; HostfileError listing every bad line otherwise."""
    from deepspeed.launcher.runner import _parse_hostfile

    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise HostfileError(f"cannot read hostfile {path}: {e.strerror}") from None
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    problems = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            ((host, slots),) = _parse_hostfile([text]).items()
        except ValueError:
            problems.append(f"{path}:{number}: {text!r} does not parse; expected {EXPECTED}")
            continue
        if host in hosts:
            problems.append(f"{path}:{number}: host {host!r} already listed on line {first_line[host]}; "
                            f"the runner refuses duplicates")
        elif slots < 1:
            problems.append(f"{path}:{number}: host {host!r} has slots={slots}; expected at least 1")
        else:
            hosts[host], first_line[host] = slots, number
    if not hosts and not problems:
        problems.append(f"{path}: no hosts; expected lines of the form {EXPECTED}")
    if problems:
        raise HostfileError("\n".join(problems))
    return hosts


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m train.hostfile HOSTFILE", file=sys.stderr)
        return 2
    try:
        hosts = parse(args[0])
    except HostfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    listing = ", ".join(f"{h} {n}" for h, n in hosts.items())
    print(f"{args[0]}: {len(hosts)} node(s), {sum(hosts.values())} rank(s): {listing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
