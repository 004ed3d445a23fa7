"""``load`` a verified bundle into its backend and ``predict`` with it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_runtime._inputs import check_inputs
from device_runtime.backends import Backend, BackendOptions, create_backend
from device_runtime.errors import HealthCheckError, ModelClosedError
from device_runtime.metrics import Metrics
from device_runtime.store import BundleStore
from sdk.bundle import ReadLimits, VerifiedBundle, read_bundle
from sdk.errors import BackendError, InputError
from sdk.golden import MASK_INPUT, compare_output
from sdk.manifest import Manifest, TensorSpec
from sdk.signing import TrustedKeys

__all__ = ["Model", "load", "load_verified"]

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0  # how long close() waits for predict calls in flight, by default

Trust = TrustedKeys | Iterable[str | os.PathLike[str] | Ed25519PublicKey] | str | os.PathLike[str] | Ed25519PublicKey


class Model:
    """A verified bundle loaded in its backend. Build it with ``load``; ``close`` it when done.

    ``predict`` and ``predict_batch`` may be called from several threads at once. ``close`` lets the
    calls already running finish (it waits for them, up to a timeout) and refuses new ones with
    ``ModelClosedError``. Every call is counted in ``metrics``: successes with their latency, failures
    by kind (``input``, ``backend``, ``closed``, ``internal``).
    """

    def __init__(
        self,
        verified: VerifiedBundle,
        root: Path,
        backend: Backend,
        temp_dir: Path | None,
        metrics: Metrics | None = None,
    ) -> None:
        self.manifest: Manifest = verified.manifest
        self.bundle_sha256: str = verified.sha256
        self.root = root  # folder holding the bundle's verified files
        self.metrics: Metrics = metrics if metrics is not None else Metrics()
        self.metrics.set_backend(backend.info)
        self._backend: Backend | None = backend
        self._specs = self.manifest.inputs
        self._policy = self.manifest.input_policy
        self._valid_shapes: set[tuple[tuple[int, ...], ...]] = set()  # see check_inputs
        self._batch_dim = _stackable_dim(self.manifest)
        self._lock = threading.Lock()  # guards _backend, _closing, _in_flight
        self._idle = threading.Condition(self._lock)  # notified when the last call in flight leaves
        self._closing = False
        self._in_flight = 0
        # A private extraction folder goes with the model, even if the caller forgets close().
        self._cleanup = weakref.finalize(self, shutil.rmtree, temp_dir, True) if temp_dir is not None else None

    @property
    def signature(self) -> dict[str, list[TensorSpec]]:
        """``{"inputs": [...], "outputs": [...]}`` as the manifest declares them."""
        return {"inputs": list(self.manifest.inputs), "outputs": list(self.manifest.outputs)}

    @property
    def backend_info(self) -> dict[str, Any]:
        """Backend name, runtime version, execution providers in use and thread settings.

        Raises:
            ModelClosedError: the model was closed.
        """
        return self._live_backend().info

    @property
    def closed(self) -> bool:
        """True once ``close()`` has started."""
        return self._closing or self._backend is None

    def _live_backend(self) -> Backend:
        if self._closing or self._backend is None:
            raise ModelClosedError(f"model {self.manifest.name} v{self.manifest.version} is closed; load it again")
        return self._backend

    def _enter(self) -> Backend:
        """Register a call in flight and return the backend; ``ModelClosedError`` once closing."""
        with self._lock:
            backend = self._live_backend()
            self._in_flight += 1
            return backend

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._closing and self._in_flight == 0:
                self._idle.notify_all()

    def _count_error(self, error: BaseException) -> None:
        if isinstance(error, InputError):
            kind = "input"
        elif isinstance(error, ModelClosedError):
            kind = "closed"
        elif isinstance(error, BackendError):
            kind = "backend"
        else:
            kind = "internal"
        self.metrics.error(kind)

    def predict(self, inputs: Mapping[str, Any], *, queue_s: float = 0.0) -> dict[str, np.ndarray]:
        """Run the model once.

        Args:
            inputs: input name -> numpy array or nested list; see ``device_runtime._inputs`` for the
                dtype, shape and input-policy rules.
            queue_s: seconds the request waited before this call (a server's queue), for ``metrics``.

        Returns:
            Output name -> array, in the manifest's output order.

        Raises:
            ModelClosedError: the model was closed.
            InputError: inputs do not match the declared names, dtypes or shapes, or the manifest's
                input policy (NaN/Inf, dimension ranges, byte cap); nothing was run.
            BackendError: the runtime failed.
        """
        start = time.perf_counter()
        try:
            backend = self._enter()
            try:
                outputs = backend.run(check_inputs(self._specs, inputs, self._policy, self._valid_shapes))
            finally:
                self._leave()
        except Exception as e:
            self._count_error(e)
            raise
        self.metrics.observe(time.perf_counter() - start, queue_s)
        return outputs

    def predict_batch(self, batch: Sequence[Mapping[str, Any]], *, queue_s: float = 0.0) -> list[dict[str, np.ndarray]]:
        """Run the model on several input mappings; one result per item, in order.

        The items are stacked into one runtime call when the model allows it: every input and output
        starts with the same dynamic dimension (``"batch"``), the items agree on the other dimensions,
        and the stacked inputs stay inside the input policy. Otherwise they run one by one. The
        results are the same either way; each item counts as one inference in ``metrics``.

        Args:
            batch: a list of input mappings, each as ``predict`` takes it.
            queue_s: seconds the request waited before this call, for ``metrics``.

        Returns:
            One ``{output name: array}`` per item.

        Raises:
            ModelClosedError: the model was closed.
            InputError: ``batch`` is not a list of mappings, or an item does not fit the model (the
                message names the item); nothing was run.
            BackendError: the runtime failed.
        """
        start = time.perf_counter()
        try:
            if isinstance(batch, (Mapping, str, bytes)) or not isinstance(batch, Sequence):
                raise InputError(f"predict_batch takes a list of input mappings, got {type(batch).__name__}")
            backend = self._enter()
            try:
                results = self._run_batch(backend, batch)
            finally:
                self._leave()
        except Exception as e:
            self._count_error(e)
            raise
        elapsed = time.perf_counter() - start
        for _ in results:
            self.metrics.observe(elapsed, queue_s)
        return results

    def _run_batch(self, backend: Backend, batch: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
        feeds: list[dict[str, np.ndarray]] = []
        for index, item in enumerate(batch):
            try:
                feeds.append(check_inputs(self._specs, item, self._policy, self._valid_shapes))
            except InputError as e:
                raise InputError(f"batch item {index}: {e}") from e
        stacked = self._stack(feeds)
        if stacked is None:
            return [backend.run(f) for f in feeds]
        merged, sizes = stacked
        outputs = backend.run(merged)
        total = sum(sizes)
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise BackendError(f"output {name!r} has shape {list(array.shape)}, expected {total} rows first")
        cuts = np.cumsum(sizes)[:-1]
        parts = {name: np.split(array, cuts) for name, array in outputs.items()}
        return [{name: parts[name][i] for name in outputs} for i in range(len(sizes))]

    def _stack(self, feeds: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[int]] | None:
        """Concatenated feeds and each item's row count, or None when the items must run one by one."""
        if self._batch_dim is None or len(feeds) < 2:
            return None
        first = self._specs[0].name
        sizes = [f[first].shape[0] for f in feeds]
        for spec in self._specs:
            if len({f[spec.name].shape[1:] for f in feeds}) != 1:
                return None
        bounds = self._policy.ranges.get(self._batch_dim)
        if bounds is not None and sum(sizes) > bounds[1]:
            return None
        total_bytes = sum(a.nbytes for f in feeds for a in f.values())
        if self._policy.max_bytes is not None and total_bytes > self._policy.max_bytes:
            return None
        merged = {spec.name: np.concatenate([f[spec.name] for f in feeds]) for spec in self._specs}
        return merged, sizes

    def health_check(self) -> dict[str, Any]:
        """Run the bundle's golden inputs and compare the outputs with its golden outputs.

        Returns:
            ``{"passed": True, "latency_ms", "tolerance", "outputs": {name: metrics}}``.

        Raises:
            ModelClosedError: the model was closed.
            HealthCheckError: (an ``IntegrityError``) no golden arrays, unreadable or ill-fitting golden
                arrays, NaN, or outputs outside the tolerance; ``.metrics`` holds what was measured.
            BackendError: the runtime failed.
        """
        self._live_backend()
        tolerance = self.manifest.golden.rule  # typed and checked when the manifest was read
        inputs = self._golden_arrays("inputs")
        expected = self._golden_arrays("outputs")
        declared = [spec.name for spec in self.manifest.outputs]
        unknown = sorted(set(expected) - set(declared))
        if unknown:
            raise HealthCheckError(f"health check: golden outputs {unknown} are not outputs of the model")

        start = time.perf_counter()
        backend = self._enter()  # not counted in metrics: a health check is not traffic
        try:
            outputs = backend.run(check_inputs(self._specs, inputs, self._policy, self._valid_shapes))
        except InputError as e:
            raise HealthCheckError(f"health check: the golden inputs do not fit the model: {e}") from e
        finally:
            self._leave()
        latency_ms = (time.perf_counter() - start) * 1000.0

        mask = inputs.get(MASK_INPUT)  # padded positions of token-level outputs are not compared
        per_output = {name: compare_output(outputs[name], expected[name], tolerance, mask) for name in expected}
        failed = [f"{name}: {m['reason']}" for name, m in per_output.items() if not m["passed"]]
        metrics = {
            "passed": not failed,
            "latency_ms": round(latency_ms, 3),
            "tolerance": tolerance.to_dict(),
            "outputs": per_output,
        }
        if failed:
            raise HealthCheckError(
                f"health check of {self.manifest.name} v{self.manifest.version} failed: {'; '.join(failed)}", metrics
            )
        return metrics

    def _golden_arrays(self, side: str) -> dict[str, np.ndarray]:
        paths = self.manifest.golden.inputs if side == "inputs" else self.manifest.golden.outputs
        if not paths:
            raise HealthCheckError(f"health check: bundle {self.manifest.name} carries no golden {side}")
        arrays: dict[str, np.ndarray] = {}
        for name, member in paths.items():
            try:
                arrays[name] = np.load(self.root / member, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise HealthCheckError(
                    f"health check: golden {side[:-1]} {name!r} ({member}) is unreadable: {e}"
                ) from e
        return arrays

    def close(self, timeout: float | None = CLOSE_TIMEOUT_S) -> None:
        """Refuse new calls, let the ones running finish, then release the backend; idempotent.

        Also removes a private extraction folder.

        Args:
            timeout: seconds to wait for calls in flight (None: as long as they take). Past it the
                backend is released anyway (a call still running keeps its runtime session alive
                until it returns) and a warning is logged.
        """
        with self._idle:
            self._closing = True
            finished = self._idle.wait_for(lambda: self._in_flight == 0, timeout)
            backend, self._backend = self._backend, None
        if not finished:
            log.warning("closing %s with %d call(s) still running after %ss", self, self._in_flight, timeout)
        if backend is not None:
            backend.close()
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> Model:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Model {self.manifest.name} v{self.manifest.version} {self.manifest.target} ({state})>"


def _stackable_dim(manifest: Manifest) -> str | None:
    """The dynamic dimension items can be stacked along, or None.

    Every input and output must start with the same named dimension, used nowhere else in them.
    """
    specs = (*manifest.inputs, *manifest.outputs)
    first = specs[0].shape[0] if specs[0].shape else None
    if not isinstance(first, str):
        return None
    for spec in specs:
        if not spec.shape or spec.shape[0] != first or first in spec.shape[1:]:
            return None
    return first


def load(
    path: str | os.PathLike[str],
    trust: Trust,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    allow_downgrade: bool = False,
    now: datetime | None = None,
    limits: ReadLimits | None = None,
    providers: Iterable[str] | None = None,
    intra_op_threads: int | None = None,
    device: str | None = None,
    performance_hint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    compute_units: str | None = None,
    metrics: Metrics | None = None,
) -> Model:
    """Verify a bundle completely, then load it in the backend its target needs.

    Args:
        path: the ``.edgebundle`` file.
        trust: a ``TrustedKeys``, or public keys / public key file paths (threshold 1).
        state_dir: a ``BundleStore`` folder: the bundle is installed there and its version recorded,
            and a version lower than one recorded before is refused. Without it, the bundle is extracted
            to a private temporary folder that ``close()`` removes, and no version history is kept.
        allow_downgrade: accept a version lower than the highest recorded in ``state_dir``.
        now: the time to check ``expires`` against (default: the clock).
        limits: caps for reading the archive (default ``ReadLimits()``).
        providers: ONNX Runtime execution providers to use instead of the bundle's; at least one of
            them must be available. CPU is added as the fallback.
        intra_op_threads: threads inside one operator (default: the runtime's choice).
        device: OpenVINO bundles: the device (CPU, GPU, NPU, AUTO) instead of the bundle's.
        performance_hint: OpenVINO bundles: LATENCY or THROUGHPUT instead of the bundle's.
        cache_dir: OpenVINO bundles: a folder for compiled models, so a restart does not recompile.
        compute_units: Core ML bundles: ALL, CPU_ONLY, CPU_AND_NE or CPU_AND_GPU instead of the bundle's.
        metrics: count this model's calls in an existing ``Metrics`` (one that outlives model swaps);
            default a new one.

    Returns:
        The loaded model. A bundle is recorded in ``state_dir`` only once its backend has loaded it.

    Raises:
        KeyFileError: a trusted key file is missing or malformed.
        BundleError: the bundle failed verification (``SignatureError``, ``IntegrityError``,
            ``RollbackError``, ``ExpiredError``, ``ManifestError``, ``UnsafeArchiveError``).
        BackendError: no adapter for the bundle's target, its runtime is not installed (the message names
            the extra), or the runtime cannot load the model.
        StateError: ``state_dir`` is corrupt or cannot be written.
        In every case nothing is installed and ``state_dir`` is left as it was.
    """
    trusted = TrustedKeys.coerce(trust)  # type: ignore[arg-type]
    limits = limits or ReadLimits()
    options = _backend_options(providers, intra_op_threads, device, performance_hint, cache_dir, compute_units)
    if state_dir is None:
        temp_dir = Path(tempfile.mkdtemp(prefix="edgeship-model-"))
        try:
            verified = read_bundle(path, trusted, temp_dir / "bundle", now=now, limits=limits)
            backend = _load_backend(verified, options)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return Model(verified, verified.root, backend, temp_dir, metrics)

    store = BundleStore(state_dir)
    staged = store.stage(path, trusted, allow_downgrade=allow_downgrade, now=now, limits=limits)
    try:
        backend = _load_backend(staged.verified, options)
    except BaseException:
        staged.discard()
        raise
    try:
        installed = staged.commit()
    except BaseException:
        backend.close()
        raise
    return Model(staged.verified, installed.path, backend, None, metrics)


def load_verified(
    verified: VerifiedBundle,
    *,
    providers: Iterable[str] | None = None,
    intra_op_threads: int | None = None,
    device: str | None = None,
    performance_hint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    compute_units: str | None = None,
    metrics: Metrics | None = None,
) -> Model:
    """Load a bundle that ``sdk.bundle.read_bundle`` has already verified into ``verified.root``.

    For callers that manage their own install folders (the OTA agent's A/B slots); the folder
    stays the caller's: ``close()`` does not remove it. The backend settings and ``metrics`` as for ``load``.

    Raises:
        BackendError: no adapter for the target, its runtime is missing, or it cannot load the model.
    """
    options = _backend_options(providers, intra_op_threads, device, performance_hint, cache_dir, compute_units)
    return Model(verified, verified.root, _load_backend(verified, options), None, metrics)


def _backend_options(
    providers: Iterable[str] | None,
    intra_op_threads: int | None,
    device: str | None,
    performance_hint: str | None,
    cache_dir: str | os.PathLike[str] | None,
    compute_units: str | None,
) -> BackendOptions:
    if isinstance(providers, str):  # one name, not its characters
        providers = [providers]
    return BackendOptions(
        providers=tuple(providers) if providers is not None else None,
        intra_op_threads=intra_op_threads,
        device=device,
        performance_hint=performance_hint,
        cache_dir=os.fspath(cache_dir) if cache_dir else None,
        compute_units=compute_units,
    )


def _load_backend(verified: VerifiedBundle, options: BackendOptions) -> Backend:
    backend = create_backend(verified.manifest.target)
    # The session reads the model file while loading; the folder may move afterwards (store commit).
    backend.load(verified.path(verified.manifest.model), verified.manifest, options)
    return backend
