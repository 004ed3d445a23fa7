"""The ``transformers`` input kind: a model folder saved with ``save_pretrained``.

The task (given, else from the config's architecture) picks the head and so the one output. The
folder's tokenizer or image processor becomes the device's preprocessing (``Source.preprocessing``,
the manifest's ``preprocessing``; docs/bundle-format.md section 4.5) and the validation data go
through it: the caller's sentences or images, else built-in sentences or synthetic images, else
(no tokenizer) random ids. torch, transformers and PIL are imported inside the functions.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packagers._quiet import quiet
from packagers.options import PackageOptions
from packagers.sources._torch_export import torch2onnx
from packagers.sources.base import Arrays, OnnxExport, Source, dtype_name
from packagers.sources.data import fit_data
from packagers.sources.torch import torch_reference, torch_version
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec

__all__ = ["PREPROCESSOR_MEMBER", "SENTENCES", "TASKS", "TOKENIZER_FILES", "transformers_source"]

TASKS = ("feature-extraction", "text-classification", "token-classification", "image-classification")
# Files a transformers tokenizer may need at run time; those present are copied into the bundle.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "spm.model",
    "sentencepiece.bpe.model",
)
_TOKENIZER_CORE = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "spm.model",
                   "sentencepiece.bpe.model")  # fmt: skip
# Built-in validation text for models that ship a tokenizer (varied lengths exercise the padding).
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices run small models close to the data.",
    "I loved this film, the acting was wonderful!",
    "This was the worst service I have ever had.",
    "Shipping is free for orders over fifty euros.",
    "Is the meeting on Tuesday or on Thursday?",
    "A cat sat on the mat.",
    "The update rolled out to ten percent of the fleet before a gate paused it.",
    "Temperatures will drop sharply overnight.",
    "Please restart the device and try again.",
    "Neural networks approximate functions.",
    "What time does the train leave?",
    "Great value, would buy again.",
    "Terrible battery life and a cracked screen.",
    "Hello world",
    "The sensor reported an anomaly at noon, and the model flagged it within a second.",
)


# task -> (transformers Auto class, output name); the task decides the head and so the output.
_TASK_MODELS = {
    "feature-extraction": ("AutoModel", "last_hidden_state"),
    "text-classification": ("AutoModelForSequenceClassification", "logits"),
    "token-classification": ("AutoModelForTokenClassification", "logits"),
    "image-classification": ("AutoModelForImageClassification", "logits"),
}
_ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForImageClassification", "image-classification"),
)
# sentence-transformers Pooling modes the device implements (config key -> manifest name).
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
PREPROCESSOR_MEMBER = "preprocessor/preprocessor_config.json"


@dataclass
class _Prepared:
    """The input side of a transformers source: what the model takes, the data, and the device's preprocessing."""

    inputs: tuple[TensorSpec, ...]
    arrays: Arrays
    origin: str
    axes: dict[str, dict[int, str]]
    preprocessing: dict[str, Any] = field(default_factory=dict)
    members: dict[str, Path | bytes] = field(default_factory=dict)
    input_policy: dict[str, Any] = field(default_factory=dict)


def _tokenizer_files(folder: Path) -> list[str]:
    if not any((folder / f).is_file() for f in _TOKENIZER_CORE):
        return []
    return [f for f in TOKENIZER_FILES if (folder / f).is_file()]


def _default_task(architectures: Sequence[str]) -> str:
    for suffix, task in _ARCHITECTURE_TASKS:
        if any(a.endswith(suffix) for a in architectures):
            return task
    return "feature-extraction"


def _labels(config: Any) -> list[str]:
    """Class names by index from the config's id2label (keys may be ints or strings)."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(int(config.num_labels))]


def _pooling(folder: Path) -> dict[str, Any]:
    """The sentence-embedding pooling a feature-extraction bundle declares.

    A sentence-transformers folder says how it pools (``1_Pooling/config.json``) and whether it
    normalises (a ``Normalize`` module); any other folder gets masked mean pooling, unnormalised.

    Raises:
        PackagingError: the folder asks for a pooling the device does not implement.
    """
    modules: list[dict[str, Any]] = []
    if (folder / "modules.json").is_file():
        try:
            modules = list(json.loads((folder / "modules.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise PackagingError(f"cannot read {folder / 'modules.json'}: {e}") from e
    pool_dirs = [str(m.get("path", "")) for m in modules if str(m.get("type", "")).endswith("Pooling")]
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules) or (folder / "2_Normalize").is_dir()
    config_path = folder / (pool_dirs[0] if pool_dirs else "1_Pooling") / "config.json"
    if not config_path.is_file():
        return {"mode": "mean", "normalize": normalize, "source": "default"}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PackagingError(f"cannot read the sentence-transformers pooling config {config_path}: {e}") from e
    modes = [k for k, v in config.items() if k.startswith("pooling_mode") and v is True]
    if len(modes) != 1 or modes[0] not in _POOLING_MODES:
        raise PackagingError(
            f"{config_path} asks for pooling {modes}; the device implements exactly one of "
            f"{', '.join(sorted(_POOLING_MODES))}"
        )
    return {"mode": _POOLING_MODES[modes[0]], "normalize": normalize, "source": str(config_path.relative_to(folder))}


def _text_inputs(
    folder: Path, config: Any, model: Any, data: Arrays | None, sentences: list[str] | None, options: PackageOptions
) -> _Prepared:
    """Input names, validation ids and the tokenizer contract of a text model."""
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        raise PackagingError(f"{type(model).__name__} does not take input_ids; text tasks need a text model")
    input_names = ["input_ids"]
    if "attention_mask" in params:
        input_names.append("attention_mask")
    if "token_type_ids" in params and int(getattr(config, "type_vocab_size", 0) or 0) > 0:
        input_names.append("token_type_ids")
    vocab_size = int(getattr(config, "vocab_size", 0) or 0)
    max_positions = int(getattr(config, "max_position_embeddings", 0) or 512)
    max_length = max_positions
    prepared = _Prepared(inputs=(), arrays={}, origin="", axes={n: {0: "batch", 1: "sequence"} for n in input_names})

    tok_files = _tokenizer_files(folder)
    tokenizer = None
    if tok_files:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # broken tokenizer files must not be shipped
            raise PackagingError(f"cannot load the tokenizer in {folder}: {type(e).__name__}: {e}") from e
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:  # the device tokenizes with the `tokenizers` package only
            raise PackagingError(f"the tokenizer in {folder} has no fast (tokenizers) form the device could run")
        model_max = getattr(tokenizer, "model_max_length", None) or max_positions
        max_length = int(min(model_max if model_max < 10**6 else max_positions, max_positions))
        prepared.members = {f"tokenizer/{f}": folder / f for f in tok_files}
        # The device runs exactly the pipeline transformers ran here (transformers may rebuild parts of
        # it, e.g. the decoder), without per-call truncation or padding: those are declared below.
        effective = json.loads(backend.to_str())
        effective["truncation"] = effective["padding"] = None
        prepared.members["tokenizer/tokenizer.json"] = json.dumps(effective, ensure_ascii=False).encode("utf-8")
        pad_id = tokenizer.pad_token_id
        prepared.preprocessing["tokenizer"] = {
            "files": sorted(prepared.members),
            "class": type(tokenizer).__name__,
            "max_length": max_length,
            "truncation": True,
            "truncation_strategy": "longest_first",
            "truncation_side": str(tokenizer.truncation_side),
            "padding": "longest",
            "padding_side": str(tokenizer.padding_side),
            "pad_token": tokenizer.pad_token,
            "pad_id": int(pad_id) if pad_id is not None else None,
            "pad_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
            "add_special_tokens": True,
            "model_input_names": [str(n) for n in tokenizer.model_input_names],
        }

    if data is not None:
        raw, origin = dict(data), "calibration"
    elif tokenizer is not None:
        texts = sentences if sentences is not None else list(SENTENCES)
        enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="np")
        raw = {n: np.asarray(enc[n]).astype(np.int64) for n in input_names if n in enc}
        if "token_type_ids" in input_names and "token_type_ids" not in raw:
            raw["token_type_ids"] = np.zeros_like(raw["input_ids"])
        if "attention_mask" in input_names and "attention_mask" not in raw:
            raw["attention_mask"] = np.ones_like(raw["input_ids"])
        if vocab_size and int(raw["input_ids"].max()) >= vocab_size:
            raise PackagingError(f"the tokenizer in {folder} produces ids beyond the model's vocab_size {vocab_size}")
        origin = (
            f"{len(texts)} calibration sentences through the bundled tokenizer"
            if sentences is not None
            else f"{len(texts)} built-in sentences through the bundled tokenizer"
        )
    elif sentences is not None:
        raise PackagingError(f"calibration sentences need a tokenizer, and {folder} has none (save it with the model)")
    else:
        rng = np.random.default_rng(options.seed)
        n, length = options.validation_samples, min(options.sequence_length, max_positions)
        ids = rng.integers(0, max(vocab_size, 2), size=(n, length)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1::2, length - max(length // 4, 1) :] = 0  # pad the tail of every other sample
        raw = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        raw = {k: v for k, v in raw.items() if k in input_names}
        origin = f"random token ids within the vocabulary (seed {options.seed})"

    prepared.inputs = tuple(TensorSpec(n, "int64", ("batch", "sequence")) for n in input_names)
    prepared.arrays = fit_data(raw, prepared.inputs)
    prepared.origin = origin
    length = prepared.arrays["input_ids"].shape[1]
    if length > max_length:
        raise PackagingError(f"calibration sequences have {length} tokens; the model takes at most {max_length}")
    # The device truncates to max_length, so a longer sequence is a caller's mistake worth refusing.
    prepared.input_policy = {"nonfinite": "reject", "dims": {"sequence": [1, max_length]}}
    return prepared


def _image_contract(processor: Any, folder: Path) -> dict[str, Any]:
    """What the device does to an image, from the image processor that saved ``preprocessor_config.json``.

    Raises:
        PackagingError: the processor resizes in a way the device does not implement (only a fixed
            height x width resize, no center crop or padding).
    """
    size = processor.size
    height = getattr(size, "height", None) if not isinstance(size, Mapping) else size.get("height")
    width = getattr(size, "width", None) if not isinstance(size, Mapping) else size.get("width")
    unsupported = [k for k in ("do_center_crop", "do_pad", "do_reduce_labels") if getattr(processor, k, None)]
    if not (height and width) or unsupported:
        raise PackagingError(
            f"the image processor in {folder} ({type(processor).__name__}: size {size!r}, "
            f"{unsupported or 'no crop/pad'}) is not supported: the device resizes to a fixed "
            "{'height', 'width'} without center crop or padding"
        )
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return {
        "files": [PREPROCESSOR_MEMBER],
        "class": type(processor).__name__,
        "size": {"height": int(height), "width": int(width)},
        "do_resize": bool(processor.do_resize),
        "resample": int(processor.resample if processor.resample is not None else 2),  # PIL code, 2 = bilinear
        "do_rescale": bool(processor.do_rescale),
        "rescale_factor": float(processor.rescale_factor),
        "do_normalize": bool(processor.do_normalize),
        "image_mean": [float(v) for v in mean] if mean is not None else None,
        "image_std": [float(v) for v in std] if std is not None else None,
        "do_convert_rgb": True,  # images are decoded as RGB, as transformers' image pipeline does
        "channels_first": True,
    }


def _synthetic_images(n: int, height: int, width: int, seed: int) -> list[Any]:
    """Smooth colour gradients with noise, of varied sizes around the model's: they exercise the resize."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h = max(4, int(height * rng.uniform(0.5, 2.0)))
        w = max(4, int(width * rng.uniform(0.5, 2.0)))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, ((xx + yy) % (8 + i)) / (8 + i)], axis=-1) * 200
        pixels = np.clip(base + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, mode="RGB"))
    return images


def _image_inputs(
    folder: Path, config: Any, model: Any, data: Arrays | None, files: list[Path] | None, options: PackageOptions
) -> _Prepared:
    """pixel_values [batch, C, H, W] with H and W fixed by the image processor, and its contract."""
    params = inspect.signature(model.forward).parameters
    if "pixel_values" not in params:
        raise PackagingError(f"{type(model).__name__} does not take pixel_values; image tasks need an image model")
    if not (folder / "preprocessor_config.json").is_file():
        raise PackagingError(
            f"{folder} has no preprocessor_config.json; save the image processor with the model (save_pretrained)"
        )
    from PIL import Image, UnidentifiedImageError
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # a broken processor config must not be shipped
        raise PackagingError(f"cannot load the image processor in {folder}: {type(e).__name__}: {e}") from e
    contract = _image_contract(processor, folder)
    height, width = contract["size"]["height"], contract["size"]["width"]
    channels = int(getattr(config, "num_channels", 3) or 3)
    spec = TensorSpec("pixel_values", "float32", ("batch", channels, height, width))

    if data is not None:
        raw, origin = dict(data), "calibration"
    else:
        if files is not None:
            try:
                images = [Image.open(p).convert("RGB") for p in files]
            except (OSError, UnidentifiedImageError) as e:
                raise PackagingError(f"cannot read a calibration image: {e}") from e
            origin = f"{len(images)} calibration images through the bundled image processor"
        else:
            images = _synthetic_images(options.validation_samples, height, width, options.seed)
            origin = f"{len(images)} synthetic images through the bundled image processor (seed {options.seed})"
        try:
            pixels = processor(images=images, return_tensors="np")["pixel_values"]
        except Exception as e:  # the processor refused the images
            raise PackagingError(f"the image processor in {folder} failed: {type(e).__name__}: {e}") from e
        raw = {"pixel_values": np.asarray(pixels, dtype=np.float32)}
    return _Prepared(
        inputs=(spec,),
        arrays=fit_data(raw, (spec,)),
        origin=origin,
        axes={"pixel_values": {0: "batch"}},
        preprocessing={"image": contract},
        members={PREPROCESSOR_MEMBER: folder / "preprocessor_config.json"},
        input_policy={"nonfinite": "reject"},
    )


def transformers_source(
    folder: Path,
    task: str | None,
    data: Arrays | None,
    raw: list[str] | list[Path] | None,
    options: PackageOptions,
    progress: Callable[[str], None],
) -> Source:
    import torch

    with quiet("transformers"):  # the first import is where torchao and torch log their warnings
        import transformers

    progress(f"loading transformers model from {folder}")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # OSError, ValueError, JSON errors: all mean an unusable folder
        raise PackagingError(f"cannot read the transformers config in {folder}: {e}") from e
    task = task or _default_task(list(getattr(config, "architectures", None) or []))
    if task not in TASKS:
        raise PackagingError(
            f"task {task!r} is not supported for transformers folders; valid tasks: {', '.join(TASKS)}"
        )
    auto_name, output_name = _TASK_MODELS[task]
    try:
        with quiet("transformers"):
            model = getattr(transformers, auto_name).from_pretrained(folder, local_files_only=True)
    except Exception as e:  # missing or corrupt weights, unknown architecture
        raise PackagingError(f"cannot load the {task} model in {folder}: {type(e).__name__}: {e}") from e
    model.eval()

    is_image = task == "image-classification"
    if raw is not None and is_image != isinstance(raw[0], Path):
        want = "a folder of images" if is_image else "a .txt file of sentences"
        raise PackagingError(f"calibration for {task} must be {want} (or arrays)")
    if is_image:
        prepared = _image_inputs(folder, config, model, data, raw, options)  # type: ignore[arg-type]
    else:
        prepared = _text_inputs(folder, config, model, data, raw, options)  # type: ignore[arg-type]
    if task == "feature-extraction":
        prepared.preprocessing["pooling"] = _pooling(folder)
    else:
        prepared.preprocessing["labels"] = _labels(config)
        problem = getattr(config, "problem_type", None)
        if problem:  # decides softmax vs sigmoid scores in the device's pipelines
            prepared.preprocessing["problem_type"] = str(problem)
    input_names = [s.name for s in prepared.inputs]
    validation = prepared.arrays

    class _TaskWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *args: Any) -> tuple[Any, ...]:
            out = self.inner(**dict(zip(input_names, args, strict=True)), return_dict=True)
            return (out[output_name],)

    wrapper = _TaskWrapper().eval()
    reference = torch_reference(wrapper, input_names, [output_name])
    probe = reference({k: v[:2] for k, v in validation.items()})[output_name]
    out_shape: tuple[int | str, ...]
    if task in ("feature-extraction", "token-classification"):  # one vector per token
        out_shape = ("batch", "sequence", int(probe.shape[-1]))
        axes = {**prepared.axes, output_name: {0: "batch", 1: "sequence"}}
    else:
        out_shape = ("batch", int(probe.shape[-1]))
        axes = {**prepared.axes, output_name: {0: "batch"}}
    outputs = (TensorSpec(output_name, dtype_name(probe.dtype), out_shape),)

    def export(workdir: Path) -> OnnxExport:
        example = tuple(torch.from_numpy(validation[n][:2]) for n in input_names)
        return torch2onnx(
            wrapper, example, workdir / "source.onnx", input_names=input_names, output_names=[output_name],
            dynamic_axes=axes, opset=options.export_opset, exporter=options.exporter, progress=progress,
        )  # fmt: skip

    return Source(
        kind="transformers",
        description=f"transformers {type(model).__name__} from {folder.name}",
        inputs=prepared.inputs,
        outputs=outputs,
        reference=reference,
        reference_name=f"torch {torch_version()}",
        validation_inputs=validation,
        data_origin=prepared.origin,
        task=task,
        preprocessing=prepared.preprocessing,
        members=prepared.members,
        input_policy=prepared.input_policy,
        info={
            "architecture": type(model).__name__,
            "transformers": transformers.__version__,
            "model_type": getattr(config, "model_type", None),
        },
        export_fn=export,
        native=wrapper,
    )
