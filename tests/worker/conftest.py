"""The runners on the default model, built once for the whole tests/worker package.

vLLM's runner costs seconds to start on CPU, so there is one ``VllmRunner`` and one
``NativeRunner`` (the same 32-token blocks and KV capacity, see ``harness.py``) shared by
every module here; tests drop their requests again, and the ``runner`` fixture checks that.
``vllm.LLM.generate``'s greedy reference runs in a subprocess that starts before them.

Without vLLM the vllm runner's tests skip, except in CI (``CI`` set), where they fail:
``make test`` installs vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from engine.config import CacheConfig, ModelConfig, WorkerConfig
from engine.messages import StepPlan
from engine.models.default import default_model_dir

from .harness import BLOCK, GREEDY, NUM_BLOCKS, held_request_ids, require_vllm

TEXTS = [
    "Return a list of", "The default value is", "Raise ValueError if", "This module provides",
    "Create a new", "If the file", "Return True if the", "Convert the string",
]


@pytest.fixture(scope="package")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="package")
def prompts(tokenizer) -> list[list[int]]:
    return [list(tokenizer.encode(t)) for t in TEXTS]


@pytest.fixture(scope="package")
def long_prompts(tokenizer) -> list[list[int]]:
    """Four prompts sharing a 70-token prefix (two full blocks), each longer than 2 blocks."""
    doc = ("Return the number of items in the container. If the container is empty, raise "
           "ValueError. The default value is None, which means that the whole sequence is "
           "used; otherwise only the first n items are counted and the rest are ignored. "
           "Open the file and read the data from the socket until the timeout expires, then ")
    prefix = list(tokenizer.encode(doc))[:70]
    assert len(prefix) == 70
    tails = ["the caller.", "this function when", "the iterator", "default, unless"]
    return [prefix + list(tokenizer.encode(t)) for t in tails]


# --------------------------------------------------------------------------- the runners


@pytest.fixture(scope="package")
def native_runner():
    from engine.worker.native_runner import NativeRunner

    runner = NativeRunner(ModelConfig(), CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
                          WorkerConfig(num_threads=1))
    yield runner
    runner.close()


@pytest.fixture(scope="package")
def vllm_runner():
    require_vllm()
    from engine.worker.vllm.runner import VllmRunner

    runner = VllmRunner(ModelConfig(), CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
                        WorkerConfig(num_threads=1))
    yield runner
    runner.close()


@pytest.fixture(params=["native", "vllm"])
def runner(request):
    """Each runner in turn; it must hold no request afterwards (the runners are shared)."""
    r = request.getfixturevalue(f"{request.param}_runner")
    yield r
    held = held_request_ids(r)
    if held:  # forget them, so that one failing test does not fail every later one
        r.step(StepPlan(step_id=-1, worker_id=0, finished_request_ids=held))
    assert not held, f"the test left requests on the shared {request.param} runner: {held}"


# --------------------------------------------------------------------------- vllm.LLM

_LLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
args = json.loads(sys.argv[1])
llm = LLM(model=args["model"], dtype="float32", block_size=args["block"], seed=0,
          kv_cache_memory_bytes=64 << 20, enforce_eager=True, max_model_len=2048)
out = {}
for name, ignore_eos in (("ignore_eos", True), ("eos", False)):
    sp = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=ignore_eos)
    res = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], sp, use_tqdm=False)
    out[name] = [list(r.outputs[0].token_ids) for r in res]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="package")
def vllm_llm_process(prompts, long_prompts):
    """``vllm.LLM.generate`` (greedy, float32, the same model, ``prompts + long_prompts``,
    ``GREEDY.max_tokens`` tokens, with and without EOS) in a separate process: vLLM's engine
    and our in-process worker would share torch.distributed and vLLM's globals. Package
    scope, like the runners: a test that asks for it before them gets it started first, so
    it runs while they are built."""
    require_vllm()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR",
           "VLLM_NO_USAGE_STATS": "1", "OMP_NUM_THREADS": "1"}
    args = {"model": str(default_model_dir()), "block": BLOCK, "max_tokens": GREEDY.max_tokens,
            "prompts": prompts + long_prompts}
    proc = subprocess.Popen([sys.executable, "-c", _LLM_SCRIPT, json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="package")
def vllm_llm_outputs(vllm_llm_process) -> dict[str, list[list[int]]]:
    proc = vllm_llm_process
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def hf_model():
    """transformers' copy of the default model, float32."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_model_dir(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_greedy(hf_model):
    """transformers' greedy tokens (and their logprobs) of a prompt, EOS ignored."""
    memo: dict[tuple[tuple[int, ...], int], tuple[list[int], list[float]]] = {}

    def generate(prompt: list[int], n: int, *, logprobs: bool = False):
        key = (tuple(prompt), n)
        if key not in memo:
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, eos_token_id=None, pad_token_id=0,
                                    output_logits=True, return_dict_in_generate=True)
            toks = out.sequences[0, len(prompt):].tolist()
            lps = [torch.log_softmax(lg[0], -1)[t].item()
                   for lg, t in zip(out.logits, toks, strict=True)]
            memo[key] = toks, lps
        toks, lps = memo[key]
        return (toks, lps) if logprobs else toks

    return generate
