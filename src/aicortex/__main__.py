"""``python -m aicortex``: the ``aicortex`` command."""

from aicortex._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
