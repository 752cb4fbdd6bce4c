"""python -m dynbatch demo|doctor: the fixed-vs-dynamic demo, or a check of this install."""

from __future__ import annotations

import sys

from . import demo, doctor


def _demo(argv: list[str]) -> int:
    demo.main(argv)
    return 0


_COMMANDS = {"demo": _demo, "doctor": doctor.main}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
        print(f"usage: python -m dynbatch {{{'|'.join(_COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    return _COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
