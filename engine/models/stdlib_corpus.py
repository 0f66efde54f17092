"""The default model's training text: the docstrings of the Python standard library this
interpreter carries (module, class and function docstrings found with ``ast``), plus
ChatML questions about them (``What does json.dumps do?`` answered with the first paragraph
of its docstring). Read by ``engine.models.train_default``; nothing is downloaded.
"""

from __future__ import annotations

import ast
import inspect
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Directories of the stdlib that are not library documentation (or are huge and noisy).
SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "lib2to3",
    "turtledemo", "ensurepip", "pydoc_data", "__pycache__", "lib-dynload", "venv",
})


@dataclass
class Corpus:
    docs: list[str] = field(default_factory=list)  # plain docstrings
    chats: list[str] = field(default_factory=list)  # ChatML question/answer samples
    questions: list[str] = field(default_factory=list)  # the chat questions, for the tokenizer
    files: int = 0


def iter_stdlib_files(stdlib: Path) -> Iterator[Path]:
    """Every ``.py`` file of the stdlib outside SKIP_DIRS, in sorted (deterministic) order."""
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(root) / name


def module_name(stdlib: Path, path: Path) -> str:
    parts = list(path.relative_to(stdlib).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_paragraph(doc: str) -> str:
    return doc.split("\n\n", 1)[0].strip()


def _is_public(qualname: str) -> bool:
    return not any(part.startswith("_") for part in qualname.split("."))


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(qualname, cleaned docstring) for the module ("" as qualname) and every class and
    function in it, in source order."""
    doc = ast.get_docstring(tree, clean=False)
    if doc:
        yield "", inspect.cleandoc(doc)

    def visit(body: Sequence[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = prefix + node.name
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    yield qualname, inspect.cleandoc(doc)
                if isinstance(node, ast.ClassDef):
                    yield from visit(node.body, qualname + ".")

    yield from visit(tree.body, "")


def chat_sample(question: str, answer: str) -> str:
    return (f"{IM_START}user\n{question}{IM_END}\n"
            f"{IM_START}assistant\n{answer}{IM_END}\n")


def build_corpus(stdlib: Path | None = None, max_doc_chars: int = 4000) -> Corpus:
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    corpus = Corpus()
    seen_docs: set[str] = set()
    seen_chats: set[str] = set()
    for path in iter_stdlib_files(stdlib):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError, RecursionError):
            continue
        corpus.files += 1
        module = module_name(stdlib, path)
        for qualname, doc in _docstrings(tree):
            doc = doc.strip()
            if len(doc) < 8:
                continue
            if doc not in seen_docs:
                seen_docs.add(doc)
                corpus.docs.append(doc[:max_doc_chars])
            if not qualname or not _is_public(qualname) or not _is_public(module):
                continue
            answer = first_paragraph(doc)
            if len(answer) < 8 or len(answer) > 600:
                continue
            question = f"What does {module}.{qualname} do?"
            if question in seen_chats:
                continue
            seen_chats.add(question)
            corpus.questions.append(question)
            corpus.chats.append(chat_sample(question, answer))
    return corpus
