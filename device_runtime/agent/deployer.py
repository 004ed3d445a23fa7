"""The deployment state machine: one deployment (or rollback) at a time, every phase transition here.

A deploy, top to bottom in this file::

    received --(bad before?)--> failed
        |
    downloading  [deploy.json written]  download, verify, install into the inactive slot (``_stage``)
        |                               (in the staging helper process, or on this thread)
    staged       [reported only]
        |
    health_check [deploy.json written, attempts + 1]  trial load beside the serving model, golden check,
        |                                             latency budget (``_trial``), under a timeout
    switching    [reported only]        pointer.json names the new slot: the commit point (``_commit``)
        |
    active       the serving model swapped; the record forgotten (``_forget``)

    any step fails -> failed (and rolled_back once a trial had started): the previous model keeps
    serving, a bundle that failed verification, load or check is remembered as bad (``_finish_failed``)

A rollback loads the other slot's bundle (``health_check`` -> ``switching`` -> ``rolled_back``), if the
trust root in force still trusts it. When the root changes (``recheck``) and at ``boot``, both slots'
bundles are verified again against the root's bundle keys (docs/security.md, "Installed bundles under a
new root"): a slot whose bundle a threshold of them no longer signed (a revoked key's) is reported; the
active one is left for the other slot when that one verifies and passes its check, else it keeps serving,
reported. After a
restart, ``resume`` applies ``ota.recover``'s decision (report again, committed, abandon, or resume at
a phase) to the record found in ``deploy.json``; ``boot`` serves the pointer's slot before that.

The ``Deployer`` owns the disk state of deployments (slots, ``deploy.json``, downloads, ``bad.json``)
and the trial; the ``Agent`` owns the wiring around it (commands, the OTA queue, events, telemetry,
serving) and hands it what it reports through three callables. Its methods run on the agent's OTA
thread, one at a time; ``boot`` runs in ``Agent.start`` before that thread exists.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

from device_runtime.agent._records import BadBundles, Journal, flush_json, write_json
from device_runtime.agent._serving import Active, Serving
from device_runtime.agent._worker import Worker
from device_runtime.agent.config import AgentConfig
from device_runtime.agent.crash import crash_point
from device_runtime.agent.ota import Deployment, deployment_from_command, recover
from device_runtime.agent.slots import Pointer, SlotInfo, SlotStore, other_slot
from device_runtime.agent.staging import (
    Flush,
    Staged,
    StageFailure,
    StageJob,
    StagingDied,
    StagingProcess,
    check_compatible,
    stage,
)
from device_runtime.errors import HealthCheckError, StateError
from device_runtime.metrics import Metrics
from device_runtime.model import Model, load_verified
from sdk.bundle import VerifiedBundle, read_bundle
from sdk.errors import EdgeshipError, SignatureError
from sdk.fsutil import make_private_dir
from sdk.redact import redact_url
from sdk.trustroot import TrustRoot

__all__ = ["DEPLOY_FILE", "DOWNLOADS", "Deployer", "Report"]

log = logging.getLogger(__name__)

DEPLOY_FILE = "deploy.json"
DOWNLOADS = "downloads"
_BAD_FILE = "bad.json"
_T = TypeVar("_T")
_MAX_MESSAGE_CHARS = 500  # characters of a failed event's message
_IO_THREADS = 8  # fsyncs a deployment issues at once (the slot's files and folders, its record)


class Report(Protocol):
    """How the deployer reports a step (the agent's event stream)."""

    def __call__(self, cmd_id: str | None, phase: str, message: str, **detail: Any) -> None: ...


class Deployer:
    """Runs deployments and rollbacks against one state directory (see the module docstring).

    Args:
        config: the agent's settings (downloads, trust, health check, limits).
        state_dir: the agent's folder (absolute, existing).
        journal: the command journal; a finished deployment is marked done in it.
        serving: the model serving now; a commit swaps it.
        metrics: shared by every model the agent loads.
        capabilities: this device's (``_sysinfo.capabilities()``), for the compatibility check.
        stop: set by ``Agent.stop``; a deployment in progress is interrupted at its next step.
        report: reports a step (an event); it must not raise.
        flush_reports: waits until the steps reported so far are durable (before a record is forgotten).
        publish_status: publishes the device's status (after a deployment ends).
        trust: returns the current trust root (bundle keys, pins, signed downgrades).
    """

    def __init__(
        self,
        config: AgentConfig,
        state_dir: Path,
        *,
        journal: Journal,
        serving: Serving,
        metrics: Metrics,
        capabilities: Mapping[str, Any],
        stop: threading.Event,
        report: Report,
        flush_reports: Callable[[], None],
        publish_status: Callable[[], None],
        trust: Callable[[], TrustRoot],
    ) -> None:
        self.config = config
        self._trust = trust  # the current trust root (a ``trust`` command may replace it meanwhile)
        self.state_dir = state_dir
        self._slots = SlotStore(state_dir)
        self._journal = journal
        self._bad = BadBundles(state_dir / _BAD_FILE)
        self._serving = serving
        self._metrics = metrics
        self._capabilities = dict(capabilities)
        self._stop = stop
        self._report = report
        self._flush_reports = flush_reports
        self._publish_status = publish_status
        self._deployment: Deployment | None = None  # what deploy.json holds, for the status
        self._unverified: tuple[Any, dict[str, str]] = (None, {})  # (root, pointer slots) -> unverified_slots
        self._allowed_hosts: tuple[str, ...] | None = None  # _download_hosts(), resolved once
        # Threads for fsyncs that run beside a deployment's other steps (started in start(): a thread
        # start costs a GIL hand-over, several milliseconds when predict threads keep the GIL busy).
        self._io = ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="edgeship-io")
        self._record_flush: Future[None] | None = None  # the fsyncs of the last deploy.json (see _save)
        self._health_worker = Worker("edgeship-health")  # runs health checks under a timeout
        # Started by the OTA thread (on Linux the helper dies with the thread that started it).
        self._stager: StagingProcess | None = None
        if config.staging_process:
            self._stager = StagingProcess(
                download_attempts=config.download_attempts, download_read_timeout_s=config.download_read_timeout_s
            )

    def start(self) -> None:
        """Start every I/O thread now, not during a deployment."""
        ready = threading.Barrier(_IO_THREADS + 1)
        for _ in range(_IO_THREADS):
            self._io.submit(ready.wait)
        ready.wait()

    def stop_staging(self) -> None:
        """Stop the staging helper: a job in progress ends like after a crash (resumed at the next start)."""
        if self._stager is not None:
            self._stager.shutdown()

    def close(self, timeout_s: float) -> None:
        """Release the I/O threads and the health-check thread (after the OTA thread ended)."""
        self._io.shutdown(wait=True)
        self._health_worker.close(timeout_s)

    @property
    def deployment(self) -> Deployment | None:
        """The deployment in progress (its last phase), or None."""
        return self._deployment

    @property
    def active_model(self) -> dict[str, Any] | None:
        active = self._serving.active
        return None if active is None else active.info.model()

    # -- the entry points: a command, a restart, the start -----------------------------------------

    def run_command(self, cmd: Mapping[str, Any]) -> None:
        """Run a ``deploy`` or ``rollback`` command (already parsed once by the agent) to its end: every
        outcome is reported, none raised (``stop()`` leaves the record for the next start)."""
        dep = deployment_from_command(cmd, max_bundle_bytes=self.config.max_bundle_bytes)
        # The journal entry stays "queued" while deploy.json exists: a restart recovers it from there.
        self._run_deployment(dep.at("received", previous=self.active_model), resume_at=None)

    def resume(self, record: Deployment) -> None:
        """Runs first on the OTA worker after a restart that found ``deploy.json``."""
        active = self._serving.active
        decision = recover(record, None if active is None else active.info.sha256, self.config.limits)
        log.warning(
            "deployment %s found in phase %s: %s (%s)", record.cmd_id, record.phase, decision.action, decision.reason
        )
        self._deployment = record
        detail = {"restarted": True, "found_phase": record.phase, "reason": decision.reason}
        if decision.action == "report":
            self._report(record.cmd_id, record.phase, f"reported again after a restart: {decision.reason}", **detail)
            self._forget(record, record.phase)
        elif decision.action == "committed":
            final = "active" if record.kind == "deploy" else "rolled_back"
            self._save_final(record.at(final))
            self._report(record.cmd_id, final, decision.reason, model=self.active_model, **detail)
            self._forget(record, final)
            self._publish_status()
        elif decision.action == "abandon":
            trial = record.kind == "deploy" and record.phase in ("health_check", "switching")
            self._finish_failed(
                record, f"abandoned: {decision.reason}", bad=decision.bad, trial=trial, error="Interrupted", **detail
            )
        else:
            assert decision.resume_at is not None
            resumed = record if decision.resume_at == "health_check" else replace(record, resumes=record.resumes + 1)
            self._report(record.cmd_id, "received", f"resuming at {decision.resume_at}: {decision.reason}", **detail)
            self._run_deployment(resumed, resume_at=decision.resume_at)

    def boot(self, record: Deployment | None) -> None:
        """Serve the pointer's active slot (or its other slot, or the initial bundle) before connecting."""
        try:
            pointer = self._slots.read_pointer()
        except StateError as e:
            log.error("%s; starting without a model", e)
            self._report(None, "failed", f"pointer unreadable: {e}")
            pointer = Pointer()
        keep = record.folder if record is not None and record.phase in ("health_check", "switching") else None
        self._slots.clean_incoming()
        self._slots.clean_unlisted(pointer, keep=keep)
        root = self._trust()
        untrusted = self.unverified_slots(root, pointer)
        order = [pointer.active, *([other_slot(pointer.active)] if pointer.active else [])]
        for name, why in sorted(untrusted.items()):
            self._report_untrusted(name, pointer.slots[name], root, why, last_resort=name == pointer.active)
        # A slot the root no longer trusts is served only when no trusted one can be (reported above).
        for slot in [*(s for s in order if s not in untrusted), *(s for s in order if s in untrusted)]:
            info = pointer.slots.get(slot) if slot else None
            if slot is None or info is None:
                continue
            try:
                verified = self._slots.open_slot(slot, info, check_hashes=self.config.check_slots_on_start)
                model = load_verified(
                    verified,
                    providers=self.config.providers,
                    intra_op_threads=self.config.intra_op_threads,
                    metrics=self._metrics,
                )
                self._health_check(model, hooks=False)
            except EdgeshipError as e:
                log.error("slot %s (%s v%s) cannot be served: %s", slot, info.name, info.version, e)
                self._report(None, "failed", f"slot {slot} cannot be served: {e}", slot=slot)
                continue
            if slot != pointer.active:  # the active slot broke: fall back to the other, durably
                self._slots.write_pointer(pointer.activate(slot, raise_floor=False))
                self._report(
                    None, "rolled_back", f"serving {info.name} v{info.version} from slot {slot}", model=info.model()
                )
            self._serving.swap(Active(model, slot, info))
            return
        if self.config.initial_bundle is not None and self._serving.active is None:
            self._install_initial(self.config.initial_bundle)

    def _install_initial(self, path: Path) -> None:
        """Verify, check and activate the factory bundle into slot A."""
        try:
            self._slots.clean_incoming()
            root = self._trust()
            verified = read_bundle(
                path, root.bundle_keys(), self._slots.incoming / "bundle",
                installed_version=lambda name: root.effective_floor(name, None, None),  # the root's pins
            )  # fmt: skip
            check_compatible(verified.manifest, self._capabilities)
            self._slots.write_pointer(Pointer())
            staged = self._slots.install("A", verified)
            trial, _ = self._trial(staged, "A", hooks=False)
        except (EdgeshipError, _Failed) as e:
            self._slots.clean_incoming()
            log.error("initial bundle %s refused: %s", path, e)
            self._report(None, "failed", f"initial bundle refused: {e}")
            return
        self._slots.write_pointer(Pointer().with_slot("A", trial.info).activate("A"))
        self._serving.swap(trial)
        self._report(
            None, "active", f"initial bundle {trial.info.name} v{trial.info.version}", model=trial.info.model()
        )

    def _run_deployment(self, dep: Deployment, resume_at: str | None) -> None:
        try:
            if dep.kind == "rollback":
                self._rollback(dep)
            else:
                self._deploy(dep, resume_at)
        except _Failed as f:
            self._finish_failed(self._deployment or dep, str(f), bad=f.bad, trial=f.trial, error=f.error)
        except _Interrupted:
            log.info("deployment %s interrupted by stop(); the next start resumes it", dep.cmd_id)
        except Exception as e:  # a bug or an unforeseen I/O error: never leave the deployment hanging
            log.exception("deployment %s failed unexpectedly", dep.cmd_id)
            self._finish_failed(self._deployment or dep, f"{type(e).__name__}: {e}", bad=False, trial=False,
                                error=type(e).__name__)  # fmt: skip

    # -- deploy: stage -> trial -> health -> commit ------------------------------------------------

    def _deploy(self, dep: Deployment, resume_at: str | None) -> None:
        phase = resume_at or "received"
        if phase == "received":
            bad = self._bad.get(dep.sha256)
            if bad is not None and not dep.retry_bad:
                raise _Failed(
                    f"bundle {dep.sha256[:12]} failed on this device before ({bad.get('reason')}); "
                    "send retry_bad to try it again",
                    error="BadBundle",
                )
            phase = "downloading"
        bundle_path = self.state_dir / DOWNLOADS / f"{dep.sha256}.edgebundle"
        verified: VerifiedBundle | None = None
        flush: Flush | None = None
        if phase in ("downloading", "verifying"):
            # The one record before the health check: it counts this run (``resumes``). A crash while
            # downloading, verifying or staging resumes from here; a complete download (renamed only
            # after its sha256 matched, flushed by the downloader) is not fetched again.
            dep = self._save(dep.at("downloading"))
            if not bundle_path.exists():
                shown = redact_url(dep.url)  # events and logs never carry a URL's credentials
                self._report(dep.cmd_id, "downloading", f"downloading {shown}", url=shown, size=dep.size)
            staged, flush = self._stage(dep, bundle_path)
            verified = staged.verified
            dep = self._note(dep.at("staged", slot=staged.slot, folder=staged.folder))
            m = verified.manifest
            self._report(
                dep.cmd_id, "staged", f"{m.name} v{m.version} verified into slot {staged.slot}",
                slot=staged.slot, version=m.version,
            )  # fmt: skip
        if verified is None:  # resumed at the health check: the staged slot must still be intact
            try:
                if dep.slot is None or dep.folder is None:
                    raise StateError("no staged slot recorded")
                verified = self._slots.open_staged(dep.slot, dep.folder, dep.sha256)
            except EdgeshipError as e:
                log.warning("staged slot of %s unusable (%s); verifying again", dep.cmd_id, e)
                self._deploy(dep, "verifying")
                return
        # Counted before the trial load, so a bundle that kills the process is not retried forever.
        dep = self._save(dep.at("health_check", attempts=dep.attempts + 1))
        self._report(dep.cmd_id, "health_check", "loading and checking the new model", attempt=dep.attempts)
        assert dep.slot is not None and dep.folder is not None
        # The slot's fsyncs (I/O, started by staging right after verification) run on while the trial
        # loads and checks the model (CPU); both must be done before the pointer names the slot.
        if flush is None:  # resumed: flushed from scratch
            try:
                flush = self._slots.start_flush(dep.folder, self._io)
            except StateError as e:
                raise _Failed(f"cannot stage: {e}", error="StateError") from e
        try:
            trial, metrics = self._trial(verified, dep.slot)
        finally:
            try:
                flush.wait()
                flushed: OSError | None = None
            except OSError as e:
                flushed = e
        if flushed is not None:
            trial.model.close()
            if self._stop.is_set():  # the helper was stopped with the agent: resumed at the next start
                raise _Interrupted
            raise _Failed(f"cannot stage: {flushed.strerror or flushed}", trial=True, error="StateError")
        self._commit(self._note(dep.at("switching")), trial, metrics)

    def _stage(self, dep: Deployment, bundle_path: Path) -> tuple[Staged, Flush]:
        """Download (unless done), verify and install the bundle into the inactive slot.

        Raises:
            _Failed: it was refused or could not be staged.
            _Interrupted: ``stop()`` was called meanwhile.
        """
        root = self._trust()
        trust = root.bundle_keys()
        keys, threshold = StageJob.encode_trust(trust)
        job = StageJob(
            cmd_id=dep.cmd_id,
            url=dep.url,
            sha256=dep.sha256,
            size=dep.size,
            max_bytes=dep.size or self.config.max_bundle_bytes,
            state_dir=str(self.state_dir),
            bundle_path=str(bundle_path),
            trusted_keys=keys,
            threshold=threshold,
            capabilities=self._capabilities,
            deadline_s=self.config.download_deadline_s,
            read_timeout_s=self.config.download_read_timeout_s,
            attempts=self.config.download_attempts,
            allow_hosts=self._download_hosts(),
            public_hosts=self.config.public_hosts,
            reserve_bytes=self.config.download_reserve_bytes,
            pins=root.pins,  # the command's allow_downgrade has no say: only the signed root's rules
            downgrades=dict(root.downgrades),
        )

        def report(phase: str) -> None:  # "verifying": the download is complete
            self._note(dep.at(phase))
            self._report(dep.cmd_id, phase, "verifying the bundle")

        if self._stop.is_set():
            raise _Interrupted
        self.start_stager()  # (a helper that died earlier is replaced; one that cannot start: this thread)
        try:
            if self._stager is not None:
                return self._stager.run(job, report)
            return stage(job, trust=trust, executor=self._io, report=report)
        except StageFailure as e:
            raise _Failed(str(e), bad=e.bad, error=e.error) from e
        except StagingDied as e:
            if self._stop.is_set():
                raise _Interrupted from e
            raise _Failed(f"{e}; the next deployment starts a new one", error="StagingDied") from e

    def _download_hosts(self) -> tuple[str, ...]:
        """``allow_hosts`` plus the broker's host and the addresses it resolves to now (the fleet serves
        artifacts next to its broker, often on the same private address)."""
        if self._allowed_hosts is None:
            host = self.config.mqtt.host
            try:
                found = {str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
            except OSError as e:
                log.warning("cannot resolve the broker's host %s (%s); allowing it by name only", host, e)
                found = set()
            self._allowed_hosts = (*self.config.allow_hosts, host, *sorted(found))
        return self._allowed_hosts

    def _trial(self, verified: VerifiedBundle, slot: str, *, hooks: bool = True) -> tuple[Active, dict[str, Any]]:
        """Load a bundle beside the serving model and health-check it.

        ``hooks``: a deployment's trial (crash hook and latency budget); False for the initial bundle.

        Raises:
            _Failed: it did not load or did not pass (``trial=True``, ``bad=True``).
        """
        if hooks:
            crash_point("load")

        def load() -> Model:
            return load_verified(
                verified,
                providers=self.config.providers,
                intra_op_threads=self.config.intra_op_threads,
                metrics=self._metrics,
            )

        try:
            model = self._bounded(load, lambda late: late.close(), "loading the model")
        except _TimedOut as e:
            raise _Failed(str(e), bad=True, trial=True, error="HealthCheckError") from e
        except EdgeshipError as e:
            raise _Failed(f"load failed: {e}", bad=True, trial=True, error=type(e).__name__) from e
        try:
            metrics = self._health_check(model, hooks=hooks)
        except HealthCheckError as e:
            raise _Failed(str(e), bad=True, trial=True, error="HealthCheckError") from e
        except EdgeshipError as e:
            model.close()
            raise _Failed(f"health check failed: {e}", bad=True, trial=True, error=type(e).__name__) from e
        return Active(model, slot, SlotInfo.of(verified)), metrics

    def _health_check(self, model: Model, *, hooks: bool = True) -> dict[str, Any]:
        """``model.health_check()`` under a timeout; closes the model if it fails.

        ``hooks``: also the crash hook and the latency budget (a deployment's trial; at start the process
        is busy loading and the latency says little).

        Raises:
            HealthCheckError: it failed, hung past ``health_timeout_s`` or ran over the latency budget.
        """

        def run() -> dict[str, Any]:
            if hooks:
                crash_point("health_check")
            return model.health_check()

        try:
            metrics = self._bounded(run, lambda _: model.close(), "health check")
        except _TimedOut:  # closed when the stuck call returns (closing now would wait for it)
            raise
        except BaseException:
            model.close()
            raise
        budget = model.manifest.golden.latency_budget_ms
        if budget is None:
            budget = self.config.health_latency_budget_ms
        if hooks and isinstance(budget, (int, float)) and metrics["latency_ms"] > budget:
            model.close()
            raise HealthCheckError(
                f"health check took {metrics['latency_ms']} ms, over the {budget} ms budget", metrics
            )
        return metrics

    def _bounded(self, fn: Callable[[], _T], late: Callable[[_T], None], what: str) -> _T:
        """``fn()`` on the health-check thread, for at most ``health_timeout_s``.

        A runtime call cannot be interrupted: past the timeout ``late`` gets its result when it finally
        returns (to close a model), and the next call gets a fresh thread.

        Raises:
            _TimedOut: it did not return in time (a ``HealthCheckError``).
            Exception: what ``fn`` raised.
        """
        future = self._health_worker.submit(fn)
        try:
            return future.result(self.config.health_timeout_s)
        except FutureTimeout:
            future.add_done_callback(lambda done: None if done.exception() else late(done.result()))
            stuck, self._health_worker = self._health_worker, Worker("edgeship-health")
            stuck.close(0)  # its thread ends when the call returns
            raise _TimedOut(f"{what} did not finish within {self.config.health_timeout_s:g} s") from None

    def _commit(self, dep: Deployment, trial: Active, metrics: Mapping[str, Any]) -> None:
        """Write the pointer (the commit point), swap the serving model, report."""
        assert trial.slot is not None
        pointer = self._slots.read_pointer()
        pointer = pointer.with_slot(trial.slot, trial.info).activate(trial.slot, raise_floor=dep.kind == "deploy")
        try:
            self._record_flushed()  # the health_check record is durable before the pointer moves
            self._slots.write_pointer(pointer)
        except StateError as e:
            trial.model.close()
            raise _Failed(f"cannot commit: {e}", trial=True, error="StateError") from e
        crash_point("pointer_written")
        previous = self._serving.swap(trial, close_old=False)  # closed once reported (below)
        final = "active" if dep.kind == "deploy" else "rolled_back"
        # No terminal record: deploy.json still says health_check, and after a crash from here on
        # ``recover`` sees the pointer on this bundle and reports it again ("committed").
        dep = self._note(dep.at(final))
        self._report(
            dep.cmd_id, final, f"serving {trial.info.name} v{trial.info.version} from slot {trial.slot}",
            model=trial.info.model(), previous=None if previous is None else previous.info.model(),
            health=_health_summary(metrics),
        )  # fmt: skip
        if previous is not None:
            self._serving.retire(previous)
        self._forget(dep, final)
        self._publish_status()

    # -- rollback ----------------------------------------------------------------------------------

    def _rollback(self, dep: Deployment) -> None:
        pointer = self._slots.read_pointer()
        if pointer.active is None:
            raise _Failed("no model is active; nothing to roll back", error="NothingToRollBack")
        slot = other_slot(pointer.active)
        info = pointer.slots.get(slot)
        if info is None:
            raise _Failed(f"slot {slot} holds no previous model to roll back to", error="NothingToRollBack")
        why = self.unverified_slots(self._trust(), pointer).get(slot)
        if why is not None:  # never back to a bundle only a revoked key signed
            raise _Failed(f"slot {slot}'s {info.name} v{info.version} is no longer trusted: {why}", error="Untrusted")
        dep = self._save(
            dep.at("health_check", slot=slot, folder=info.folder or slot, sha256=info.sha256, attempts=dep.attempts + 1)
        )
        self._report(dep.cmd_id, "health_check", f"loading {info.name} v{info.version} from slot {slot}")
        try:
            verified = self._slots.open_slot(slot, info)
        except EdgeshipError as e:
            raise _Failed(f"slot {slot} is damaged: {e}", error=type(e).__name__) from e
        expires = verified.manifest.expires_at()
        if expires is not None and expires <= datetime.now(timezone.utc):  # not started again once expired
            raise _Failed(
                f"the previous model {info.name} v{info.version} expired at {verified.manifest.expires}",
                error="ExpiredError",
            )
        try:
            trial, metrics = self._trial(verified, slot)
        except _Failed as f:
            raise _Failed(f"the previous model failed its check: {f}", error=f.error) from f
        self._commit(self._note(dep.at("switching")), trial, metrics)

    # -- the installed bundles against the trust root ------------------------------------------------

    def unverified_slots(self, root: TrustRoot, pointer: Pointer | None = None) -> dict[str, str]:
        """Slot -> why, for each installed bundle that a threshold of ``root``'s bundle keys did not sign
        (``SlotStore.signed_by``); cached per root and pointer. A damaged slot is not listed here."""
        if pointer is None:
            try:
                pointer = self._slots.read_pointer()
            except StateError:
                return {}
        key = (root.roles["bundles"], tuple(sorted((k, v.sha256 if v else "") for k, v in pointer.slots.items())))
        if self._unverified[0] == key:
            return dict(self._unverified[1])
        found: dict[str, str] = {}
        for slot, info in pointer.slots.items():
            if info is not None:
                try:
                    self._slots.signed_by(slot, info, root.bundle_keys())
                except SignatureError as e:
                    found[slot] = str(e)
                except EdgeshipError:
                    pass  # damage, not trust: open_slot reports it where the slot is used
        self._unverified = (key, found)
        return dict(found)

    def recheck(self) -> None:
        """After the root changed: report the slots it no longer trusts, and leave an untrusted active slot
        for the other one when that one is trusted and passes its check (TUF: what a revoked key signed is
        not used); with no trusted slot to go to, keep serving (never nothing) and say so."""
        root = self._trust()
        try:
            pointer = self._slots.read_pointer()
        except StateError as e:
            log.error("slots not re-checked against root v%d: %s", root.version, e)
            return
        untrusted = self.unverified_slots(root, pointer)
        for slot, why in sorted(untrusted.items()):
            self._report_untrusted(slot, pointer.slots[slot], root, why, last_resort=slot == pointer.active)
        active, standby = pointer.active, pointer.inactive
        info = pointer.slots.get(standby)
        if active not in untrusted or info is None or standby in untrusted:
            return
        trial: Active | None = None
        try:
            verified = self._slots.open_slot(standby, info)
            expires = verified.manifest.expires_at()
            if expires is not None and expires <= datetime.now(timezone.utc):
                raise _Failed(f"it expired at {verified.manifest.expires}", error="ExpiredError")
            trial, _ = self._trial(verified, standby, hooks=False)
            self._slots.write_pointer(pointer.activate(standby, raise_floor=False))
        except (EdgeshipError, _Failed) as e:
            if trial is not None:
                trial.model.close()
            log.error("cannot leave untrusted slot %s for slot %s: %s", active, standby, e)
            self._report(
                None, "failed", f"slot {standby} cannot be served instead ({e}); still serving slot {active}, "
                f"which root v{root.version} does not trust", error="Untrusted", slot=active,
            )  # fmt: skip
            return
        previous = self._serving.swap(trial, close_old=False)
        log.warning("left slot %s (untrusted under root v%d) for slot %s", active, root.version, standby)
        self._report(None, "rolled_back", f"serving {info.name} v{info.version} from slot {standby}: slot {active} "
                     f"is not trusted by root v{root.version}", model=info.model(), error="Untrusted")  # fmt: skip
        if previous is not None:
            self._serving.retire(previous)
        self._publish_status()

    def _report_untrusted(
        self, slot: str, info: SlotInfo | None, root: TrustRoot, why: str, *, last_resort: bool
    ) -> None:
        if info is None:
            return
        log.error("slot %s (%s v%s) is not trusted by root v%d: %s", slot, info.name, info.version, root.version, why)
        then = " (served only if no trusted slot can be)" if last_resort else "; never rolled back to"
        self._report(
            None, "failed", f"slot {slot}'s {info.name} v{info.version} is not signed by a threshold of root "
            f"v{root.version}'s bundle keys{then}: {why}", error="Untrusted", slot=slot, model=info.model(),
        )  # fmt: skip

    # -- the end of a deployment: failed, or forgotten once reported -------------------------------

    def _finish_failed(
        self, dep: Deployment, message: str, *, bad: bool, trial: bool, error: str = "", **detail: Any
    ) -> None:
        """Record, report (``detail`` added to the events) and forget a deployment that failed."""
        if bad and dep.sha256:
            self._bad.add(dep.sha256, dep.cmd_id, message)
        message = message[:_MAX_MESSAGE_CHARS]  # bounded: it may quote a URL or a server's words
        final = "rolled_back" if trial else "failed"
        try:
            dep = self._save_final(dep.at(final))
        except StateError as e:  # a full or read-only disk: report anyway (a restart may run it again)
            log.error("the failed deployment %s could not be recorded: %s", dep.cmd_id, e)
            dep = dep.at(final)
            self._deployment = dep
        crash_point("failure_recorded")
        self._report(dep.cmd_id, "failed", message, error=error, bad=bad, model=self.active_model, **detail)
        if trial:
            self._report(dep.cmd_id, "rolled_back", "kept the previous model", model=self.active_model, **detail)
        self._forget(dep, final)  # (cleans the slot folders the pointer does not list)
        self._publish_status()

    def _forget(self, dep: Deployment, outcome: str) -> None:
        """The deployment is over and reported: clear its record and its downloads.

        Its final events must be in the outbox first: after the record is gone nothing reports them again.
        """
        self._flush_reports()
        try:
            self._record_flushed()
            self._journal.record(dep.cmd_id, type=dep.kind, state="done", outcome=outcome, cmd=None)
            (self.state_dir / DEPLOY_FILE).unlink(missing_ok=True)
        except (StateError, OSError) as e:  # a full or read-only disk: a restart reports it again
            log.error("deployment %s ended (%s) but could not be marked done: %s", dep.cmd_id, outcome, e)
        self._deployment = None
        shutil.rmtree(self.state_dir / DOWNLOADS, ignore_errors=True)
        try:
            make_private_dir(self.state_dir / DOWNLOADS)
        except OSError as e:
            log.error("cannot create %s: %s", self.state_dir / DOWNLOADS, e)
        self._slots.clean_incoming()
        try:  # the folder a commit replaced, or the one a failed deployment staged
            self._slots.clean_unlisted(self._slots.read_pointer())
        except StateError as e:
            log.error("slot folders not cleaned: %s", e)

    # -- the record (deploy.json) and the phase it names -------------------------------------------

    def _save(self, dep: Deployment) -> Deployment:
        """Write ``deploy.json`` (a step recovery needs) and note it; ``_Interrupted`` after ``stop()``.

        The record is in place when this returns (what a restart after kill -9 reads); its fsyncs run on
        a background thread while the step it guards goes on, and ``_record_flushed`` waits for them
        before the next pointer write. A power cut before that leaves the previous record or an
        unreadable one; recovery is safe from either (docs/ota.md, "Durable state").
        """
        if self._stop.is_set():
            raise _Interrupted
        self._record_flushed()
        path = self.state_dir / DEPLOY_FILE
        write_json(path, json.loads(dep.to_bytes()), durable=False)
        self._record_flush = self._io.submit(flush_json, path)
        self._deployment = dep
        return dep

    def _note(self, dep: Deployment) -> Deployment:
        """A phase that is only reported (status, events), not written: recovery does not need it."""
        if self._stop.is_set():
            raise _Interrupted
        self._deployment = dep
        return dep

    def _save_final(self, dep: Deployment) -> Deployment:
        self._record_flushed()
        write_json(self.state_dir / DEPLOY_FILE, json.loads(dep.to_bytes()))
        self._deployment = dep
        return dep

    def _record_flushed(self) -> None:
        """Wait for the background flush of the last ``_save``.

        Raises:
            StateError: it failed.
        """
        flush, self._record_flush = self._record_flush, None
        if flush is not None:
            flush.result()

    def read_record(self) -> Deployment | None:
        path = self.state_dir / DEPLOY_FILE
        try:
            return Deployment.from_bytes(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.error("%s is unreadable (%s); the deployment it held is abandoned", path, e)
            path.unlink(missing_ok=True)
            return None

    # -- the staging helper ------------------------------------------------------------------------

    def start_stager(self) -> None:
        if self._stager is None or self._stop.is_set():
            return
        try:
            self._stager.start()
        except StagingDied as e:
            log.warning("%s; staging deployments on the agent's own thread instead", e)
            self._stager = None


class _TimedOut(HealthCheckError):
    """A trial load or health check that did not return within ``health_timeout_s``."""


class _Interrupted(Exception):
    """``stop()`` was called during a deployment; its record stays for the next start."""


def _health_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {"latency_ms": metrics.get("latency_ms"), "tolerance": metrics.get("tolerance")}


class _Failed(Exception):
    """A deployment step failed: report ``failed`` (and ``rolled_back`` when a trial had started)."""

    def __init__(self, message: str, *, bad: bool = False, trial: bool = False, error: str = "") -> None:
        super().__init__(message)
        self.bad = bad
        self.trial = trial
        self.error = error
