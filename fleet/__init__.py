"""Fleet manager service: device registry, bundle repository, rollouts, telemetry, dashboard.

Not built yet (see the fleet issues); the package exists so the distribution's layout is fixed.
"""

__all__: list[str] = []
