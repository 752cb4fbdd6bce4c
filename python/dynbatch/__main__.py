"""python -m dynbatch demo: fixed batch size against dynamic batching on this machine."""

from __future__ import annotations

import sys

from . import demo

_COMMANDS = {"demo": demo.main}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
        print(f"usage: python -m dynbatch {{{'|'.join(_COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    _COMMANDS[sys.argv[1]](sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
