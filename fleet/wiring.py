"""Where the domains meet: the rollout engine reads the devices domain and picks bundles with the releases one.

The domains do not import each other's services for this; they define what they need (``fleet.rollouts``'
``Observer`` Protocol, ``BundleFor`` and ``ResolveSelector`` callables) and this module adapts the devices
and releases services to it, builds the rollout driver for ``fleet.server`` and configures the app's
routes. Nothing here holds a rule of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from sqlalchemy.orm import Session

from fleet.db import Database
from fleet.devices import service as devices
from fleet.devices import stats as device_stats
from fleet.releases.service import artifact_url, choose_bundle
from fleet.rollouts.driver import PahoPublisher, RolloutDriver
from fleet.rollouts.engine import ModelStats
from fleet.rollouts.routes import RolloutWiring, configure
from fleet.rollouts.service import BundleRef
from fleet.settings import FleetSettings

__all__ = ["DevicesObserver", "bundle_chooser", "rollout_driver", "wire_rollouts"]


class DevicesObserver:
    """The rollout engine's view of the devices domain (``fleet.rollouts.driver.Observer``)."""

    def phases(self, session: Session, cmd_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        return devices.command_phases(session, cmd_ids)

    def last_seen(self, session: Session, device_ids: Sequence[str]) -> Mapping[str, float]:
        return devices.last_seen(session, device_ids)

    def model_stats(
        self, session: Session, device_ids: Sequence[str], name: str, version: int, since: float, until: float
    ) -> ModelStats:
        if until <= since:
            return ModelStats()
        stats = device_stats.model_stats(session, device_ids, name, version, since, until)
        return ModelStats(requests=stats.count, errors=stats.errors, p95_ms=stats.p95_ms)

    def active_bundles(self, session: Session, device_ids: Sequence[str]) -> Mapping[str, tuple[str | None, float]]:
        return {
            device_id: (device.model_sha256, device.status_at or 0.0)
            for device_id, device in devices.devices_by_id(session, device_ids).items()
        }

    def active_models(self, session: Session, device_ids: Sequence[str]) -> Mapping[str, tuple[str, int]]:
        return {
            device_id: (device.model_name, device.model_version)
            for device_id, device in devices.devices_by_id(session, device_ids).items()
            if device.model_name is not None and device.model_version is not None
        }


def bundle_chooser(settings: FleetSettings) -> Any:
    """``BundleFor``: the release's bundle this device's reported capabilities can run, or why none fits."""
    base = settings.artifacts_url

    def bundle_for(session: Session, name: str, version: int, device_id: str) -> BundleRef | str:
        device = devices.get_device(session, device_id)
        if device is None:
            return "the device has never reported"
        if not device.capabilities:
            return "the device has not reported its capabilities yet"
        choice = choose_bundle(session, name, version, device.capabilities)
        if choice.bundle is None:
            return choice.explain()
        return BundleRef(choice.bundle.sha256, artifact_url(base, choice.bundle.sha256), choice.bundle.size)

    return bundle_for


def rollout_driver(db: Database, settings: FleetSettings) -> RolloutDriver:
    """The driver of this process: commands through the broker of ``settings``, leases held as ``holder_id``.

    The command publisher connects exactly as the ingest does: same broker, credentials, MQTT version, CA
    file and client certificate (``FleetSettings.broker_tls_files``).
    """
    ca, cert, key = settings.broker_tls_files() or (None, None, None)  # the ingest's own TLS settings
    publisher = PahoPublisher(
        settings.broker_host, settings.broker_port, settings.fleet,
        client_id=f"{settings.mqtt_client_id}-cmd", username=settings.broker_username,
        password=settings.broker_password(), tls=settings.broker_tls, ca_file=ca, cert_file=cert, key_file=key,
        protocol=settings.broker_protocol, wait=False,
    )  # fmt: skip
    return RolloutDriver(db, publisher, DevicesObserver(), settings.holder_id, lease_s=settings.lease_s)


def wire_rollouts(app: FastAPI, settings: FleetSettings, driver: RolloutDriver | None) -> None:
    """Give the rollout routes their selector, bundle chooser, the driver's wake-up and the default resend."""
    configure(
        app,
        RolloutWiring(
            resolve=devices.select_devices,
            bundle_for=bundle_chooser(settings),
            wake=driver.wake if driver is not None else (lambda: None),
            resend_s=settings.command_resend_s,
        ),
    )
