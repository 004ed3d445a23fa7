"""``load`` a verified bundle into its backend and ``predict`` with it."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_runtime._health import Tolerance, compare_output
from device_runtime._inputs import check_inputs
from device_runtime.backends import Backend, BackendOptions, create_backend
from device_runtime.errors import HealthCheckError, ModelClosedError
from device_runtime.store import BundleStore
from sdk.bundle import ReadLimits, VerifiedBundle, read_bundle
from sdk.errors import InputError, ManifestError
from sdk.manifest import Manifest, TensorSpec
from sdk.signing import TrustedKeys

__all__ = ["Model", "load", "load_verified"]

Trust = TrustedKeys | Iterable[str | os.PathLike[str] | Ed25519PublicKey] | str | os.PathLike[str] | Ed25519PublicKey


class Model:
    """A verified bundle loaded in its backend. Build it with ``load``; ``close`` it when done.

    ``predict`` may be called from several threads at once (the ONNX Runtime session allows it);
    ``close`` must not race with them.
    """

    def __init__(self, verified: VerifiedBundle, root: Path, backend: Backend, temp_dir: Path | None) -> None:
        self.manifest: Manifest = verified.manifest
        self.bundle_sha256: str = verified.sha256
        self.root = root  # folder holding the bundle's verified files
        self._backend: Backend | None = backend
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
        return self._backend is None

    def _live_backend(self) -> Backend:
        if self._backend is None:
            raise ModelClosedError(f"model {self.manifest.name} v{self.manifest.version} is closed; load it again")
        return self._backend

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the model once.

        Args:
            inputs: input name -> numpy array or nested list; see ``device_runtime._inputs`` for the
                dtype and shape rules.

        Returns:
            Output name -> array, in the manifest's output order.

        Raises:
            ModelClosedError: the model was closed.
            InputError: inputs do not match the declared names, dtypes or shapes (nothing was run).
            BackendError: the runtime failed.
        """
        backend = self._live_backend()
        return backend.run(check_inputs(self.manifest.inputs, inputs))

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
        golden = self.manifest.golden
        try:
            tolerance = Tolerance.from_manifest(golden)
        except ManifestError as e:
            raise HealthCheckError(f"health check: {e}") from e
        inputs = self._golden_arrays("inputs")
        expected = self._golden_arrays("outputs")
        declared = [spec.name for spec in self.manifest.outputs]
        unknown = sorted(set(expected) - set(declared))
        if unknown:
            raise HealthCheckError(f"health check: golden outputs {unknown} are not outputs of the model")

        start = time.perf_counter()
        try:
            outputs = self.predict(inputs)
        except InputError as e:
            raise HealthCheckError(f"health check: the golden inputs do not fit the model: {e}") from e
        latency_ms = (time.perf_counter() - start) * 1000.0

        per_output = {name: compare_output(outputs[name], expected[name], tolerance) for name in expected}
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
        paths = self.manifest.golden.get(side)
        if not isinstance(paths, Mapping) or not paths:
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

    def close(self) -> None:
        """Release the backend and remove a private extraction folder; idempotent."""
        backend, self._backend = self._backend, None
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
    if isinstance(providers, str):  # one name, not its characters
        providers = [providers]
    options = BackendOptions(
        providers=tuple(providers) if providers is not None else None, intra_op_threads=intra_op_threads
    )
    if state_dir is None:
        temp_dir = Path(tempfile.mkdtemp(prefix="edgeship-model-"))
        try:
            verified = read_bundle(path, trusted, temp_dir / "bundle", now=now, limits=limits)
            backend = _load_backend(verified, options)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return Model(verified, verified.root, backend, temp_dir)

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
    return Model(staged.verified, installed.path, backend, None)


def load_verified(
    verified: VerifiedBundle, *, providers: Iterable[str] | None = None, intra_op_threads: int | None = None
) -> Model:
    """Load a bundle that ``sdk.bundle.read_bundle`` has already verified into ``verified.root``.

    For callers that manage their own install folders (the OTA agent's A/B slots); the folder
    stays the caller's: ``close()`` does not remove it.

    Raises:
        BackendError: no adapter for the target, its runtime is missing, or it cannot load the model.
    """
    if isinstance(providers, str):
        providers = [providers]
    options = BackendOptions(
        providers=tuple(providers) if providers is not None else None, intra_op_threads=intra_op_threads
    )
    return Model(verified, verified.root, _load_backend(verified, options), None)


def _load_backend(verified: VerifiedBundle, options: BackendOptions) -> Backend:
    backend = create_backend(verified.manifest.target)
    # The session reads the model file while loading; the folder may move afterwards (store commit).
    backend.load(verified.path(verified.manifest.model), verified.manifest, options)
    return backend
