"""The C paged-attention kernel (kernels/cpu) against the torch reference, its build cache,
and the dispatch around it (backend "cpu", "auto" on CPU, ENGINE_CPU_ATTENTION, no compiler)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from kernels import cpu as cpu_kernel
from kernels.reference import paged_attention_ref

SCALE = 0.2


def _available() -> str | None:
    try:
        cpu_kernel.load()
    except cpu_kernel.CpuKernelUnavailable as e:
        return str(e)
    return None


_UNAVAILABLE = _available()
needs_kernel = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"no C kernel: {_UNAVAILABLE}")


def make_batch(seqs: list[tuple[int, int]], *, num_heads: int, num_kv_heads: int,
               head_dim: int, block_size: int, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """(query, k_cache, v_cache, query_start_loc, seq_lens, block_tables) for ``seqs`` =
    [(seq_len, q_len)]: random contexts in shuffled blocks of a NaN-filled cache (any read of
    a slot outside a context shows up as NaN), padding table entries -1."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-s // block_size) for s, _ in seqs]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    tables = torch.full((len(seqs), max([*need, 1]) + 2), -1, dtype=torch.int32)
    for i, (seq_len, _) in enumerate(seqs):
        ids = [perm.pop() for _ in range(need[i])]
        tables[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        for p in range(seq_len):
            b, o = ids[p // block_size], p % block_size
            k_cache[b, o] = torch.randn(num_kv_heads, head_dim, generator=g).to(dtype)
            v_cache[b, o] = torch.randn(num_kv_heads, head_dim, generator=g).to(dtype)
    q_lens = [q for _, q in seqs]
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()],
                          dtype=torch.int32)
    lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32)
    return query, k_cache, v_cache, starts, lens, tables


def check(seqs: list[tuple[int, int]], **kw: int) -> None:
    batch = make_batch(seqs, **kw)
    want = paged_attention_ref(*batch, SCALE)
    got = kernels.paged_attention(*batch, SCALE, backend="cpu")
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    # fp32 against fp32 with different summation orders: outputs are O(1) averages, so an
    # absolute 1e-5 is the relative 1e-5 of their scale (the kernel is the closer of the two
    # to float64: test_closer_to_float64_than_the_reference).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# (seq_len, q_len): whole prompts (lengths off the block size), extends over a cached prefix
# (q_len < seq_len, ending mid-block), decodes of mixed lengths, seq_len 0 padding rows, and
# a sequence with no query rows (a prefill chunk whose rows do not sample).
MIXED = [(37, 37), (100, 5), (50, 1), (17, 1), (0, 1), (64, 64), (300, 1), (33, 0), (200, 33),
         (1, 1), (16, 16), (129, 1)]


@needs_kernel
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)], ids=["g1", "g4", "g8"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_batch_matches_reference(head_dim: int, heads: tuple[int, int],
                                       block_size: int) -> None:
    check(MIXED, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
          block_size=block_size)


@needs_kernel
@pytest.mark.parametrize("heads", [(6, 2), (32, 1), (20, 1)], ids=["g3", "g32", "g20"])
@pytest.mark.parametrize("block_size", [8, 16, 48])
def test_odd_groups_and_block_sizes(heads: tuple[int, int], block_size: int) -> None:
    """Groups that do not fill a tile's rows evenly (3), that need several tiles (32, 20),
    and blocks smaller than a 16-key chunk or not a multiple of it."""
    check(MIXED, num_heads=heads[0], num_kv_heads=heads[1], head_dim=32, block_size=block_size)


def exact_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    starts: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Dense causal attention in float64, one sequence at a time."""
    out = torch.zeros(query.shape, dtype=torch.float64)
    block_size = k_cache.shape[1]
    group = query.shape[1] // k_cache.shape[2]
    for i in range(lens.shape[0]):
        a, b, seq_len = int(starts[i]), int(starts[i + 1]), int(lens[i])
        if a == b or seq_len == 0:
            continue
        pos = torch.arange(seq_len)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        k = k_cache.flatten(0, 1)[slots].double().repeat_interleave(group, 1)
        v = v_cache.flatten(0, 1)[slots].double().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", query[a:b].double(), k) * scale
        q_pos = torch.arange(seq_len - (b - a), seq_len)[:, None]
        scores = scores.masked_fill(pos[None, :] > q_pos, float("-inf"))
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


@needs_kernel
@pytest.mark.parametrize("head_dim", [32, 128])
def test_closer_to_float64_than_the_reference(head_dim: int) -> None:
    """The 2^x polynomial (no -ffast-math, no libm exp) costs no accuracy: the kernel's
    largest error against float64 is within the reference's (SDPA in float32)."""
    batch = make_batch(MIXED, num_heads=8, num_kv_heads=2, head_dim=head_dim, block_size=16)
    exact = exact_attention(*batch, SCALE)
    ref_err = (paged_attention_ref(*batch, SCALE).double() - exact).abs().max().item()
    got = kernels.paged_attention(*batch, SCALE, backend="cpu")
    assert (got.double() - exact).abs().max().item() <= max(ref_err, 1e-6)


@needs_kernel
def test_saturation_shapes() -> None:
    """The saturation step: a 256-token prompt chunk, an extend of 128 over 128 cached, and
    decodes of 256-320 context (gqa-small: 8/2 heads of 32)."""
    g = torch.Generator().manual_seed(1)
    decodes = [(int(n), 1) for n in torch.randint(256, 321, (24,), generator=g)]
    check([(256, 256), (256, 128), *decodes], num_heads=8, num_kv_heads=2, head_dim=32,
          block_size=16)


@needs_kernel
@pytest.mark.parametrize("seed", range(4))
def test_random_ragged_batches(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    seqs = []
    for _ in range(int(torch.randint(1, 12, (1,), generator=g))):
        seq_len = int(torch.randint(0, 200, (1,), generator=g))
        q_len = int(torch.randint(0, seq_len + 1, (1,), generator=g)) if seq_len else 1
        seqs.append((seq_len, q_len))
    check(seqs, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, seed=seed)


@needs_kernel
@pytest.mark.parametrize("num_threads", [2, 3, 5])
def test_split_between_threads_matches_reference(num_threads: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With more than one torch thread a call is cut into parts run by as many threads: every
    tile computed by exactly one (the output starts uninitialised, so a tile left out or
    written twice with different data shows), whatever the cut; the split is forced even for
    small batches here."""
    monkeypatch.setattr(cpu_kernel, "MIN_SPLIT_COST", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        for seqs in (MIXED, [(700, 700)], [(300, 1)] * 7, [(0, 1), (5, 1)]):
            check(seqs, num_heads=8, num_kv_heads=2, head_dim=32, block_size=16)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_zero_query_rows() -> None:
    batch = make_batch([(20, 0), (5, 0)], num_heads=4, num_kv_heads=2, head_dim=32,
                       block_size=16)
    out = kernels.paged_attention(*batch, SCALE, backend="cpu")
    assert out.shape == (0, 4, 32)


@needs_kernel
def test_large_scores_stay_finite() -> None:
    """Online softmax against overflow: scores of several hundred (the running max moves)."""
    batch = list(make_batch([(90, 90), (70, 1)], num_heads=4, num_kv_heads=1, head_dim=64,
                            block_size=16))
    batch[0] = batch[0] * 30
    exact = exact_attention(*batch, SCALE)
    ref_err = (paged_attention_ref(*batch, SCALE).double() - exact).abs().max().item()
    got = kernels.paged_attention(*batch, SCALE, backend="cpu")
    assert torch.isfinite(got).all()
    # Scores this large lose digits in float32 itself (either implementation): the kernel's
    # error against float64 stays within twice the reference's.
    assert (got.double() - exact).abs().max().item() <= 2 * ref_err


# ------------------------------------------------------------------------- refusals


@needs_kernel
def test_cpu_backend_refuses_what_it_cannot_run() -> None:
    batch = make_batch([(20, 4)], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16)
    half = (batch[0].half(), batch[1].half(), batch[2].half(), *batch[3:])
    with pytest.raises(ValueError, match="float32"):
        kernels.paged_attention(*half, SCALE, backend="cpu")
    odd = make_batch([(20, 4)], num_heads=4, num_kv_heads=2, head_dim=48, block_size=16)
    with pytest.raises(ValueError, match="head_dim 48"):
        kernels.paged_attention(*odd, SCALE, backend="cpu")
    strided = (batch[0], batch[1].transpose(1, 2).contiguous().transpose(1, 2), *batch[2:])
    with pytest.raises(ValueError, match="contiguous"):
        kernels.paged_attention(*strided, SCALE, backend="cpu")
    bad_table = batch[5].clone()
    bad_table[0, 0] = batch[1].shape[0]
    with pytest.raises(ValueError, match="block table"):
        kernels.paged_attention(*batch[:5], bad_table, SCALE, backend="cpu")
    # "auto" and "torch" serve what "cpu" refuses, through the reference.
    want = paged_attention_ref(*odd, SCALE)
    torch.testing.assert_close(kernels.paged_attention(*odd, SCALE), want)
    torch.testing.assert_close(kernels.paged_attention(*half, SCALE, backend="torch"),
                               paged_attention_ref(*half, SCALE))


# ------------------------------------------------------------- build cache, fallback


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (the library and the dispatch are cached per
    process), with ``env`` added to this one's environment."""
    full = {**os.environ, "PYTHONPATH": os.getcwd(), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                          capture_output=True, text=True, timeout=120, check=False)


@needs_kernel
def test_compile_cache_builds_once(tmp_path: object) -> None:
    code = """
        from kernels import cpu
        import os
        path = cpu.library_path()
        existed = path.exists()
        cpu.load()
        print(existed, os.stat(path).st_mtime_ns)
    """
    first = _run(code, ENGINE_KERNEL_CACHE=str(tmp_path))
    second = _run(code, ENGINE_KERNEL_CACHE=str(tmp_path))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    existed1, mtime1 = first.stdout.split()
    existed2, mtime2 = second.stdout.split()
    assert (existed1, existed2) == ("False", "True")
    assert mtime1 == mtime2  # loaded, not rebuilt
    names = os.listdir(str(tmp_path))
    assert len(names) == 1 and names[0].endswith(".so"), names  # no temporary left behind


def test_without_a_compiler_auto_falls_back_and_cpu_refuses(tmp_path: object) -> None:
    code = """
        import warnings
        import torch, kernels
        from tests.kernels.test_cpu_kernel import make_batch
        from kernels.reference import paged_attention_ref
        b = make_batch([(40, 40), (30, 1)], num_heads=4, num_kv_heads=2, head_dim=32,
                       block_size=16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = kernels.paged_attention(*b, 0.2)
            kernels.paged_attention(*b, 0.2)
        torch.testing.assert_close(got, paged_attention_ref(*b, 0.2))
        print(len(caught), "no C compiler" in str(caught[0].message))
        try:
            kernels.paged_attention(*b, 0.2, backend="cpu")
        except RuntimeError as e:
            print("refused:", e)
    """
    result = _run(code, ENGINE_CC="/nonexistent/cc", ENGINE_KERNEL_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "1 True"  # warned once, served by the reference
    assert lines[1].startswith("refused:") and "/nonexistent/cc" in lines[1]


def test_unwritable_cache_is_a_reason_not_a_crash(tmp_path: object) -> None:
    blocker = os.path.join(str(tmp_path), "file")
    open(blocker, "w").close()  # a file where the cache directory should go
    result = _run("""
        from kernels import cpu
        try:
            cpu.load()
        except cpu.CpuKernelUnavailable as e:
            print("unavailable:", e)
    """, ENGINE_KERNEL_CACHE=os.path.join(blocker, "kernels"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("unavailable:") and "ENGINE_KERNEL_CACHE" in result.stdout


@needs_kernel
def test_engine_cpu_attention_env_selects_auto_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = make_batch([(40, 8)], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16)
    used: list[str] = []
    monkeypatch.setattr(kernels, "paged_attention_cpu",
                        lambda *a: used.append("cpu") or cpu_kernel.paged_attention_cpu(*a))
    monkeypatch.setattr(kernels, "paged_attention_ref",
                        lambda *a: used.append("torch") or paged_attention_ref(*a))
    threads = torch.get_num_threads()
    try:
        for value, num_threads, want in (
                ("torch", 1, "torch"), ("cpu", 1, "cpu"), ("auto", 1, "cpu"), ("", 1, "cpu"),
                ("auto", 2, "cpu"), ("torch", 2, "torch")):
            monkeypatch.setenv("ENGINE_CPU_ATTENTION", value)
            torch.set_num_threads(num_threads)
            used.clear()
            kernels.paged_attention(*batch, SCALE)
            assert used == [want], (value, num_threads)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("ENGINE_CPU_ATTENTION", "fast")
    with pytest.raises(ValueError, match="ENGINE_CPU_ATTENTION"):
        kernels.paged_attention(*batch, SCALE)
