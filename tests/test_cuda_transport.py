"""Which transport a cuda buffer uses (jax_ll_ep/_cuda_backend.py: choose_transport), checked without a GPU: the
peer-access transport when one process holds the whole mesh, NVSHMEM when the mesh spans processes or puts are
forced, and clear errors for a forced choice that cannot work or an unknown value."""

from __future__ import annotations

import pytest

from jax_ll_ep._cuda_backend import FORCE_PUT_ENV, TRANSPORT_ENV, choose_transport


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    monkeypatch.delenv(FORCE_PUT_ENV, raising=False)


def test_one_process_uses_peer_access_and_several_use_nvshmem():
    assert choose_transport(1) == "peer"
    assert choose_transport(2) == "nvshmem"
    assert choose_transport(8) == "nvshmem"


def test_forced_puts_need_nvshmem(monkeypatch):
    monkeypatch.setenv(FORCE_PUT_ENV, "1")
    assert choose_transport(1) == "nvshmem"
    monkeypatch.setenv(FORCE_PUT_ENV, "0")  # "0" means off
    assert choose_transport(1) == "peer"


def test_override(monkeypatch):
    monkeypatch.setenv(TRANSPORT_ENV, "nvshmem")
    assert choose_transport(1) == "nvshmem"
    monkeypatch.setenv(TRANSPORT_ENV, "peer")
    assert choose_transport(1) == "peer"


@pytest.mark.parametrize(
    ("value", "processes", "force_put", "match"),
    [
        ("peer", 2, "", "one process holding every GPU"),
        ("peer", 1, "1", "JAX_LL_EP_FORCE_PUT"),
        ("ucx", 1, "", "use 'auto', 'nvshmem' or 'peer'"),
    ],
)
def test_impossible_or_unknown_choice_raises(monkeypatch, value, processes, force_put, match):
    monkeypatch.setenv(TRANSPORT_ENV, value)
    if force_put:
        monkeypatch.setenv(FORCE_PUT_ENV, force_put)
    with pytest.raises(ValueError, match=match):
        choose_transport(processes)
