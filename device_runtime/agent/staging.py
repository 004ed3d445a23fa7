"""Staging a deployment: download, verify and install a bundle into the inactive slot.

``stage`` does the work; the agent runs it in a helper process (``StagingProcess``) by default, or on its
own OTA thread (``AgentConfig.staging_process=False``). Why a process: downloading, parsing the tar,
hashing and writing are Python work that, on the agent's threads, competes for the GIL with the local
callers' ``predict`` calls. On a 2-core device busy with three predict threads that made the staging steps
~1.7x slower and a whole deployment 87 ms instead of 59 ms (``benchmarks/ota_swap.py``, docs/ota.md). In
its own process the staging runs beside the callers and leaves the serving process's GIL alone; the trial
load, the health check and the switch stay in the serving process, where the model serves.

The helper speaks JSON lines: one job per line on its stdin; on its stdout ``{"ready": true}`` once
started, then per job ``{"event": "verifying"}`` when the download is complete, ``{"staged": {...}}`` or
``{"failed": {...}}``, and after ``staged`` one ``{"flushed": true}`` or ``{"flush_failed": "..."}`` when
the slot's files are on disk (the agent loads and checks the model meanwhile, and waits for it before the
pointer may name the slot). Its log goes to stderr.

Crash safety is unchanged by the process boundary: the helper never writes the pointer nor touches a
folder it lists (it installs into a new folder, which only the agent's commit names), it dies with the
agent (``PR_SET_PDEATHSIG`` on Linux, a parent watch elsewhere), and a helper that dies alone fails the
deployment without touching the serving model. The crash test hook (``device_runtime.agent.crash``) kills the agent and
the helper together at the same points as before.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from device_runtime.agent._child import die_with_parent, spawn
from device_runtime.agent.crash import crash_point, download_hook, kill_agent_too
from device_runtime.agent.download import FetchResponse, HostPolicy, HttpDownloader
from device_runtime.agent.slots import SlotStore
from device_runtime.backends import BACKENDS
from device_runtime.errors import StateError
from sdk.bundle import VerifiedBundle, read_bundle
from sdk.compat import why_incompatible
from sdk.errors import BackendError, BundleError, RollbackError, TransportError
from sdk.manifest import Manifest
from sdk.signing import TrustedKeys
from sdk.trustroot import Role, TrustRoot

__all__ = [
    "Flush",
    "StageFailure",
    "StageJob",
    "Staged",
    "StagingDied",
    "StagingProcess",
    "check_compatible",
    "stage",
]

log = logging.getLogger(__name__)

_IO_THREADS = 8  # fsyncs the helper issues at once (a slot's files and folders)
_NICE = 10  # the helper's scheduling priority below the agent's (a nice value: 0-19)
_START_TIMEOUT_S = 60.0  # the helper's imports on a slow device


def _downloader(
    attempts: int, read_timeout_s: float, hosts: HostPolicy = HostPolicy(), reserve_bytes: int = 0
) -> HttpDownloader:
    """The downloader for these settings (with the crash test hook only when the environment asks)."""
    return _cached_downloader(attempts, read_timeout_s, hosts, reserve_bytes, download_hook())


@functools.lru_cache(maxsize=4)
def _cached_downloader(
    attempts: int,
    read_timeout_s: float,
    hosts: HostPolicy,
    reserve_bytes: int,
    hook: Callable[[FetchResponse], FetchResponse] | None,
) -> HttpDownloader:
    """One per setting, kept: building one loads the CA store (milliseconds)."""
    return HttpDownloader(
        attempts=attempts, read_timeout_s=read_timeout_s, response_hook=hook, hosts=hosts, reserve_bytes=reserve_bytes
    )


# ---- the job and its result --------------------------------------------------------------------


class StageFailure(Exception):
    """The bundle was not staged: ``bad`` when the bundle itself is to blame (marked bad on the device)."""

    def __init__(self, message: str, *, bad: bool = False, error: str = "") -> None:
        super().__init__(message)
        self.bad = bad
        self.error = error


class StagingDied(Exception):
    """The helper process ended without answering (killed, out of memory, or stopped by the agent)."""


@dataclass(frozen=True)
class StageJob:
    """One deployment to stage; plain data, sent to the helper as JSON."""

    cmd_id: str
    url: str
    sha256: str  # of the whole archive, as announced
    size: int | None  # exact size in bytes, when announced
    max_bytes: int  # the download cap
    state_dir: str
    bundle_path: str  # the download's final file (skipped when it exists: a resumed deployment)
    trusted_keys: tuple[str, ...]  # raw Ed25519 public keys, hex
    threshold: int
    capabilities: Mapping[str, Any]  # _sysinfo.capabilities() of the agent
    deadline_s: float  # the whole download
    read_timeout_s: float
    attempts: int
    allow_hosts: tuple[str, ...] = ()  # HostPolicy.allow: names, addresses, networks
    public_hosts: bool = True  # HostPolicy.public
    reserve_bytes: int = 0  # free space the download must leave
    pins: tuple[str, ...] | None = None  # the trust root's pins (None: the running model's name)
    downgrades: Mapping[str, int] = field(default_factory=dict)  # the trust root's signed downgrades

    def admission(self) -> TrustRoot:
        """The trust root's rules for this job (pins, downgrades), with its bundle keys."""
        trust = self.trust()
        role = Role(tuple(sorted(trust.by_id())), trust.threshold)
        return TrustRoot(0, None, trust.by_id(), {"root": role, "bundles": role}, self.pins, dict(self.downgrades))

    @staticmethod
    def encode_trust(trust: TrustedKeys) -> tuple[tuple[str, ...], int]:
        raw = (k.public_bytes(Encoding.Raw, PublicFormat.Raw).hex() for k in trust.keys)
        return tuple(raw), trust.threshold

    def trust(self) -> TrustedKeys:
        keys = tuple(Ed25519PublicKey.from_public_bytes(bytes.fromhex(k)) for k in self.trusted_keys)
        return TrustedKeys(keys, self.threshold)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> StageJob:
        fields = {k: raw[k] for k in cls.__dataclass_fields__}
        fields["trusted_keys"] = tuple(fields["trusted_keys"])
        fields["allow_hosts"] = tuple(fields["allow_hosts"])
        fields["pins"] = None if fields["pins"] is None else tuple(fields["pins"])
        return cls(**fields)


@dataclass(frozen=True)
class Staged:
    """A bundle verified and installed for ``slot`` into a new folder (not yet named by the pointer)."""

    slot: str
    verified: VerifiedBundle  # rooted in slots/<folder>/bundle

    @property
    def folder(self) -> str:
        return self.verified.root.parent.name

    def to_json(self) -> dict[str, Any]:
        v = self.verified
        manifest = v.manifest.to_bytes().decode("utf-8")
        return {"slot": self.slot, "manifest": manifest, "root": str(v.root), "sha256": v.sha256, "keyids": v.keyids}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Staged:
        manifest = Manifest.from_bytes(raw["manifest"].encode("utf-8"))
        verified = VerifiedBundle(manifest, Path(raw["root"]), raw["sha256"], tuple(raw["keyids"]))
        return cls(raw["slot"], verified)


class Flush(Protocol):
    """The slot's files going to disk; ``wait()`` raises ``OSError`` if they could not be flushed."""

    def wait(self) -> None: ...


# ---- the work ----------------------------------------------------------------------------------


def check_compatible(manifest: Manifest, capabilities: Mapping[str, Any]) -> None:
    """The bundle's target, runtime version and CPU architecture must fit this device.

    Raises:
        BackendError: they do not.
    """
    if manifest.target not in BACKENDS:
        raise BackendError(f"this device has no backend for target {manifest.target!r}")
    # The rule the fleet chooses bundles by (sdk.compat), on this device's own facts (the OS: this one).
    why = why_incompatible(manifest, {**capabilities, "os": sys.platform})
    if why is not None:
        raise BackendError(why)


def stage(
    job: StageJob,
    *,
    trust: TrustedKeys,
    executor: Executor,
    report: Callable[[str], None],
    on_staged: Callable[[Staged], None] | None = None,
) -> tuple[Staged, Flush]:
    """Download (unless done), verify and install ``job``'s bundle into the inactive slot.

    ``report("verifying")`` when the download is complete; ``on_staged`` once the bundle is in its slot
    folder, before its fsyncs start (the trial load need not wait for them). The returned flush must be
    waited for before the pointer names the slot.

    Raises:
        StageFailure: the download failed, the bundle was refused or the slot could not be written.
    """
    store = SlotStore(job.state_dir)
    bundle_path = Path(job.bundle_path)
    if not bundle_path.exists():
        hosts = HostPolicy(job.allow_hosts, job.public_hosts)
        try:
            _downloader(job.attempts, job.read_timeout_s, hosts, job.reserve_bytes).download_file(
                job.url,
                bundle_path,
                max_length=job.max_bytes,
                expected_size=job.size,
                expected_sha256=job.sha256,
                deadline_s=job.deadline_s,
            )
        except StateError as e:  # this device's disk: full, read-only (the part file is gone)
            raise StageFailure(f"download failed: {e}", error="StateError") from e
        except (TransportError, BundleError) as e:  # IntegrityError: wrong bytes from the server
            raise StageFailure(f"download failed: {e}", error=type(e).__name__) from e
    report("verifying")
    try:
        staged = _verify_and_install(job, store, bundle_path, trust)
        if on_staged is not None:
            on_staged(staged)
        return staged, store.start_flush(staged.folder, executor)
    except (StateError, OSError) as e:  # a full disk while extracting or writing the slot
        store.clean_incoming()
        raise StageFailure(f"cannot stage: {e}", error="StateError") from e


def _verify_and_install(job: StageJob, store: SlotStore, path: Path, trust: TrustedKeys) -> Staged:
    store.clean_incoming()
    pointer = store.read_pointer()
    running = pointer.active_info.name if pointer.active_info is not None else None
    rules = job.admission()

    def floor(name: str) -> int | None:
        # The floor of the verified name, lowered only by a downgrade the trust root signed; a name the
        # root's pins (or the running model) exclude is refused here, before anything is extracted.
        return rules.effective_floor(name, pointer.floor(name), running)

    try:
        verified = read_bundle(path, trust, store.incoming / "bundle", installed_version=floor)
        if verified.sha256 != job.sha256:
            raise BundleError(f"the bundle's sha256 {verified.sha256} is not the announced {job.sha256}")
    except RollbackError as e:  # the command's fault, not the bundle's: a downgrade may be allowed later
        store.clean_incoming()
        raise StageFailure(f"refused: {e}", error=type(e).__name__) from e
    except BundleError as e:
        store.clean_incoming()
        raise StageFailure(f"verification failed: {e}", bad=True, error=type(e).__name__) from e
    try:
        check_compatible(verified.manifest, job.capabilities)
    except BackendError as e:
        store.clean_incoming()
        raise StageFailure(f"incompatible with this device: {e}", error="IncompatibleBundle") from e
    crash_point("verifying")
    store.write_meta(verified)
    crash_point("slot_write")
    # A new folder: the inactive slot's bundle (the rollback target) stays listed until the commit. Its
    # data goes to disk while the trial loads and checks it (the caller's flush, joined before the commit).
    return Staged(pointer.inactive, store.install(pointer.inactive, verified, flush=False))


# ---- the helper process ------------------------------------------------------------------------


class StagingProcess:
    """The agent's side of the helper process: ``start()`` it, ``run()`` jobs one at a time, ``close()``.

    Start and use it from one long-lived thread (the agent's OTA thread): on Linux the helper is killed
    when the thread that started it ends.
    """

    def __init__(self, *, download_attempts: int = 5, download_read_timeout_s: float = 30.0) -> None:
        self._settings = (str(download_attempts), repr(float(download_read_timeout_s)))
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # _proc and _shut, against close() from another thread
        self._shut = False

    @property
    def pid(self) -> int | None:
        """The helper's process id while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Start the helper unless it runs; returns once it is ready.

        Raises:
            StagingDied: it could not be started or did not come up.
        """
        if self.running:
            return
        if self._shut:
            raise StagingDied("the staging process was shut down")
        try:
            proc = spawn("device_runtime.agent.staging", *self._settings)
        except OSError as e:
            raise StagingDied(f"cannot start the staging process: {e}") from e
        with self._lock:
            self._proc, shut = proc, self._shut
        if shut:  # shutdown() ran meanwhile
            self.close()
            raise StagingDied("the staging process was shut down")
        try:
            message = self._read(timeout_hint=_START_TIMEOUT_S)
        except StagingDied:
            self.close()
            raise
        if message.get("ready") is not True:
            self.close()
            raise StagingDied(f"the staging process said {message!r} instead of ready")

    def run(self, job: StageJob, report: Callable[[str], None]) -> tuple[Staged, Flush]:
        """Stage ``job`` in the helper (started if needed).

        Raises:
            StageFailure: as ``stage``.
            StagingDied: the helper died or was closed; it is restarted by the next ``run``.
        """
        self.start()
        try:
            self._write(job.to_json())
            while True:
                message = self._read()
                if "event" in message:
                    report(str(message["event"]))
                elif "staged" in message:
                    return Staged.from_json(message["staged"]), _HelperFlush(self)
                elif "failed" in message:
                    failed = message["failed"]
                    raise StageFailure(str(failed["message"]), bad=bool(failed["bad"]), error=str(failed["error"]))
                else:
                    raise StagingDied(f"unexpected message from the staging process: {message!r}")
        except StageFailure:
            raise
        except BaseException:  # the helper is mid-job: do not leave it running for the next one
            self.close()
            raise

    def wait_flushed(self) -> None:
        """The message after ``staged``.

        Raises:
            OSError: the files could not be flushed, or the helper died first.
        """
        try:
            message = self._read()
        except StagingDied as e:
            self.close()
            raise OSError(str(e)) from e
        if message.get("flushed") is not True:
            raise OSError(str(message.get("flush_failed") or message))

    def shutdown(self) -> None:
        """``close()`` for good: ``start()`` refuses from now on (the agent is stopping)."""
        with self._lock:
            self._shut = True
        self.close()

    def close(self) -> None:
        """Stop the helper (at once: a job in progress is abandoned like after a crash)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

    def _write(self, message: Mapping[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise StagingDied("the staging process is not running")
        try:
            proc.stdin.write(json.dumps(message).encode("utf-8") + b"\n")
            proc.stdin.flush()
        except (OSError, ValueError) as e:  # BrokenPipe; ValueError: closed by close()
            raise StagingDied(f"the staging process is gone: {e}") from e

    def _read(self, timeout_hint: float | None = None) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdout is None:
            raise StagingDied("the staging process is not running")
        try:
            line = proc.stdout.readline()
        except (OSError, ValueError) as e:
            raise StagingDied(f"the staging process is gone: {e}") from e
        if not line:
            code = proc.wait(timeout=timeout_hint)
            raise StagingDied(f"the staging process ended (exit code {code})")
        try:
            message = json.loads(line)
        except ValueError as e:
            raise StagingDied(f"the staging process wrote {line[:200]!r}") from e
        if not isinstance(message, dict):
            raise StagingDied(f"the staging process wrote {line[:200]!r}")
        return message


class _HelperFlush:
    def __init__(self, process: StagingProcess) -> None:
        self._process = process

    def wait(self) -> None:
        self._process.wait_flushed()


# ---- the helper's side -------------------------------------------------------------------------


def _warm_up(attempts: int, read_timeout_s: float) -> None:
    """Pay the first-use costs before the first deployment does: the downloader (its CA store) and one
    verification of a throwaway bundle (lazy imports, first signature check). ~100 ms, once."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sdk.bundle import write_bundle
    from sdk.manifest import TensorSpec

    _downloader(attempts, read_timeout_s)
    key = Ed25519PrivateKey.generate()
    manifest = Manifest(
        name="warm-up", version=1, target="onnxruntime", precision="fp32", model="model.onnx",
        inputs=(TensorSpec("x", "float32", (1,)),), outputs=(TensorSpec("y", "float32", (1,)),),
        created="2026-01-01T00:00:00Z",
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="edgeship-warm-up-") as folder:
        path = Path(folder) / "warm-up.edgebundle"
        write_bundle(path, manifest, {"model.onnx": b"warm-up"}, [key])
        read_bundle(path, TrustedKeys((key.public_key(),)), Path(folder) / "bundle")


def _serve(agent_pid: int, inbox: IO[bytes], outbox: IO[bytes], *, attempts: int, read_timeout_s: float) -> None:
    kill_agent_too(agent_pid)
    die_with_parent(agent_pid)
    if hasattr(os, "nice"):  # serving first: on a busy device the scheduler prefers the callers' threads
        os.nice(_NICE)
    try:
        _warm_up(attempts, read_timeout_s)
    except Exception:  # only slower: the first job pays it
        log.exception("warm-up failed")

    def send(message: Mapping[str, Any]) -> None:
        outbox.write(json.dumps(message).encode("utf-8") + b"\n")
        outbox.flush()

    with ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="edgeship-io") as executor:
        send({"ready": True})
        for line in inbox:
            job = StageJob.from_json(json.loads(line))
            try:
                _, flush = stage(
                    job,
                    trust=job.trust(),
                    executor=executor,
                    report=lambda phase: send({"event": phase}),
                    on_staged=lambda staged: send({"staged": staged.to_json()}),
                )
            except StageFailure as e:
                send({"failed": {"message": str(e), "bad": e.bad, "error": e.error}})
                continue
            except Exception as e:  # a bug: the deployment fails, the helper stays
                log.exception("staging %s failed", job.cmd_id)
                send({"failed": {"message": f"staging failed: {e!r}", "bad": False, "error": type(e).__name__}})
                continue
            try:
                flush.wait()
            except OSError as e:
                send({"flush_failed": f"cannot flush the slot folder: {e.strerror or e}"})
                continue
            send({"flushed": True})


def main() -> None:
    """``python -m device_runtime.agent.staging AGENT_PID ATTEMPTS READ_TIMEOUT_S``: the helper process (started by
    ``StagingProcess``; the download settings are the agent's, for the warm-up)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s staging %(levelname)s %(name)s: %(message)s")
    outbox = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # the protocol owns stdout; anything printed goes to the log
    agent_pid, attempts, read_timeout_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    _serve(agent_pid, sys.stdin.buffer, outbox, attempts=attempts, read_timeout_s=read_timeout_s)


if __name__ == "__main__":
    main()
