"""The Tk-Instruct prompt format, including the demonstration-dropping rule."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Callable

import pytest

from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.encoding import encode_prompts, format_definition, format_example, format_task_input
from orchmoe_cli.data.sni import bundled_dir
from orchmoe_cli.data.sni_task import Example, Instance, SNITask, read_task

# sni.md, section 4: def + 2 pos for task1146_country_capital, first test instance.
WORKED_EXAMPLE = (
    "Definition: In this task, you are given a country name and you need to return the capital city of the "
    "given country.\n\n"
    " Positive Example 1 -\nInput: United States.\n Output: Washington.\n\n"
    " Positive Example 2 -\nInput: India.\n Output: New Delhi.\n\n"
    "Now complete the following example -\nInput: Afghanistan.\nOutput: "
)


def _nbytes(text: str) -> int:
    """ByT5 length of ``text``: one id per UTF-8 byte plus EOS."""
    return len(text.encode()) + 1


def _task(tmp_path: Path, make_task: Callable, write_task: Callable, **changes: Any) -> SNITask:
    data = {**make_task("task7_demo"), **changes}
    return read_task(write_task(tmp_path / "task7_demo.json", data))


def _upstream(task: SNITask, instance: Instance, cfg: DataConfig, tokenizer: Any) -> str:
    """Tk-Instruct's DataCollatorForNI loop for one instance, restated plainly as the reference."""
    def punct(text: str) -> str:
        return text if text[-1] in string.punctuation else text + "."

    def block(kind: str, k: int, ex: Example) -> str:
        text = f" {kind} Example {k} -\n" + punct("Input: " + ex.input.strip()) + "\n"
        text += punct(" Output: " + ex.output.strip()) + "\n"
        if cfg.add_explanation and ex.explanation is not None:
            text += punct(" Explanation: " + ex.explanation.strip()) + "\n"
        return text + "\n"

    def fits(text: str) -> bool:
        return len(tokenizer(text)["input_ids"]) <= cfg.max_source_length

    task_input = "Now complete the following example -\n" + punct("Input: " + instance.input.strip()) + "\nOutput: "
    definition = punct("Definition: " + task.definition[0].strip()) + "\n\n" if cfg.add_definition else ""
    pos: list[str] = []
    for k, ex in enumerate(task.positive_examples[: cfg.num_pos_examples]):
        new = block("Positive", k + 1, ex)
        if not fits(definition + " ".join(pos) + new + task_input):
            break
        pos.append(new)
    neg: list[str] = []
    for k, ex in enumerate(task.negative_examples[: cfg.num_neg_examples]):
        new = block("Negative", k + 1, ex)
        if not fits(definition + " ".join(pos) + " ".join(neg) + new + task_input):
            break
        neg.append(new)
    name = f"{task.name}. " if cfg.add_task_name else ""
    source = name + definition + "".join(pos) + "".join(neg) + task_input
    ids = tokenizer(source)["input_ids"]
    # upstream keeps the first ids; orchmoe keeps the last (the instance input and "Output:" survive)
    return source if len(ids) <= cfg.max_source_length else tokenizer.decode(
        ids[-cfg.max_source_length :], skip_special_tokens=True)


def test_worked_example_from_sni_md(byt5: Any) -> None:
    task = read_task(bundled_dir() / "task1146_country_capital.json")
    encoded = encode_prompts(task, task.instances[:1], DataConfig(), byt5)
    assert task.instances[0].output == ["Kabul"]
    assert encoded.prompts == [WORKED_EXAMPLE] and encoded.truncated == [False]
    assert encoded.source_ids[0] == byt5(WORKED_EXAMPLE)["input_ids"]


def test_explanations_and_negative_examples(tmp_path: Path, make_task: Callable, write_task: Callable,
                                            byt5: Any) -> None:
    task = _task(tmp_path, make_task, write_task)
    cfg = DataConfig(num_pos_examples=1, num_neg_examples=2, add_explanation=True, add_task_name=True)
    prompt = encode_prompts(task, task.instances[:1], cfg, byt5).prompts[0]
    assert prompt == (
        "task7_demo. Definition: In this task (task7_demo), you answer a short question.\n\n"
        " Positive Example 1 -\nInput: pos input 1.\n Output: pos output 1.\n Explanation: pos why 1.\n\n"
        " Negative Example 1 -\nInput: neg input 1.\n Output: neg output 1.\n Explanation: neg why 1.\n\n"
        " Negative Example 2 -\nInput: neg input 2.\n Output: neg output 2.\n Explanation: neg why 2.\n\n"
        "Now complete the following example -\nInput: Question 0 of task7_demo?\nOutput: "
    )
    bare = encode_prompts(task, task.instances[:1], DataConfig(add_definition=False, num_pos_examples=0), byt5)
    assert bare.prompts[0] == "Now complete the following example -\nInput: Question 0 of task7_demo?\nOutput: "


def test_dropping_stops_at_first_example_that_does_not_fit(tmp_path: Path, make_task: Callable,
                                                           write_task: Callable, byt5: Any) -> None:
    examples = [{"input": "a" * 40, "output": "b"}, {"input": "c", "output": "d"}, {"input": "e", "output": "f"}]
    task = _task(tmp_path, make_task, write_task, **{"Positive Examples": examples})
    instance = task.instances[:1]
    definition, task_input = format_definition(task), format_task_input(instance[0])
    blocks = [format_example(ex, k + 1, "Positive", False) for k, ex in enumerate(task.positive_examples)]

    def kept(limit: int) -> int:
        cfg = DataConfig(num_pos_examples=3, max_source_length=limit)
        prompt = encode_prompts(task, instance, cfg, byt5).prompts[0]
        assert prompt == definition + "".join(blocks[: prompt.count("Positive Example")]) + task_input
        return prompt.count("Positive Example")

    # The third check joins the kept blocks with a space; the final string does not.
    third = _nbytes(definition + blocks[0] + " " + blocks[1] + blocks[2] + task_input)
    assert kept(third) == 3 and kept(third - 1) == 2
    second = _nbytes(definition + blocks[0] + blocks[1] + task_input)
    assert kept(second) == 2 and kept(second - 1) == 1
    # Block 1 is long: once it does not fit, the short blocks 2 and 3 are not tried.
    first = _nbytes(definition + blocks[0] + task_input)
    assert kept(first - 1) == 0 and _nbytes(definition + blocks[1] + task_input) < first - 1


def test_task_name_is_not_counted_by_the_checks(tmp_path: Path, make_task: Callable, write_task: Callable,
                                                byt5: Any) -> None:
    task = _task(tmp_path, make_task, write_task)
    plain = encode_prompts(task, task.instances[:1], DataConfig(), byt5).prompts[0]
    limit = _nbytes(plain)
    named = encode_prompts(task, task.instances[:1], DataConfig(add_task_name=True, max_source_length=limit), byt5)
    # Both demonstrations pass the checks; the final truncation does count the name (as upstream) and
    # cuts from the start: the last limit - 1 bytes and EOS remain.
    assert named.truncated == [True] and named.prompts[0] == ("task7_demo. " + plain).encode()[-(limit - 1):].decode()


def test_truncation_keeps_each_instance_input(tmp_path: Path, make_task: Callable, write_task: Callable,
                                               byt5: Any) -> None:
    """A definition longer than the limit must not make every prompt of a task the same text."""
    task = _task(tmp_path, make_task, write_task, Definition=["x" * 300])
    instances = [Instance(id=str(i), input=f"question {i}", output=["z"]) for i in range(3)]
    cut = encode_prompts(task, instances, DataConfig(max_source_length=100), byt5)
    assert all(cut.truncated) and len(set(cut.prompts)) == 3
    assert all(p.endswith(f"question {i}.\nOutput: ") for i, p in enumerate(cut.prompts))


def test_final_truncation(tmp_path: Path, make_task: Callable, write_task: Callable, byt5: Any) -> None:
    task = _task(tmp_path, make_task, write_task, Definition=["x" * 30])
    instance = Instance(id="i", input="y" * 200, output=["z"])
    cfg = DataConfig(max_source_length=50)
    cut = encode_prompts(task, [instance], cfg, byt5)
    assert cut.truncated == [True] and cut.source_ids == [None]
    assert cut.prompts[0] == ("y" * 200 + ".\nOutput: ")[-49:]  # the last ids (49 bytes + EOS): Output: stays
    kept = encode_prompts(task, [instance], cfg, byt5, truncate_source=False)
    assert kept.truncated == [False] and kept.prompts[0].endswith("y" * 200 + ".\nOutput: ")


@pytest.mark.parametrize("cfg", [
    DataConfig(max_source_length=300),
    DataConfig(max_source_length=560, num_pos_examples=3, num_neg_examples=2, add_explanation=True),
    DataConfig(max_source_length=420, num_pos_examples=2, num_neg_examples=2, add_task_name=True),
    DataConfig(max_source_length=250, add_definition=False, num_pos_examples=3, num_neg_examples=1),
])
def test_batched_rounds_equal_upstream_loop(tmp_path: Path, make_task: Callable, write_task: Callable, byt5: Any,
                                            bos_tokenizer: Any, cfg: DataConfig) -> None:
    task = _task(tmp_path, make_task, write_task)
    # Inputs of growing length, so each setting keeps 0..all demonstrations across the batch.
    instances = [Instance(id=str(i), input="w" * (i * 7) + ("?" if i % 3 else ""), output=["o"]) for i in range(25)]
    for tokenizer in (byt5, bos_tokenizer):
        expected = [_upstream(task, instance, cfg, tokenizer) for instance in instances]
        assert encode_prompts(task, instances, cfg, tokenizer).prompts == expected
