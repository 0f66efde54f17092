"""The fused CPU elementwise ops (kernels/cpu/elementwise.c) against the torch ops they
replace, their layout checks, the model layers on both paths, and the build cache and its
fallback when no compiler works."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.models import layers
from kernels import cpu_elementwise as ew
from kernels.cpu import build

pytestmark = pytest.mark.skipif(not ew.available(), reason="no C compiler: the torch ops serve")


def _torch_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _torch_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@pytest.mark.parametrize("n,d", [(1, 256), (7, 96), (64, 256), (513, 4096)])
def test_rms_norm_matches_torch(n: int, d: int) -> None:
    g = torch.Generator().manual_seed(n * d)
    x, w = torch.randn(n, d, generator=g) * 3, torch.randn(d, generator=g)
    out = ew.rms_norm(x, w, 1e-6)
    assert out is not None
    torch.testing.assert_close(out, _torch_rms(x, w, 1e-6), rtol=1e-5, atol=1e-6)


def test_rms_norm_reads_strided_rows_and_refuses_what_it_cannot() -> None:
    g = torch.Generator().manual_seed(1)
    wide, w = torch.randn(9, 40, generator=g), torch.randn(32, generator=g)
    view = wide[:, 4:36]  # rows 40 apart, each 32 contiguous
    out = ew.rms_norm(view, w, 1e-5)
    assert out is not None and out.is_contiguous()
    torch.testing.assert_close(out, _torch_rms(view, w, 1e-5), rtol=1e-5, atol=1e-6)
    # A 3-D view whose rows cannot be flattened is copied, not misread.
    heads = torch.randn(5, 48, generator=g)[:, :32].view(5, 2, 16)
    out = ew.rms_norm(heads, w[:16], 1e-5)
    assert out is not None
    torch.testing.assert_close(out, _torch_rms(heads, w[:16], 1e-5), rtol=1e-5, atol=1e-6)
    assert ew.rms_norm(wide.t(), w, 1e-5) is None  # columns, not rows, are contiguous
    assert ew.rms_norm(view, w[:16], 1e-5) is None  # weight of the wrong size


def test_add_rms_norm_updates_the_residual_and_normalises_the_sum() -> None:
    g = torch.Generator().manual_seed(2)
    x, acc = torch.randn(33, 256, generator=g), torch.randn(33, 256, generator=g)
    w = torch.randn(256, generator=g)
    expected_sum = x + acc
    out = ew.add_rms_norm(x, acc, w, 1e-6)
    assert out is not None
    torch.testing.assert_close(acc, expected_sum, rtol=0, atol=0)  # float adds: exact
    torch.testing.assert_close(out, _torch_rms(expected_sum, w, 1e-6), rtol=1e-5, atol=1e-6)
    before = acc.clone()
    assert ew.add_rms_norm(x[:, :128], acc[:, :128], w[:128], 1e-6) is None  # not contiguous
    assert torch.equal(acc, before)  # refused: nothing written


@pytest.mark.parametrize("heads,dim", [(8, 32), (2, 64), (4, 128), (3, 10)])
def test_rotary_in_place_on_a_fused_qkv_view(heads: int, dim: int) -> None:
    g = torch.Generator().manual_seed(heads * dim)
    n, kv = 11, 2
    qkv = torch.randn(n, (heads + 2 * kv) * dim, generator=g)
    q = qkv[:, : heads * dim].view(n, heads, dim)
    k = qkv[:, heads * dim: (heads + kv) * dim].view(n, kv, dim)
    v_before = qkv[:, (heads + kv) * dim:].clone()
    cos = torch.randn(n, 1, dim // 2, generator=g)
    sin = torch.randn(n, 1, dim // 2, generator=g)
    want_q, want_k = _torch_rotary(q, cos, sin), _torch_rotary(k, cos, sin)
    assert ew.rotary_(q, cos, sin) and ew.rotary_(k, cos, sin)
    torch.testing.assert_close(q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, (heads + kv) * dim:], v_before)  # v untouched


def test_rotary_refuses_layouts_it_cannot_address() -> None:
    x = torch.randn(4, 2, 32)
    cos = sin = torch.randn(4, 1, 16)
    before = x.clone()
    assert not ew.rotary_(x.transpose(0, 1), cos[:2], sin[:2])  # heads not contiguous in a row
    assert not ew.rotary_(x, cos[:3], sin[:3])  # one table row per token
    assert not ew.rotary_(x, torch.randn(4, 1, 32)[..., ::2], sin)  # strided table
    assert torch.equal(x, before)


@pytest.mark.parametrize("n,inter", [(1, 768), (5, 100), (512, 768)])
def test_silu_mul_matches_torch(n: int, inter: int) -> None:
    g = torch.Generator().manual_seed(n + inter)
    gate_up = torch.randn(n, 2 * inter, generator=g) * 6
    out = ew.silu_mul(gate_up)
    gate, up = gate_up.split(inter, dim=-1)
    assert out is not None
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=2e-6, atol=1e-6)


def test_silu_mul_at_the_edges_of_exp() -> None:
    gate = torch.tensor([[-1e4, -100.0, -88.0, -20.0, 0.0, 1e-30, 20.0, 88.0, 100.0, 1e4,
                          float("inf"), float("-inf"), float("nan")]])
    gate_up = torch.cat((gate, torch.ones_like(gate)), dim=1)
    out = ew.silu_mul(gate_up)
    assert out is not None
    torch.testing.assert_close(out, F.silu(gate), rtol=2e-6, atol=1e-30, equal_nan=True)


def test_model_layers_agree_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Llama block's ops with the C path on and off (``ENABLED``): same values."""
    torch.manual_seed(3)
    norm = layers.RMSNorm(64, 1e-6, dtype=torch.float32)
    with torch.no_grad():
        norm.weight.normal_()
    mlp = layers.SwiGLU(64, 96, bias=False, dtype=torch.float32)
    x, res = torch.randn(6, 64), torch.randn(6, 64)
    qkv = torch.randn(6, 4 * 16)
    cos, sin = torch.randn(6, 1, 8), torch.randn(6, 1, 8)

    def run() -> list[torch.Tensor]:
        with torch.inference_mode():
            h, normed = norm.add_forward(x.clone(), res)
            return [norm(x), h, normed, mlp(x),
                    layers.apply_rotary(qkv.clone().view(6, 4, 16), cos, sin)]

    fused = run()
    monkeypatch.setattr(ew, "ENABLED", False)
    plain = run()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_autograd_keeps_the_torch_ops() -> None:
    norm = layers.RMSNorm(8, 1e-6, dtype=torch.float32)
    x = torch.randn(3, 8, requires_grad=True)
    assert not ew.applies(x, norm.weight)
    norm(x).sum().backward()  # the C ops have no backward; the torch path does
    assert x.grad is not None


def test_the_build_is_cached_per_source_and_cpu(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_KERNEL_CACHE", str(tmp_path))
    first = build.build("elementwise")
    mtime = first.stat().st_mtime_ns
    assert build.build("elementwise") == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporaries left
    monkeypatch.setattr(build, "_cpu_identity", lambda: "another cpu")
    assert build.build("elementwise") != first  # another CPU: another library


def test_without_a_compiler_the_torch_ops_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ENGINE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("ENGINE_CC", os.path.join(tmp_path, "no-such-cc"))
    with pytest.raises(build.BuildError, match="no C compiler"):
        build.build("elementwise")
    build.forget()
    ew._lib.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kernels.cpu_elementwise"):
            assert not ew.available()
        assert "using the torch ops instead" in caplog.text
        norm = layers.RMSNorm(16, 1e-6, dtype=torch.float32)
        x = torch.randn(2, 16)
        with torch.inference_mode():
            torch.testing.assert_close(norm(x), _torch_rms(x, norm.weight, 1e-6))
    finally:
        monkeypatch.undo()
        build.forget()
        ew._lib.cache_clear()
    assert ew.available()


def test_a_compile_error_is_reported_and_remembered(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    monkeypatch.setenv("ENGINE_KERNEL_CACHE", str(tmp_path / "cache"))
    build.forget()
    try:
        with pytest.raises(build.BuildError, match=r"building broken\.c failed"):
            build.load("broken")
        assert not any((tmp_path / "cache").iterdir())  # the failed temporary is gone
        bad.write_text("int answer(void) { return 42; }\n")
        with pytest.raises(build.BuildError, match=r"building broken\.c failed"):
            build.load("broken")  # remembered: a fallback path does not rerun the compiler
        build.forget()
        assert build.load("broken").answer() == 42
    finally:
        build.forget()
