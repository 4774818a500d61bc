"""Test configuration: 8 simulated CPU devices, markers, shared meshes and buffers.

``jax_num_cpu_devices`` must be set before any JAX backend initializes, so it is set here, at import, before any
test module imports jax_ll_ep or touches a device.
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import oracle`

NUM_CPU_DEVICES = 8


def _has_gpu() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:  # no GPU platform in this jaxlib / on this machine
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def cpu_devices():
    devices = jax.devices("cpu")
    assert len(devices) >= NUM_CPU_DEVICES, f"expected {NUM_CPU_DEVICES} simulated CPU devices, got {len(devices)}"
    return devices


def _cpu_mesh(shape: tuple[int, ...], names: tuple[str, ...]):
    import numpy as np
    from jax.sharding import Mesh

    count = int(np.prod(shape))
    return Mesh(np.array(jax.devices("cpu")[:count]).reshape(shape), names)


@pytest.fixture(scope="session")
def make_mesh(cpu_devices):
    """make_mesh(shape, names) -> a Mesh over the first CPU devices (cached)."""
    cache = {}

    def make(shape: tuple[int, ...], names: tuple[str, ...]):
        key = (tuple(shape), tuple(names))
        if key not in cache:
            cache[key] = _cpu_mesh(key[0], key[1])
        return cache[key]

    return make


@pytest.fixture(scope="session")
def mesh8(make_mesh):
    """8 ranks on one axis "ep"."""
    return make_mesh((8,), ("ep",))


@pytest.fixture(scope="session")
def mesh_dp2_ep4(make_mesh):
    """(dp=2, ep=4): two independent 4-rank groups."""
    return make_mesh((2, 4), ("dp", "ep"))


@pytest.fixture(scope="session")
def make_buffer():
    """make_buffer(mesh, backend=..., num_experts=..., max_tokens_per_rank=..., hidden=...) -> an open Buffer,
    cached per configuration for the session, so tests that share a configuration share compiled functions."""
    from jax_ll_ep import Buffer

    cache = {}

    def make(mesh, *, backend: str, num_experts: int, max_tokens_per_rank: int, hidden: int, axis_name="ep"):
        key = (id(mesh), axis_name, backend, num_experts, max_tokens_per_rank, hidden)
        if key not in cache or cache[key].closed:
            cache[key] = Buffer(
                mesh,
                axis_name,
                num_experts=num_experts,
                max_tokens_per_rank=max_tokens_per_rank,
                hidden=hidden,
                backend=backend,
            )
        return cache[key]

    yield make
    for buf in reversed(list(cache.values())):
        buf.close()
