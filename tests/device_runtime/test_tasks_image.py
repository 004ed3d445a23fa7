"""Image classification on a real bundle matches transformers' image processor, model and pipeline."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from task_bundles import TaskBundles, folders

from device_runtime import EdgeModelForImageClassification, EdgeModelForSequenceClassification, pipeline
from device_runtime.preprocess import ImageProcessor
from sdk.errors import InputError


@pytest.fixture(scope="session")
def image_bundles(tmp_path_factory: pytest.TempPathFactory) -> TaskBundles:
    return TaskBundles(tmp_path_factory.mktemp("task-image"))


def _rgb(images: list[Any]) -> list[Any]:
    return [im.convert("RGB") for im in images]  # what transformers' pipeline does to every image


def test_pixel_values_match_the_image_processor(image_bundles: TaskBundles) -> None:
    folder = image_bundles.folder("image-classification")
    images = _rgb(folders.sample_images(6))
    theirs = transformers.AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="np")
    with EdgeModelForImageClassification.from_bundle(image_bundles.bundle("image-classification"),
                                                     trust=[image_bundles.public]) as clf:  # fmt: skip
        ours = clf.preprocess(images)
        assert ours.shape == (6, 3, 32, 32) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs["pixel_values"], atol=1e-6)
        # Other forms of the same image: an encoded PNG (bytes and file), a uint8 HWC array, channels first.
        png = io.BytesIO()
        images[0].save(png, format="PNG")
        array = np.asarray(images[0])
        for form in (png.getvalue(), array, array.transpose(2, 0, 1), array.astype(np.float32) / 255.0):
            np.testing.assert_allclose(clf.preprocess(form)[0], ours[0], atol=1e-6)


def test_image_classification_and_pipeline(image_bundles: TaskBundles, tmp_path: Path) -> None:
    folder = image_bundles.folder("image-classification")
    bundle = image_bundles.bundle("image-classification")
    images = folders.sample_images(6)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = hf_model(**processor(images=_rgb(images), return_tensors="pt")).logits.numpy()
    with EdgeModelForImageClassification.from_bundle(bundle, trust=[image_bundles.public]) as clf:
        out = clf(images)
        np.testing.assert_allclose(out.logits, ref, atol=1e-4)
        assert out.labels == [folders.IMAGE_LABELS[i] for i in ref.argmax(-1)]
        np.testing.assert_allclose(out.scores.sum(-1), 1.0, atol=1e-6)

    hf_pipe = transformers.pipeline("image-classification", model=str(folder))
    path = tmp_path / "one.png"
    images[3].save(path)
    with pipeline("image-classification", bundle, trust=[image_bundles.public]) as pipe:
        for image, params in ((images[0], {}), (images[1], {"top_k": 2}), (str(path), {"top_k": None})):
            ours, theirs = pipe(image, **params), hf_pipe(image, **params)
            assert [r["label"] for r in ours] == [r["label"] for r in theirs]
            np.testing.assert_allclose([r["score"] for r in ours], [r["score"] for r in theirs], atol=1e-5)
        batch, hf_batch = pipe(images[:3], top_k=1), hf_pipe(images[:3], top_k=1)
        assert len(batch) == 3 and [b[0]["label"] for b in batch] == [h[0]["label"] for h in hf_batch]
        assert len(pipe(images[0], top_k=10)) == 4  # capped to the number of labels, as transformers does


def test_bad_images(image_bundles: TaskBundles, tmp_path: Path) -> None:
    png = io.BytesIO()
    folders.sample_images(1)[0].save(png, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    bad: list[Any] = [b"not an image", png.getvalue()[:40], str(truncated), str(tmp_path / "missing.png"),
                      np.zeros((5, 5, 2), np.uint8), np.zeros((0, 4, 3), np.uint8), np.full((4, 4, 3), 300.0),
                      np.full((4, 4, 3), np.nan), 42, None, []]  # fmt: skip
    with EdgeModelForImageClassification.from_bundle(image_bundles.bundle("image-classification"),
                                                     trust=[image_bundles.public]) as clf:  # fmt: skip
        for value in bad:
            with pytest.raises(InputError):
                clf(value)
        assert clf.model.metrics.snapshot()["errors"]["input"] == len(bad)
        assert clf(Image.new("RGB", (8, 8))).logits.shape == (1, 4)  # the model still serves
    with pytest.raises(Exception, match="is a image-classification model, not text-classification"):
        EdgeModelForSequenceClassification.from_bundle(image_bundles.bundle("image-classification"),
                                                       trust=[image_bundles.public])  # fmt: skip


def test_processor_contract_errors() -> None:
    with pytest.raises(Exception, match=r"size must be \{'height': int, 'width': int\}"):
        ImageProcessor({"size": {"shortest_edge": 224}})
    with pytest.raises(Exception, match="image_mean and image_std"):
        ImageProcessor({"size": {"height": 8, "width": 8}, "do_normalize": True})
    fixed = ImageProcessor({"size": {"height": 8, "width": 8}, "do_resize": False, "do_normalize": False})
    assert fixed(Image.new("RGB", (8, 8))).shape == (1, 3, 8, 8)
    with pytest.raises(InputError, match="the model takes 8x8"):
        fixed(Image.new("RGB", (9, 8)))


def test_image_over_http_and_both_clis(
    image_bundles: TaskBundles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """POST /v1/image and `predict --image`: an image file in, labels out; the device preprocesses (issue 12)."""
    import json
    import urllib.request

    from device_runtime import cli as device_cli
    from device_runtime.serve import ModelServer
    from sdk import cli

    bundle = image_bundles.bundle("image-classification")
    path = tmp_path / "one.png"
    folders.sample_images(1)[0].save(path)
    with pipeline("image-classification", bundle, trust=[image_bundles.public]) as pipe:
        expected = pipe(str(path), top_k=2)
        with ModelServer(pipe.model.model) as server:
            # curl --data-binary @one.png: no image Content-Type named, and none needed
            request = urllib.request.Request(f"{server.url}/v1/image?top_k=2", data=path.read_bytes(), method="POST")
            request.add_header("Content-Type", "application/x-www-form-urlencoded")
            with urllib.request.urlopen(request, timeout=30) as response:
                body = json.loads(response.read())
    assert body["task"] == "image-classification" and body["labels"] == [expected], body
    argv = ["--trust", str(image_bundles.public), "--image", str(path), "--top-k", "2"]
    assert device_cli.main(["predict", "--bundle", str(bundle), *argv]) == 0
    assert json.loads(capsys.readouterr().out) == body
    assert cli.main(["predict", str(bundle), *argv]) == 0
    assert json.loads(capsys.readouterr().out) == body
