"""Shared fixtures: synthetic SNI task files and offline tokenizers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from same_threads import THREAD_VARIABLES, THREADS, torch_threads

REPO = Path(__file__).resolve().parents[1]
SHARED_SNI = REPO.parent / "shared" / "data" / "sni"  # the SNI development subset, where this checkout has it


@pytest.fixture(autouse=True)
def _sni_variable(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Shipped recipes name the SNI data as ${ORCHMOE_SNI_DIR}, which loading expands: point it at the development
    subset where there is one, else at an empty folder, unless the environment sets it (restored after each test)."""
    if "ORCHMOE_SNI_DIR" not in os.environ:
        where = SHARED_SNI if SHARED_SNI.is_dir() else tmp_path_factory.mktemp("no-sni")
        monkeypatch.setenv("ORCHMOE_SNI_DIR", str(where))


@pytest.fixture(scope="session", autouse=True)
def _same_threads() -> Iterator[None]:
    """Every test computes with the same torch thread count, and so does every process a test starts (see
    same_threads.py): set here before any other fixture, whatever the file order, and restored at the end."""
    with torch_threads(), pytest.MonkeyPatch.context() as patch:
        for variable in THREAD_VARIABLES:
            patch.setenv(variable, str(THREADS))
        yield


_SNI_TRAIN_TASKS = ("task001_alpha_qa", "task002_beta_title", "task003_gamma_qa")
_SNI_TEST_TASKS = ("task101_delta_rewrite", "task102_epsilon_qa")


def _sni_task(name: str, n_instances: int = 6, category: str = "Question Answering") -> dict[str, Any]:
    """A valid task in the upstream schema and key order; instance i has 1 or 2 references."""
    return {
        "Contributors": ["Test"],
        "Source": ["synthetic"],
        "URL": ["https://example.org"],
        "Categories": [category],
        "Reasoning": [],
        "Definition": [f"In this task ({name}), you answer a short question"],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instruction_language": ["English"],
        "Domains": ["Tests"],
        "Positive Examples": [
            {"input": f"pos input {k}", "output": f"pos output {k}", "explanation": f"pos why {k}"} for k in (1, 2, 3)
        ],
        "Negative Examples": [
            {"input": f"neg input {k}", "output": f"neg output {k}", "explanation": f"neg why {k}"} for k in (1, 2)
        ],
        "Instances": [
            {"id": f"{name}-{i}", "input": f"Question {i} of {name}?",
             "output": [f"answer {i}"] + ([f"other answer {i}"] if i % 2 else [])}
            for i in range(n_instances)
        ],
        "Instance License": ["Apache 2.0"],
    }


@pytest.fixture
def make_task() -> Callable[..., dict[str, Any]]:
    """Factory: ``make_task(name, n_instances=6, category=...)`` -> a valid task dict."""
    return _sni_task


@pytest.fixture
def write_task() -> Callable[[Path, Any], Path]:
    """Writer: ``write_task(path, content)``; dicts/lists are dumped as JSON, bytes are written as they are."""

    def write(path: Path, content: Any) -> Path:
        data = content if isinstance(content, bytes) else json.dumps(content, indent=4).encode()
        path.write_bytes(data)
        return path

    return write


def write_sni_dir(root: Path) -> Path:
    """An SNI directory in the upstream layout: ``tasks/*.json`` plus split files next to ``tasks/``.

    Training tasks: task001_alpha_qa, task002_beta_title (Title Generation), task003_gamma_qa; test tasks:
    task101_delta_rewrite (Question Rewriting), task102_epsilon_qa. Other categories are Question Answering;
    6 instances each.
    """
    (root / "tasks").mkdir(parents=True)
    categories = {"task002_beta_title": "Title Generation", "task101_delta_rewrite": "Question Rewriting"}
    for name in _SNI_TRAIN_TASKS + _SNI_TEST_TASKS:
        task = _sni_task(name, category=categories.get(name, "Question Answering"))
        (root / "tasks" / f"{name}.json").write_text(json.dumps(task, indent=4), encoding="utf-8")
    (root / "train_tasks.txt").write_text("\n".join(_SNI_TRAIN_TASKS) + "\n", encoding="utf-8")
    (root / "test_tasks.txt").write_text("\n".join(_SNI_TEST_TASKS) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def sni_dir(tmp_path: Path) -> Path:
    """The synthetic SNI directory of :func:`write_sni_dir` under this test's temporary directory."""
    return write_sni_dir(tmp_path / "sni")


@pytest.fixture(scope="session")
def byt5() -> Any:
    """ByT5's byte tokenizer (no files needed): one id per UTF-8 byte (byte + 3), EOS 1 appended, pad 0."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


@pytest.fixture(scope="session")
def bos_tokenizer() -> Any:
    """A byte-level fast tokenizer that prepends a BOS (id 1) by default, like Llama's; EOS 2, pad 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
