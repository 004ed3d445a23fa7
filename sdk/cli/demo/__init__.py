"""``edgeship demo``: the product end to end on one machine (``full``), or the quick packaging table (``quick``).

- ``full``: the orchestrator and its step timings; ``build``: train and package; ``supervisor``: the
  processes it starts (broker, fleet, agents) and how they are stopped; ``fleet_stage``: the fleet server
  and the devices; ``rollouts``: the two rollouts and what each must show.
- ``quick`` (``edgeship demo --quick``): train, package for ONNX Runtime, print accuracy, latency and size.
"""

from __future__ import annotations

from sdk.cli.demo.full import DemoOptions, run_full_demo
from sdk.cli.demo.quick import DemoRow, run_demo
from sdk.cli.demo.supervisor import DemoFailed

__all__ = ["DemoFailed", "DemoOptions", "DemoRow", "run_demo", "run_full_demo"]
