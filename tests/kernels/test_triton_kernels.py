"""The Triton kernels against their torch references.

Without CUDA they run under Triton's interpreter (float32 and float16; it mishandles
bfloat16) on small shapes; with CUDA the same tests run compiled, plus the ``gpu`` tests on
real Llama-3-8B shapes in bfloat16.

Triton's interpreter is process-wide: ``TRITON_INTERPRET`` is read when triton is first
imported, when each ``@triton.jit`` runs, and again by imports triton makes lazily while
interpreting. So this module sets ``TRITON_INTERPRET=1`` around its own import of the kernels
and, through an autouse fixture, around each of its tests, and restores the environment
after each: other test modules, and the subprocesses they start, never see the variable.
Either way the public ops' CPU default stays the torch reference (``TRITON_INTERPRET`` only
changes what ``backend="triton"`` can do).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import kernels
from kernels.reference import paged_attention_ref, write_kv_ref

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
REPO = Path(__file__).resolve().parents[2]


def _import_kernels() -> tuple[ModuleType, ModuleType, ModuleType] | str:
    """The kernel modules, interpreted off CUDA; or why they cannot be had."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'engine[triton]')"
    names = ("kernels.triton_decode", "kernels.triton_prefill", "kernels.triton_kv_write")
    if CUDA:
        return tuple(importlib.import_module(n) for n in names)  # type: ignore[return-value]
    if "triton" in sys.modules and not _interpreting():
        return ("triton was imported (for the GPU) before this module could switch on its "
                "interpreter: run tests/kernels in a process of its own")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return tuple(importlib.import_module(n) for n in names)  # type: ignore[return-value]
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _interpreting() -> bool:
    import triton.language as tl

    return type(tl.standard.zeros).__name__ == "InterpretedFunction"


_loaded = _import_kernels()
if isinstance(_loaded, str):
    SKIP_REASON: str | None = _loaded
    decode = prefill = kv_write = None
else:
    SKIP_REASON = None
    decode, prefill, kv_write = _loaded


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


needs_triton = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
needs_cpu = pytest.mark.skipif(CUDA, reason="interpreter-only behaviour (CPU tensors)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# (atol, rtol). Long contexts average many values into small outputs (~0.03 at 4096 keys),
# so bf16's absolute tolerance stays tight and its relative one carries the rounding.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (1e-3, 2e-2)}
ATTN_ARGS = ("query", "k_cache", "v_cache", "query_start_loc", "seq_lens", "block_tables")


# --------------------------------------------------------------------------- fakes


def make_batch(
    seqs: list[tuple[int, int]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    device: torch.device = DEVICE,
) -> dict[str, torch.Tensor]:
    """A ragged batch ``seqs`` = [(seq_len, q_len)] with its contexts written into shuffled
    (non-contiguous) blocks of a NaN-filled cache, so that reading a slot that was never
    written shows up; block tables are padded with -1, which must never be read."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-seq_len // block_size) for seq_len, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    tables = torch.full((len(seqs), max(blocks_per_seq, default=0) + 2), -1, dtype=torch.int32)
    for i, (seq_len, _) in enumerate(seqs):
        ids = torch.tensor([perm.pop() for _ in range(blocks_per_seq[i])], dtype=torch.int64)
        tables[i, : len(ids)] = ids.int()
        pos = torch.arange(seq_len)
        slots = (ids[pos // block_size] * block_size + pos % block_size).to(device)
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=g).to(device, dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=g).to(device, dtype)
        write_kv_ref(k, v, k_cache, v_cache, slots)
    q_lens = torch.tensor([q for _, q in seqs], dtype=torch.int32)
    num_tokens = int(q_lens.sum())
    return {
        "query": torch.randn(num_tokens, num_heads, head_dim, generator=g).to(device, dtype),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "query_start_loc": torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0)])
        .int().to(device),
        "seq_lens": torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=device),
        "block_tables": tables.to(device),
    }


def attn_args(b: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [b[name] for name in ATTN_ARGS]


def assert_matches_reference(out: torch.Tensor, b: dict[str, torch.Tensor], scale: float) -> None:
    want = paged_attention_ref(*attn_args(b), scale)
    assert out.shape == want.shape and out.dtype == want.dtype
    atol, rtol = TOL[out.dtype]
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=rtol)


# Decodes: a one-token context, exact block multiples, lengths that are neither.
DECODES = [(33, 1), (1, 1), (70, 1), (16, 1), (47, 1)]
# (seq_len, q_len): full prefills (lengths not multiples of the block size), decodes, and
# extends whose new tokens start mid-block after a cached prefix (a prefix-cache hit or an
# earlier chunk).
MIXED = [(5, 5), (1, 1), (37, 37), (33, 1), (20, 3), (16, 7), (50, 19), (23, 10)]


# --------------------------------------------------------------------------- decode


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode(dtype: torch.dtype, group: int, block_size: int, num_splits: int) -> None:
    b = make_batch(DECODES, num_heads=2 * group, num_kv_heads=2, head_dim=64,
                   block_size=block_size, dtype=dtype, seed=group)
    # KV tiles of 32 tokens: two 16-token blocks per tile, or half a 32-token block.
    out = decode.paged_decode(*attn_args(b), 0.125, num_splits=num_splits, block_n=32)
    assert_matches_reference(out, b, 0.125)


@needs_triton
def test_decode_head_dim_128_long_context_default_splits() -> None:
    """One long sequence, a small one: the split heuristic cuts the long context (the CPU
    stand-in of 4 SMs wants 16 programs; 2 sequences x 1 KV head have 2)."""
    b = make_batch([(700, 1), (9, 1)], num_heads=4, num_kv_heads=1, head_dim=128,
                   block_size=16, dtype=torch.float16, seed=7)
    splits = decode.num_kv_splits(2, 1, b["block_tables"].shape[1] * 16, decode.num_sms(DEVICE))
    assert splits == 2
    out = decode.paged_decode(*attn_args(b), 128**-0.5)
    assert_matches_reference(out, b, 128**-0.5)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_zero_length_padding_row(num_splits: int) -> None:
    """A seq_len 0 row (how a padded CUDA-graph batch looks) outputs zeros, not NaN, and
    leaves the real rows alone."""
    b = make_batch([(20, 1), (1, 1), (9, 1)], num_heads=4, num_kv_heads=2, head_dim=64,
                   block_size=16, dtype=torch.float32, seed=2)
    b["seq_lens"][1] = 0
    out = decode.paged_decode(*attn_args(b), 0.125, num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = torch.tensor([0, 2], device=DEVICE)
    want = paged_attention_ref(*attn_args(b), 0.125)
    torch.testing.assert_close(out[keep], want[keep], atol=1e-5, rtol=1e-5)


@needs_triton
def test_split_heuristic() -> None:
    num_kv_splits, h100 = decode.num_kv_splits, 132
    assert num_kv_splits(64, 8, 4096, h100) == 2
    assert num_kv_splits(1, 8, 32768, h100) == 64
    assert num_kv_splits(1, 8, 512, h100) == 2  # every split keeps >= 256 tokens
    assert num_kv_splits(256, 8, 32768, h100) == 1  # 2048 programs fill the GPU already
    assert num_kv_splits(8, 8, 100, h100) == 1


# --------------------------------------------------------------------------- prefill


@needs_triton
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_prefill_ragged_batch(dtype: torch.dtype, group: int, block_size: int) -> None:
    b = make_batch(MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=64,
                   block_size=block_size, dtype=dtype, seed=group)
    # 32 query rows per program: 32, 8 or 4 tokens, so long sequences span several tiles;
    # 16-key tiles: several per block at block size 32, unmasked and diagonal ones.
    out = prefill.paged_prefill(*attn_args(b), 0.125, block_m=32, block_n=16)
    assert_matches_reference(out, b, 0.125)


@needs_triton
def test_prefill_head_dim_128_default_tiles() -> None:
    b = make_batch([(90, 90), (75, 33), (3, 1)], num_heads=8, num_kv_heads=2, head_dim=128,
                   block_size=16, dtype=torch.float16, seed=11)
    out = prefill.paged_prefill(*attn_args(b), 128**-0.5)
    assert_matches_reference(out, b, 128**-0.5)


@needs_triton
def test_prefill_sequences_without_query_rows() -> None:
    """A last layer that runs only the sampled rows (``SampledRows``): each sequence has
    one query row at the end of its context or none, fewer rows than sequences."""
    b = make_batch([(40, 0), (20, 1), (30, 0), (33, 0), (9, 1), (17, 1)], num_heads=8,
                   num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, seed=3)
    out = prefill.paged_prefill(*attn_args(b), 0.125, block_m=32, block_n=16)
    assert out.shape[0] == 3
    assert_matches_reference(out, b, 0.125)


@needs_triton
def test_extend_equals_full_prefill() -> None:
    """The last tokens of a prefill, computed as an extend over their cached prefix (which
    ends mid-block), equal the same rows of the full prefill."""
    b = make_batch([(45, 45)], num_heads=4, num_kv_heads=1, head_dim=64, block_size=16,
                   dtype=torch.float32, seed=5)
    full = prefill.paged_prefill(*attn_args(b), 0.2)
    tail = prefill.paged_prefill(
        b["query"][-13:], b["k_cache"], b["v_cache"],
        torch.tensor([0, 13], dtype=torch.int32, device=DEVICE), b["seq_lens"],
        b["block_tables"], 0.2,
    )
    torch.testing.assert_close(tail, full[-13:], atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("seed", range(6))
def test_random_batches_through_the_public_op(seed: int) -> None:
    """Random ragged batches, all-decode or mixed, through ``paged_attention``'s dispatch;
    GQA groups include 2 and 3 (padded to 4 rows per token)."""
    g = torch.Generator().manual_seed(1000 + seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    decode_only = seed % 3 == 0
    seqs = []
    for _ in range(randint(1, 5)):
        seq_len = randint(1, 100)
        seqs.append((seq_len, 1 if decode_only else randint(1, seq_len)))
    group = (1, 2, 3, 8, 4, 3)[seed]
    dtype = (torch.float32, torch.float16)[seed % 2]
    b = make_batch(seqs, num_heads=2 * group, num_kv_heads=2, head_dim=64,
                   block_size=(16, 32)[seed % 2], dtype=dtype, seed=seed)
    out = kernels.paged_attention(*attn_args(b), 0.125, backend="triton")
    assert_matches_reference(out, b, 0.125)


# --------------------------------------------------------------------------- KV write


@needs_triton
@pytest.mark.parametrize("num_kv_heads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_write_kv(dtype: torch.dtype, num_kv_heads: int) -> None:
    g = torch.Generator().manual_seed(num_kv_heads)
    num_blocks, block_size, head_dim, num_tokens = 5, 16, 64, 23
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                          device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    # key and value as strided views of one fused projection, as the model produces them
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    key, value = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads :]
    assert not key.is_contiguous()
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens].to(DEVICE)
    slots[5] = -1  # a padding token: skipped
    kv_write.write_kv(key, value, k_cache, v_cache, slots)
    keep = slots >= 0
    want_k, want_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    write_kv_ref(key[keep], value[keep], want_k, want_v, slots[keep])
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


# --------------------------------------------------------------------------- dispatch


@needs_triton
def test_public_ops_route_decode_and_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name, module, fn in (("decode", decode, "paged_decode"),
                             ("prefill", prefill, "paged_prefill")):
        original = getattr(module, fn)

        def spy(*args: object, _name: str = name, _fn: object = original) -> torch.Tensor:
            calls.append(_name)
            return _fn(*args)  # type: ignore[operator]

        monkeypatch.setattr(module, fn, spy)
    for seqs, kind in ((DECODES, "decode"), (MIXED, "prefill")):
        b = make_batch(seqs, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float16, seed=3)
        query = b["query"]
        # a strided query (a view of a fused projection) is read in place
        b["query"] = torch.cat([query, torch.zeros_like(query)], dim=1)[:, :8]
        out = kernels.paged_attention(*attn_args(b), 0.125, backend="triton")
        assert calls[-1] == kind
        assert_matches_reference(out, b, 0.125)

    # write_kv through the public op
    b = make_batch([(20, 20)], num_heads=2, num_kv_heads=2, head_dim=64, block_size=16,
                   dtype=torch.float32)
    key = torch.randn(3, 2, 64, device=DEVICE)
    slots = torch.tensor([1, 17, 40], device=DEVICE)
    kernels.write_kv(key, -key, b["k_cache"], b["v_cache"], slots, backend="triton")
    assert torch.equal(b["k_cache"].view(-1, 2, 64)[slots], key)
    assert torch.equal(b["v_cache"].view(-1, 2, 64)[slots], -key)


@needs_triton
def test_strided_caches_vllm_layout() -> None:
    """The kernels address the caches through their strides: K and V packed side by side per
    slot, vLLM 0.32's ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``, viewed as our
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` without a copy. The reference needs
    contiguous caches and says so."""
    num_kv_heads, head_dim, block_size = 2, 64, 16
    b = make_batch(MIXED, num_heads=8, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   block_size=block_size, dtype=torch.float16, seed=4)
    packed = torch.full((b["k_cache"].shape[0], num_kv_heads, block_size, 2 * head_dim),
                        float("nan"), dtype=torch.float16, device=DEVICE)
    k_view, v_view = packed.transpose(1, 2).split(head_dim, dim=-1)
    assert not k_view.is_contiguous()
    # copy the contexts in through write_kv itself, every slot of every block
    num_slots = k_view.shape[0] * block_size
    slots = torch.arange(num_slots, device=DEVICE)
    flat_k = b["k_cache"].view(num_slots, num_kv_heads, head_dim)
    flat_v = b["v_cache"].view(num_slots, num_kv_heads, head_dim)
    kernels.write_kv(flat_k, flat_v, k_view, v_view, slots, backend="triton")
    torch.testing.assert_close(k_view, b["k_cache"], equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v_view, b["v_cache"], equal_nan=True, atol=0, rtol=0)
    strided = b | {"k_cache": k_view, "v_cache": v_view}
    out = kernels.paged_attention(*attn_args(strided), 0.125, backend="triton")
    assert_matches_reference(out, b, 0.125)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.paged_attention(*attn_args(strided), 0.125, backend="torch")


@needs_triton
@needs_cpu
def test_cpu_default_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRITON_INTERPRET=1 alone leaves "auto" on the reference; ENGINE_TRITON_INTERPRET=1
    sends it to the (interpreted) kernels."""
    monkeypatch.setenv("ENGINE_CPU_ATTENTION", "torch")  # "auto" on CPU: not the C kernel
    b = make_batch(DECODES, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                   dtype=torch.float32)
    used: list[str] = []
    triton_decode = decode.paged_decode

    def spy_torch(*args: object) -> torch.Tensor:
        used.append("torch")
        return paged_attention_ref(*args)  # type: ignore[arg-type]

    def spy_triton(*args: object) -> torch.Tensor:
        used.append("triton")
        return triton_decode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "paged_attention_ref", spy_torch)
    monkeypatch.setattr(decode, "paged_decode", spy_triton)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels.paged_attention(*attn_args(b), 0.125)
    assert used == ["torch"]
    kernels.paged_attention(*attn_args(b), 0.125, backend="torch")
    assert used == ["torch", "torch"]
    monkeypatch.setenv("ENGINE_TRITON_INTERPRET", "1")
    out = kernels.paged_attention(*attn_args(b), 0.125)
    assert used == ["torch", "torch", "triton"]
    assert_matches_reference(out, b, 0.125)


def test_dispatch_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    b = make_batch([(3, 1)], num_heads=2, num_kv_heads=1, head_dim=16, block_size=16,
                   dtype=torch.float32, device=cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.paged_attention(*attn_args(b), 1.0, backend="cuda")  # type: ignore[arg-type]
    monkeypatch.setenv("ENGINE_TRITON_INTERPRET", "maybe")
    with pytest.raises(ValueError, match="ENGINE_TRITON_INTERPRET='maybe'"):
        kernels.paged_attention(*attn_args(b), 1.0)
    monkeypatch.delenv("ENGINE_TRITON_INTERPRET")
    if SKIP_REASON is None:
        odd = make_batch([(3, 1)], num_heads=2, num_kv_heads=1, head_dim=24, block_size=16,
                         dtype=torch.float32)
        with pytest.raises(ValueError, match="power-of-two head_dim"):
            kernels.paged_attention(*attn_args(odd), 1.0, backend="triton")


# --------------------------------------------------------------------------- GPU, real shapes

LLAMA3_8B = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize(("batch", "context"), [(64, 4096), (2, 32768)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_decode_real_shapes(dtype: torch.dtype, batch: int, context: int) -> None:
    # ragged around `context`, so that tails of blocks and tiles are exercised
    g = torch.Generator().manual_seed(batch)
    lens = (context - torch.randint(0, 64, (batch,), generator=g)).tolist()
    b = make_batch([(n, 1) for n in lens], **LLAMA3_8B, dtype=dtype)
    for num_splits in (None, 1, 8):  # the heuristic's choice, none, many
        out = decode.paged_decode(*attn_args(b), 128**-0.5, num_splits=num_splits)
        assert_matches_reference(out, b, 128**-0.5)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_prefill_real_shapes(dtype: torch.dtype) -> None:
    seqs = [(4096, 4096), (3000, 1000), (2065, 513), (700, 1), (1, 1), (4096, 4096)]
    b = make_batch(seqs, **LLAMA3_8B, dtype=dtype)
    out = kernels.paged_attention(*attn_args(b), 128**-0.5)  # "auto": Triton on CUDA
    assert_matches_reference(out, b, 128**-0.5)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_write_kv_real_shapes() -> None:
    num_blocks, num_tokens = 4096, 64 * 33
    k_cache = torch.zeros(num_blocks, 16, 8, 128, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    want_k, want_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    qkv = torch.randn(num_tokens, 48, 128, dtype=torch.bfloat16, device=DEVICE)
    key, value = qkv[:, 32:40], qkv[:, 40:]
    slots = torch.randperm(num_blocks * 16, device=DEVICE)[:num_tokens]
    kernels.write_kv(key, value, k_cache, v_cache, slots)
    write_kv_ref(key, value, want_k, want_v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


# --------------------------------------------------------------------------- GPU compilation


@needs_triton
@pytest.mark.slow
def test_kernels_compile_for_h100_without_a_gpu() -> None:
    """The interpreter checks semantics only; this compiles every kernel for sm_90 down to a
    cubin through the real wrappers and GPU launch defaults (kernels/compile_check.py), in a
    subprocess free of TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled 5 kernels for sm_90" in done.stdout, done.stdout


# --------------------------------------------------------------------------- benchmark CLI


def test_bench_kernels_help() -> None:
    """The benchmark imports and parses its arguments without a GPU (or triton)."""
    done = subprocess.run([sys.executable, "-m", "bench.kernels", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "--json" in done.stdout
