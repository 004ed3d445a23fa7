"""A TFLite bundle built on this host installs by OTA on an agent whose LiteRT is the oldest release the
README promises (ai-edge-litert 1.4.0, the newest with a wheel for some Raspberry Pi setups).

The agent is a real ``edgeship-device run`` process started from the cached virtual environment that holds
that release and numpy 1.x (``packagers.runtime_envs``, the same environments as the compatibility
matrix); the broker is a real Mosquitto and the bundle comes over HTTP. Skipped only when PyPI cannot be
reached to make the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from agent_parts import Broker, HttpServer
from ota_parts import AgentProcess, Fleet, deploy_cmd
from runtime_bundles import Keys

from packagers.options import PackageOptions
from packagers.runtime_envs import RegistryUnreachable, ensure_env

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
OLDEST_LITERT = "1.4.0"


def _tflite_bundles(folder: Path, keys: Keys) -> list[Path]:
    import torch

    from packagers import package

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    paths = []
    for version in (1, 2):
        [result] = package(
            model, name="pi-model", version=version, key=keys.private, out_dir=folder / f"v{version}",
            target="tflite", precision="int8-dynamic", example_inputs=(torch.from_numpy(x[:2]),),
            options=PackageOptions(benchmark_runs=2, validation_samples=8),
        )  # fmt: skip
        paths.append(result.bundle_path)
    return paths


def test_a_tflite_bundle_built_here_installs_by_ota_on_litert_1_4(
    tmp_path: Path, broker: Broker, keys: Keys, fleet_factory: Callable[..., Fleet], http_server: HttpServer
) -> None:
    try:
        env = ensure_env(f"ai-edge-litert=={OLDEST_LITERT}")
    except RegistryUnreachable as e:
        pytest.skip(str(e))
    v1, v2 = _tflite_bundles(tmp_path / "bundles", keys)
    fleet = fleet_factory(broker.port, "pi-litert")
    agent = AgentProcess(tmp_path / "state", broker.port, "pi-litert", keys.public, v1)
    agent.args[0] = str(env.python)  # the old LiteRT's environment, this checkout importable from cwd
    agent.start()
    try:
        fleet.wait_status(lambda s: s["state"] == "online" and (s.get("model") or {}).get("version") == 1, 60,
                          "online on v1")  # fmt: skip
        status = fleet.statuses()[-1]
        assert status["capabilities"]["runtimes"].get("ai-edge-litert") == OLDEST_LITERT, status["capabilities"]
        http_server.state.body = v2.read_bytes()
        fleet.send(deploy_cmd(http_server.url, v2, "litert-1"))
        fleet.wait_phase("litert-1", "active", 60)
        assert "failed" not in fleet.phases("litert-1"), agent.tail()
        fleet.wait_status(lambda s: (s.get("model") or {}).get("version") == 2, 20, "v2 active")
        assert agent.terminate() == 0, agent.tail()
    finally:
        agent.kill()
