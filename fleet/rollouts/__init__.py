"""Staged rollouts: the spec (``spec``), the pure state machine (``engine``), the stored rows (``tables``,
``service``), the driver thread that publishes commands (``driver``) and the REST routes (``routes``)."""

__all__: list[str] = []
