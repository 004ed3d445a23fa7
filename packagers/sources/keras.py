"""The ``keras`` input kind: a ``keras.Model``, a ``.keras`` / ``.h5`` file, or a TF SavedModel folder.

Everything is normalised to a SavedModel folder (``Source.native``) whose ``serving_default``
signature the TFLite converter reads. Specs come from that signature with the user's input names
(the Keras input names), the first dimension named ``batch`` and other unknown dimensions named
``dim<i>``. The reference is the Keras model itself (or the SavedModel's signature) on numpy.
TensorFlow and Keras are imported inside the functions.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packagers._quiet import quiet
from packagers.sources.base import Source, dtype_name
from packagers.sources.data import choose_validation
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec

if TYPE_CHECKING:
    from packagers.options import PackageOptions

__all__ = ["SIGNATURE", "is_keras_model", "is_keras_path", "keras_source"]

SIGNATURE = "serving_default"
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_OUTPUT_INDEX = re.compile(r"output_(\d+)")


def is_keras_path(path: Path) -> bool:
    """A SavedModel folder (holds ``saved_model.pb``) or a saved Keras model file."""
    if path.is_dir():
        return (path / "saved_model.pb").is_file()
    return path.suffix.lower() in KERAS_SUFFIXES


def is_keras_model(model: Any) -> bool:
    """A Keras model object (Keras 3 or tf-keras); only checks modules the caller imported already."""
    for name in ("keras", "tf_keras"):
        module = sys.modules.get(name)
        model_class = getattr(module, "Model", None) if module is not None else None
        if isinstance(model_class, type) and isinstance(model, model_class):
            return True
    return False


def _sorted_outputs(names: Sequence[str]) -> list[str]:
    """Signature output names in the model's order (``output_0``, ``output_1``, ... sort by index)."""

    def key(name: str) -> tuple[int, str]:
        match = _OUTPUT_INDEX.fullmatch(name)
        return (int(match.group(1)) if match else 1 << 30, name)

    return sorted(names, key=key)


def _dims(shape: Sequence[int | None], name: str) -> tuple[int | str, ...]:
    if not shape:
        raise PackagingError(f"keras input/output {name!r} is a scalar; models need a batch dimension first")
    dims: list[int | str] = ["batch"]
    dims += [f"dim{i}" if d is None else int(d) for i, d in enumerate(shape[1:], start=1)]
    return tuple(dims)


def _load(model: Any, scratch: Path, progress: Callable[[str], None]) -> tuple[Path, Any, str]:
    """The SavedModel folder, the Keras model (None for a bare SavedModel) and a description."""
    import keras

    if is_keras_model(model):
        keras_model, what = model, f"keras model {type(model).__name__}"
    else:
        path = Path(model)
        if path.is_dir():
            return path, None, f"SavedModel {path.name}"
        progress(f"loading keras model {path}")
        try:
            keras_model = keras.models.load_model(path, compile=False)
        except Exception as e:  # corrupt file, unknown custom layer, wrong format: all unusable
            raise PackagingError(f"cannot load the keras model {path}: {type(e).__name__}: {e}") from e
        what = f"keras model {path.name}"
    if not getattr(keras_model, "inputs", None):
        raise PackagingError(
            f"{what} has no defined inputs (a subclassed model never called?); build it with keras.Input "
            "or give a SavedModel folder"
        )
    progress("exporting the keras model to a SavedModel")
    saved = scratch / "saved_model"
    try:
        keras_model.export(str(saved), format="tf_saved_model", verbose=False)
    except Exception as e:  # ops TF cannot trace: report them
        raise PackagingError(f"cannot export {what} to a SavedModel: {type(e).__name__}: {e}") from e
    return saved, keras_model, what


def _signature(saved: Path) -> Any:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(saved))
        signature = loaded.signatures[SIGNATURE]
    except KeyError:
        raise PackagingError(f"the SavedModel {saved} has no {SIGNATURE!r} signature") from None
    except Exception as e:  # unreadable folder
        raise PackagingError(f"cannot load the SavedModel {saved}: {type(e).__name__}: {e}") from e
    return loaded, signature


def keras_source(
    model: Any,
    example_inputs: Any,
    data: Mapping[str, np.ndarray] | None,
    task: str | None,
    options: PackageOptions,
    progress: Callable[[str], None],
) -> Source:
    """Load a Keras model or SavedModel as a Source.

    Args:
        model: a ``keras.Model``, a ``.keras``/``.h5`` file path or a SavedModel folder path.
        example_inputs: optional arrays (dict by input name, or one array / a tuple in input order)
            whose shapes and value ranges shape the generated validation data.
        data: calibration arrays by input name (validation data), or None.
        task: recorded as is.
        options: seed, sample counts and ``dim_values`` for unknown dimensions.
        progress: called with a short line at each step.

    Raises:
        PackagingError: the model cannot be loaded, exported or run, or the data do not fit it.
    """
    with quiet("tensorflow"):  # TF's C++ info lines are noise on the CLI
        import tensorflow as tf

    scratch = Path(tempfile.mkdtemp(prefix="edgeship-keras-"))
    try:
        saved, keras_model, what = _load(model, scratch, progress)
        loaded, signature = _signature(saved)
        sig_inputs: dict[str, Any] = dict(signature.structured_input_signature[1])
        sig_outputs: dict[str, Any] = dict(signature.structured_outputs)
        out_keys = _sorted_outputs(list(sig_outputs))
        if keras_model is not None:
            names = [str(t.name) for t in keras_model.inputs]
            if set(names) != set(sig_inputs):
                raise PackagingError(f"the SavedModel's inputs {sorted(sig_inputs)} differ from the model's {names}")
            user_outputs = [str(n) for n in (getattr(keras_model, "output_names", None) or [])]
            if len(user_outputs) != len(out_keys) or len(set(user_outputs)) != len(user_outputs):
                user_outputs = list(out_keys)
        else:
            names, user_outputs = sorted(sig_inputs), list(out_keys)
        if set(user_outputs) & set(names):
            raise PackagingError(f"output names {user_outputs} clash with input names {names}")

        inputs = tuple(
            TensorSpec(n, dtype_name(sig_inputs[n].dtype.as_numpy_dtype), _dims(sig_inputs[n].shape.as_list(), n))
            for n in names
        )
        outputs = tuple(
            TensorSpec(u, dtype_name(sig_outputs[k].dtype.as_numpy_dtype),
                       _dims(sig_outputs[k].shape.as_list(), u))
            for u, k in zip(user_outputs, out_keys, strict=True)
        )  # fmt: skip
        out_map = dict(zip(out_keys, user_outputs, strict=True))

        def reference(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            tensors = {n: tf.constant(np.ascontiguousarray(feeds[n])) for n in names}
            if keras_model is not None:
                raw = keras_model([tensors[n] for n in names] if len(names) > 1 else tensors[names[0]], training=False)
                values = (
                    raw if isinstance(raw, (list, tuple)) else list(raw.values()) if isinstance(raw, dict) else [raw]
                )
                return {u: np.asarray(v) for u, v in zip(user_outputs, values, strict=True)}
            result = signature(**tensors)
            return {out_map[k]: np.asarray(v) for k, v in result.items()}

        examples = _examples(example_inputs, names) if data is None and example_inputs is not None else None
        validation, origin = choose_validation(inputs, options, data=data, examples=examples)
        try:
            reference({k: v[:1] for k, v in validation.items()})
        except Exception as e:  # the user's model failed on data of its own signature
            raise PackagingError(f"{what} failed on validation data: {type(e).__name__}: {e}") from e
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    del loaded  # the signature keeps what it needs alive

    def close() -> None:
        shutil.rmtree(scratch, ignore_errors=True)

    import keras

    return Source(
        kind="keras",
        description=what,
        inputs=inputs,
        outputs=outputs,
        reference=reference,
        reference_name=f"tensorflow {tf.__version__} / keras {keras.__version__}",
        validation_inputs=validation,
        data_origin=origin,
        task=task,
        info={"saved_model_signature": SIGNATURE, "tensorflow": tf.__version__, "keras": keras.__version__},
        close_fn=close,
        native=saved,
    )


def _examples(example_inputs: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    if isinstance(example_inputs, Mapping):
        examples = {str(k): np.asarray(v) for k, v in example_inputs.items()}
    else:
        values = [example_inputs] if isinstance(example_inputs, np.ndarray) else list(example_inputs)
        if len(values) != len(names):
            raise PackagingError(f"{len(values)} example inputs for the model's inputs {list(names)}")
        examples = {n: np.asarray(v) for n, v in zip(names, values, strict=True)}
    if set(examples) != set(names):
        raise PackagingError(f"example inputs {sorted(examples)} differ from the model's inputs {list(names)}")
    return examples
