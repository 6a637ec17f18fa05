import pytest
import torch

from lengen_fast import backends


def test_extension_built():
    assert backends.cpu_ext() is not None, "lengen_fast._C was not built"
    assert backends.cpu_ext().num_threads() >= 1


def test_reference_always_available():
    assert backends.select("nonexistent-op", torch.device("cpu")) == "reference"


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="backend='bogus'"):
        backends.select("rope", torch.device("cpu"), backend="bogus")


def test_unavailable_backend_rejected():
    with pytest.raises(ValueError, match="backend='cuda' cannot run"):
        backends.select("rope", torch.device("cpu"), backend="cuda", supported=("cuda", "reference"))


def test_env_override(monkeypatch):
    monkeypatch.setenv("LENGEN_BACKEND", "reference")
    assert backends.select("rope", torch.device("cpu")) == "reference"


def test_not_implemented_backend(monkeypatch):
    with pytest.raises(ValueError, match="not implemented for op"):
        backends.select("rope", torch.device("cpu"), backend="triton", supported=("cpu", "reference"))


def test_env_override_skips_ops_without_that_backend(monkeypatch):
    monkeypatch.setenv("LENGEN_BACKEND", "triton")
    assert backends.select("data", torch.device("cpu"), supported=("cpu", "reference")) in ("cpu", "reference")


def test_env_override_unknown(monkeypatch):
    monkeypatch.setenv("LENGEN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LENGEN_BACKEND='bogus'"):
        backends.select("rope", torch.device("cpu"))


def test_attention_order_lists_only_implemented_backends():
    # no dead entries: every backend in the attention orders has a forward and a backward implementation
    from lengen_fast.attention import op
    for device, order in backends.DEFAULT_ORDER["attention"].items():
        assert set(order) <= set(op._FWD) & set(op._BWD), (device, order)
