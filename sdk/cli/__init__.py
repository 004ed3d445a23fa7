"""The host's ``edgeship`` command line (``sdk.cli.main``) and the demo it runs.

It sits above the kernel: it may import ``packagers``, ``device_runtime`` and ``fleet``; nothing in the
kernel imports it (docs/architecture.md, checked by ``make lint``).
"""

from sdk.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
