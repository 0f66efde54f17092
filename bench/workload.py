"""Seeded request sets for the benchmarks (see ../shared/WORKLOADS.md).

``chat_short`` is the ShareGPT-like workload scaled down by 8 for 2-core CPU machines
(prompt mean ~27 tokens clipped to [4, 128], output mean ~24 tokens), prompts cut from real
text (the standard library's docstrings) so the tokenizer sees natural input.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def _corpus_token_ids(tokenizer, max_files: int = 40) -> list[int]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(stdlib.glob("*.py"))[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return list(tokenizer.encode("\n\n".join(texts), verbose=False))


def chat_short(tokenizer, num_requests: int, seed: int = 0, scale: int = 8) -> list[BenchRequest]:
    rng = random.Random(seed)
    corpus = _corpus_token_ids(tokenizer)
    out = []
    for _ in range(num_requests):
        # lognormal with the ShareGPT-like means (215 prompt, 195 output), scaled down
        p = int(min(max(rng.lognormvariate(5.0, 0.8) / scale, 4), 1024 / scale))
        o = int(min(max(rng.lognormvariate(4.9, 0.7) / scale, 2), 1024 / scale))
        start = rng.randrange(0, len(corpus) - p)
        out.append(BenchRequest(corpus[start:start + p], o))
    return out
