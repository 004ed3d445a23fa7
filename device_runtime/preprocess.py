"""Raw text and images to model inputs, as the bundle's ``preprocessing`` declares; no transformers.

Text goes through the bundle's ``tokenizer/tokenizer.json`` with the light ``tokenizers`` package,
with the truncation, padding and special tokens the packager recorded, so the ids equal what the
transformers fast tokenizer gave on the build host. Images are decoded with Pillow, converted to
RGB, resized, rescaled and normalised like transformers' PIL image processor, channels first.
``tokenizers`` and Pillow are imported on first use: ``import device_runtime`` stays light.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
import weakref
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdk.errors import BackendError, InputError, ManifestError

if TYPE_CHECKING:
    from device_runtime.model import Model

__all__ = ["ImageProcessor", "TextBatch", "TextEncoder", "encode_text", "image_processor", "text_encoder"]

MAX_TEXTS = 4096  # texts in one call; a bigger batch is a caller's bug, not a workload
MAX_TEXT_CHARS = 1_000_000  # characters per text; longer input is refused before tokenizing
MAX_IMAGE_BYTES = 64 * 2**20  # bytes of one encoded image
MAX_IMAGE_PIXELS = 64 * 2**20  # decoded pixels of one image (Pillow's own bomb check is 89M, warning only)


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        package = "pillow" if name == "PIL" else name
        raise BackendError(
            f"this bundle's preprocessing needs the {package!r} package: pip install 'edgeship[device]'"
        ) from e


class TextBatch:
    """Tokenized texts: the model's feeds plus what pipelines need to map tokens back to text.

    ``tokens``, ``offsets`` and ``special_tokens_mask`` are read from the tokenizer's encodings on first
    use: an embedding or classification call never needs them, and building them costs a Python loop
    over every token of every text.
    """

    def __init__(self, feeds: dict[str, np.ndarray], encodings: Sequence[Any]) -> None:
        self.feeds = feeds  # model input name -> int64 [batch, sequence]
        self._encodings = encodings
        self.truncated: list[int] = [i for i, e in enumerate(encodings) if e.overflowing]  # texts cut to max_length

    @cached_property
    def tokens(self) -> list[list[str]]:
        """Token strings per text (padding included)."""
        return [list(e.tokens) for e in self._encodings]

    @cached_property
    def offsets(self) -> list[list[tuple[int, int]]]:
        """Character span of each token in its text."""
        return [[(int(a), int(b)) for a, b in e.offsets] for e in self._encodings]

    @cached_property
    def special_tokens_mask(self) -> np.ndarray:
        """[batch, sequence], 1 for special and padding tokens."""
        return np.array([e.special_tokens_mask for e in self._encodings], dtype=np.int64)


class TextEncoder:
    """The bundle's tokenizer with its declared truncation and padding; safe to share between threads."""

    def __init__(self, root: Path, contract: Mapping[str, Any], input_names: Sequence[str]) -> None:
        """Load ``tokenizer/tokenizer.json`` from a verified bundle folder.

        Raises:
            ManifestError: the preprocessing declares no usable tokenizer.
            BackendError: the ``tokenizers`` package is missing or cannot read the file.
        """
        files = [str(f) for f in contract.get("files", [])]
        path = next((f for f in files if f.endswith("tokenizer.json")), None)
        if path is None:
            raise ManifestError("preprocessing.tokenizer names no tokenizer.json; the device cannot tokenize")
        max_length = contract.get("max_length")
        if not isinstance(max_length, int) or max_length < 1:
            raise ManifestError(f"preprocessing.tokenizer.max_length must be an int >= 1, got {max_length!r}")
        tokenizers = _import("tokenizers")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(root / path))
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
            raise BackendError(f"cannot load the bundle's tokenizer {path}: {e}") from e
        self.max_length = max_length
        self.input_names = list(input_names)
        self.add_special_tokens = bool(contract.get("add_special_tokens", True))
        self._truncate = contract.get("truncation", True) is not False
        self.padding_side = str(contract.get("padding_side", "right"))
        # As transformers' fast tokenizer sets the backend for `truncation=True, max_length=N, padding="longest"`.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        if self._truncate:
            tokenizer.enable_truncation(
                max_length,
                stride=0,
                strategy=str(contract.get("truncation_strategy", "longest_first")),
                direction=str(contract.get("truncation_side", "right")),
            )
        pad_id = contract.get("pad_id")
        tokenizer.enable_padding(
            direction=str(contract.get("padding_side", "right")),
            pad_id=int(pad_id) if pad_id is not None else 0,  # no pad token: positions are masked out anyway
            pad_type_id=int(contract.get("pad_type_id", 0)),
            pad_token=str(contract.get("pad_token") or "[PAD]"),
            length=contract.get("pad_to"),  # a model built with a fixed sequence length (TFLite) needs exactly it
        )
        self._tokenizer = tokenizer
        self._decoder = tokenizer.decoder
        self._lock = threading.Lock()  # a Tokenizer's padding/truncation state is shared; encode is not re-entrant

    def encode(self, text: Any, text_pair: Any = None) -> TextBatch:
        """Tokenize one text or a list of texts (optionally paired) into the model's feeds.

        Args:
            text: a string or a non-empty list of strings.
            text_pair: None, or a second string (list) paired with each text, for sentence-pair models.

        Returns:
            The feeds (int64, padded to the longest text, truncated to ``max_length``) and token details.

        Raises:
            InputError: not a string or a list of strings, an empty or blank text, too many or too long texts,
                or pairs that do not match the texts one to one.
        """
        texts = _texts(text, "text")
        pairs = _texts(text_pair, "text_pair") if text_pair is not None else None
        if pairs is not None and len(pairs) != len(texts):
            raise InputError(f"{len(texts)} texts but {len(pairs)} text pairs; give one pair per text")
        items: list[Any] = list(zip(texts, pairs, strict=True)) if pairs is not None else texts
        with self._lock:
            encodings = self._tokenizer.encode_batch(items, add_special_tokens=self.add_special_tokens)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        if ids.shape[1] == 0:
            raise InputError("the text gives no tokens")
        columns = {  # only the columns the model takes are built
            "input_ids": lambda: ids,
            "attention_mask": lambda: np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": lambda: np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        unknown = [n for n in self.input_names if n not in columns]
        if unknown:
            raise ManifestError(f"the model takes {unknown}, which a tokenizer does not produce")
        feeds = {n: columns[n]() for n in self.input_names}
        return TextBatch(feeds, encodings)

    @property
    def unk_token(self) -> str | None:
        """The unknown-word token (``[UNK]``), when the tokenizer's model has one."""
        token = getattr(self._tokenizer.model, "unk_token", None)
        return str(token) if token is not None else None

    def tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Join tokens back into text with the tokenizer's decoder (``##`` word pieces merged)."""
        return str(self._decoder.decode(list(tokens))) if self._decoder is not None else " ".join(tokens)


def _texts(value: Any, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise InputError(f"{what} must be a string or a non-empty list of strings, got {type(value).__name__}")
    if len(items) > MAX_TEXTS:
        raise InputError(f"{len(items)} texts in one call; at most {MAX_TEXTS}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InputError(f"{what}[{i}] is a {type(item).__name__}, expected a string")
        if not item.strip():
            raise InputError(f"{what}[{i}] is empty; there is nothing to run the model on")
        if len(item) > MAX_TEXT_CHARS:
            raise InputError(f"{what}[{i}] has {len(item)} characters; at most {MAX_TEXT_CHARS}")
    return list(items)


class ImageProcessor:
    """Decode, resize, rescale and normalise images into ``pixel_values`` [batch, 3, H, W] float32."""

    def __init__(self, contract: Mapping[str, Any]) -> None:
        """Read the manifest's ``preprocessing.image``.

        Raises:
            ManifestError: the size, mean or std are missing or malformed.
        """
        size = contract.get("size")
        if not isinstance(size, Mapping) or not all(isinstance(size.get(k), int) for k in ("height", "width")):
            raise ManifestError(f"preprocessing.image.size must be {{'height': int, 'width': int}}, got {size!r}")
        self.height, self.width = int(size["height"]), int(size["width"])
        self.do_resize = bool(contract.get("do_resize", True))
        self.resample = int(contract.get("resample", 2))
        self.do_rescale = bool(contract.get("do_rescale", True))
        self.rescale_factor = float(contract.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(contract.get("do_normalize", True))
        mean, std = contract.get("image_mean"), contract.get("image_std")
        if self.do_normalize and not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
            raise ManifestError("preprocessing.image needs image_mean and image_std of 3 values to normalise")
        self.mean = np.array(mean or [0.0] * 3, dtype=np.float32)
        self.std = np.array(std or [1.0] * 3, dtype=np.float32)

    def __call__(self, images: Any) -> np.ndarray:
        """One image or a list of them (paths, encoded bytes, PIL images, uint8 arrays) -> pixel_values.

        Raises:
            InputError: an unreadable, corrupt, oversized or ill-shaped image, or an empty list.
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InputError("no image given")
        return np.stack([self.one(item, i) for i, item in enumerate(items)])

    def one(self, image: Any, index: int = 0) -> np.ndarray:
        """One image -> float32 [3, H, W]."""
        pil = _to_pil(image, index)
        if self.do_resize and pil.size != (self.width, self.height):
            pil = pil.resize((self.width, self.height), resample=self.resample)
        elif pil.size != (self.width, self.height):
            raise InputError(
                f"image {index} is {pil.size[0]}x{pil.size[1]}; the model takes {self.width}x{self.height}"
            )
        pixels = np.asarray(pil)  # [H, W, 3] uint8
        out = pixels.astype(np.float64) * self.rescale_factor if self.do_rescale else pixels.astype(np.float64)
        out32 = out.astype(np.float32)  # transformers rescales in float64, then casts
        if self.do_normalize:
            out32 = (out32 - self.mean) / self.std
        return np.ascontiguousarray(out32.transpose(2, 0, 1), dtype=np.float32)


def _to_pil(image: Any, index: int) -> Any:
    """Decode any supported image form to an RGB PIL image, refusing corrupt and oversized ones."""
    pil_image = _import("PIL.Image")
    where = f"image {index}"
    if isinstance(image, pil_image.Image):
        return _checked_rgb(image, where)
    if isinstance(image, np.ndarray):
        return _checked_rgb(pil_image.fromarray(_uint8_hwc(image, where)), where)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                data = f.read(MAX_IMAGE_BYTES + 1)
        except OSError as e:
            raise InputError(f"{where}: cannot read {os.fspath(image)!r}: {e.strerror or e}") from e
    else:
        raise InputError(f"{where} is a {type(image).__name__}; give a path, encoded bytes, a PIL image or an array")
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"{where} is over {MAX_IMAGE_BYTES} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pil_image.DecompressionBombWarning)
            opened = pil_image.open(io.BytesIO(data))
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                raise InputError(f"{where} is {opened.width}x{opened.height} pixels, over {MAX_IMAGE_PIXELS}")
            opened.load()  # decode now: a truncated or corrupt file fails here, not later
    except InputError:
        raise
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, DecompressionBomb*: a bad image
        raise InputError(f"{where} cannot be decoded: {type(e).__name__}: {e}") from e
    return _checked_rgb(opened, where)


def _checked_rgb(image: Any, where: str) -> Any:
    if image.width * image.height > MAX_IMAGE_PIXELS or image.width == 0 or image.height == 0:
        raise InputError(f"{where} is {image.width}x{image.height} pixels; need 1 to {MAX_IMAGE_PIXELS}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _uint8_hwc(array: np.ndarray, where: str) -> np.ndarray:
    """An HxW, HxWxC or CxHxW array as uint8 HxWxC (C 1, 3 or 4); floats in [0, 1] are scaled by 255."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels first -> last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.size == 0:
        raise InputError(f"{where}: an array image must be HxW or HxWx3 (or 3xHxW), got shape {list(array.shape)}")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iuf" or not np.isfinite(array).all():
        raise InputError(f"{where}: array of {array.dtype} with non-finite or non-numeric values")
    if array.dtype.kind == "f" and array.min() >= 0 and array.max() <= 1 and not np.array_equal(array, array.round()):
        array = array * 255  # floats in [0, 1], as transformers reads them
    if array.min() < 0 or array.max() > 255:
        raise InputError(f"{where}: values span [{array.min()}, {array.max()}]; expected 0..255 or floats in 0..1")
    return array.astype(np.uint8)


# One encoder per loaded model, built on first use (the tokenizer takes milliseconds to load).
_TEXT_ENCODERS: weakref.WeakKeyDictionary[Any, TextEncoder] = weakref.WeakKeyDictionary()
_IMAGE_PROCESSORS: weakref.WeakKeyDictionary[Any, ImageProcessor] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def text_encoder(model: Model) -> TextEncoder:
    """The tokenizer ``model``'s bundle carries, cached per model.

    Raises:
        InputError: the bundle carries no tokenizer (it takes arrays, not text).
        ManifestError, BackendError: as for ``TextEncoder``.
    """
    with _CACHE_LOCK:
        encoder = _TEXT_ENCODERS.get(model)
        if encoder is None:
            contract = model.manifest.preprocessing.tokenizer
            if contract is None:
                names = ", ".join(s.name for s in model.manifest.inputs)
                raise InputError(f"bundle {model.manifest.name} carries no tokenizer; give arrays for {names}")
            fixed = {s.shape[1] for s in model.manifest.inputs if len(s.shape) >= 2 and isinstance(s.shape[1], int)}
            buckets = model.manifest.runtime.buckets
            lengths = buckets.get("lengths") if isinstance(buckets, Mapping) else None
            if isinstance(lengths, list) and lengths and isinstance(lengths[-1], int):  # TFLite sequence buckets
                declared = contract.get("max_length")
                top = max(lengths)
                contract = {**contract, "max_length": min(declared, top) if isinstance(declared, int) else top}
            elif len(fixed) == 1:  # the converter fixed the sequence length: pad (and truncate) to exactly it
                (length,) = fixed
                declared = contract.get("max_length")
                max_length = min(declared, length) if isinstance(declared, int) else declared
                contract = {**contract, "pad_to": length, "max_length": max_length}
            encoder = TextEncoder(model.root, contract, [s.name for s in model.manifest.inputs])
            _TEXT_ENCODERS[model] = encoder
        return encoder


def image_processor(model: Model) -> ImageProcessor:
    """The image preprocessing ``model``'s bundle declares, cached per model.

    Raises:
        InputError: the bundle declares no image preprocessing.
        ManifestError: it is malformed.
    """
    with _CACHE_LOCK:
        processor = _IMAGE_PROCESSORS.get(model)
        if processor is None:
            contract = model.manifest.preprocessing.image
            if contract is None:
                raise InputError(f"bundle {model.manifest.name} declares no image preprocessing; give pixel arrays")
            processor = ImageProcessor(contract)
            _IMAGE_PROCESSORS[model] = processor
        return processor


def encode_text(model: Model, text: Any, text_pair: Any = None) -> dict[str, np.ndarray]:
    """Tokenize text for ``model.predict`` with the tokenizer its bundle carries.

    Args:
        model: a loaded model whose bundle has ``preprocessing.tokenizer``.
        text: a string or a list of strings.
        text_pair: optional second text(s) for sentence-pair models.

    Returns:
        Input name -> int64 array [batch, sequence], truncated to the declared ``max_length``.

    Raises:
        InputError: the bundle has no tokenizer, or the text is empty, blank or not a string.
        BackendError: the ``tokenizers`` package is not installed.
    """
    return text_encoder(model).encode(text, text_pair).feeds
