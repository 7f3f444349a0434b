"""The proxy, run as a module: ``python -m aicortex.tools.server`` is ``aicortex serve``.

It takes the same arguments (``--help`` lists them) and needs the same extra,
``aicortex-core[server]``. To serve the proxy from your own ASGI application, use
:func:`aicortex.server.create_app`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy with ``argv`` (default: the command line); returns the exit status."""
    from .._cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
