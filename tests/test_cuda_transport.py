"""The cuda backend's options, checked without a GPU: which transport a buffer uses (jax_ll_ep/backends/cuda.py:
choose_transport), the validation of CudaOptions, and the environment variables that give their defaults, read once
per process."""

from __future__ import annotations

import pytest

from jax_ll_ep import CudaOptions, config
from jax_ll_ep.backends.cuda import choose_transport

ENVIRONMENT = (config.TRANSPORT_ENV, config.FORCE_PUT_ENV, config.TRACE_ENV)


@pytest.fixture
def environment(monkeypatch):
    """environment(NAME=value, ...): sets the variables CudaOptions' defaults come from (the others unset) and lets
    the next CudaOptions() read them (they are read once per process)."""

    def set_environment(**values):
        for name in ENVIRONMENT:
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        config.environment_defaults.cache_clear()

    set_environment()
    yield set_environment
    config.environment_defaults.cache_clear()


def test_one_process_uses_peer_access_and_several_use_nvshmem(environment):
    options = CudaOptions()
    assert (options.transport, options.force_put, options.trace) == ("auto", False, False)
    assert choose_transport(options, 1) == "peer"
    assert choose_transport(options, 2) == "nvshmem"
    assert choose_transport(options, 8) == "nvshmem"


def test_forced_puts_need_nvshmem(environment):
    assert choose_transport(CudaOptions(force_put=True), 1) == "nvshmem"
    assert choose_transport(CudaOptions(force_put=True), 4) == "nvshmem"


def test_explicit_transport(environment):
    assert choose_transport(CudaOptions(transport="nvshmem"), 1) == "nvshmem"
    assert choose_transport(CudaOptions(transport="peer"), 1) == "peer"
    with pytest.raises(ValueError, match=r"transport='peer'\) needs one process holding every GPU of the mesh"):
        choose_transport(CudaOptions(transport="peer"), 2)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(transport="ucx"), ValueError, r"CudaOptions.transport='ucx' is not supported; allowed: \('auto'"),
        (dict(transport="peer", force_put=True), ValueError, r"the peer transport has no NVSHMEM puts"),
        (dict(force_put="1"), TypeError, r"CudaOptions.force_put='1' must be a bool"),
        (dict(trace=1), TypeError, r"CudaOptions.trace=1 must be a bool"),
    ],
)
def test_invalid_options(environment, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CudaOptions(**kwargs)


def test_the_environment_gives_the_defaults_read_once(environment, monkeypatch):
    environment(**{config.TRANSPORT_ENV: "nvshmem", config.FORCE_PUT_ENV: "1", config.TRACE_ENV: "1"})
    assert CudaOptions() == CudaOptions(transport="nvshmem", force_put=True, trace=True)
    assert CudaOptions(force_put=False).force_put is False  # an argument wins over the environment
    monkeypatch.setenv(config.TRANSPORT_ENV, "peer")  # read once: a later change is not seen
    assert CudaOptions().transport == "nvshmem"
    environment(**{config.FORCE_PUT_ENV: "0"})  # "0" means off
    assert CudaOptions().force_put is False


def test_an_unknown_transport_in_the_environment_is_named(environment):
    environment(**{config.TRANSPORT_ENV: "ucx"})
    with pytest.raises(ValueError, match=r"JAX_LL_EP_CUDA_TRANSPORT='ucx' is not a cuda transport"):
        CudaOptions()
