"""Fixtures for the serving tests: models loaded from policy bundles, and running servers."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from runtime_bundles import Keys
from serving_parts import policy_bundle

import device_runtime
from device_runtime.model import Model
from device_runtime.serve import ModelServer

ModelFactory = Callable[..., Model]


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Callable[..., Path]:
    """``bundle_factory(model="linear"|"masked", input_policy=None, version=1) -> Path``, cached by arguments."""
    folder = tmp_path_factory.mktemp("serving-bundles")
    cache: dict[str, Path] = {}
    counter = itertools.count()

    def make(model: str = "linear", input_policy: Mapping[str, Any] | None = None, version: int = 1) -> Path:
        key = repr((model, sorted((input_policy or {}).items()), version))
        if key not in cache:
            out = folder / f"{model}-{version}-{next(counter)}.edgebundle"
            cache[key] = policy_bundle(out, keys, model=model, input_policy=input_policy, version=version)
        return cache[key]

    return make


@pytest.fixture
def model_factory(bundle_factory: Callable[..., Path], keys: Keys) -> Iterator[ModelFactory]:
    """``model_factory(model=..., input_policy=...) -> Model``; every model is closed after the test."""
    models: list[Model] = []

    def make(**kwargs: Any) -> Model:
        model = device_runtime.load(bundle_factory(**kwargs), [keys.public])
        models.append(model)
        return model

    yield make
    for model in models:
        model.close()


@pytest.fixture
def linear(model_factory: ModelFactory) -> Model:
    return model_factory()


@pytest.fixture
def masked(model_factory: ModelFactory) -> Model:
    return model_factory(model="masked")


@pytest.fixture
def serve() -> Iterator[Callable[..., ModelServer]]:
    """``serve(model_or_provider, **options) -> ModelServer`` started on a free loopback port; stopped after."""
    servers: list[ModelServer] = []

    def start(provider: Any, **options: Any) -> ModelServer:
        server = ModelServer(provider, "127.0.0.1", 0, **options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
