"""The Tk-Instruct prompt format (``DataCollatorForNI``), reproduced exactly.

The source string is ``task_name + definition + "".join(pos) + "".join(neg) + task_input``. Demonstrations
are added one at a time while the tokenized length of ``definition + " ".join(kept) + new + task_input``
(default special tokens included, task name not counted, as upstream) stays within ``max_source_length``;
the first one that does not fit ends the list. Results must match upstream, so every check tokenizes the
exact upstream string; speed comes from batching each round of checks over all instances of a task and
from reusing ids of strings already tokenized (with two positives and no negatives, the last check string
is the final source itself, and its ids are the encoder-decoder prompt ids).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.sni_task import Example, Instance, SNITask

_PUNCTUATION = frozenset(string.punctuation)


def _punct(text: str) -> str:
    """Append "." unless the text already ends in ASCII punctuation (upstream's rule)."""
    return text if text[-1] in _PUNCTUATION else text + "."


def format_definition(task: SNITask) -> str:
    return _punct("Definition: " + task.definition[0].strip()) + "\n\n"


def format_example(example: Example, number: int, kind: Literal["Positive", "Negative"], add_explanation: bool) -> str:
    """One demonstration block; ``number`` is 1-based as in the upstream text."""
    text = f" {kind} Example {number} -\n"
    text += _punct("Input: " + example.input.strip()) + "\n"
    text += _punct(" Output: " + example.output.strip()) + "\n"
    if add_explanation and example.explanation is not None:
        text += _punct(" Explanation: " + example.explanation.strip()) + "\n"
    return text + "\n"


def format_task_input(instance: Instance) -> str:
    return "Now complete the following example -\n" + _punct("Input: " + instance.input.strip()) + "\n" + "Output: "


@dataclass
class EncodedPrompts:
    """Source strings of a batch of instances.

    ``truncated[i]`` says source i was cut to the token limit. ``source_ids[i]`` holds the ids of the
    tokenizer's default call on source i when the length checks already computed them (None otherwise),
    so an encoder-decoder caller need not tokenize the same string again.
    """

    prompts: list[str]
    truncated: list[bool]
    source_ids: list[list[int] | None]


class _Ids:
    """Token ids by string from the tokenizer's default call (as upstream's checks), computed in batches."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    def of(self, texts: Sequence[str]) -> list[list[int]]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            self._cache.update(zip(missing, self._tokenizer(missing)["input_ids"]))
        return [self._cache[t] for t in texts]


def encode_prompts(task: SNITask, instances: Sequence[Instance], cfg: DataConfig, tokenizer: Any,
                   truncate_source: bool = True) -> EncodedPrompts:
    """Tk-Instruct source strings for ``instances`` of ``task``.

    Demonstrations that do not fit are dropped first, as upstream. With ``truncate_source`` (encoder-decoder
    models) a source still longer than ``max_source_length`` tokens becomes the decode of its *last*
    ``max_source_length`` ids: the start of the definition goes, the instance input and ``Output:`` stay.
    (Upstream keeps the first ids, which with a long definition makes every prompt of a task the same text.)
    Decoder-only models keep the whole string and truncate ids from the left the same way.
    """
    limit = cfg.max_source_length
    cache = _Ids(tokenizer)
    if cfg.template is not None:
        instruction = task.definition[0] if task.definition else ""
        sources = [cfg.template.format(instruction=instruction, input=instance.input, task=task.name,
                                       category=task.category) for instance in instances]
        return _limited(sources, limit, tokenizer, cache, truncate_source)
    definition = format_definition(task) if cfg.add_definition and task.definition else ""
    pos = [format_example(ex, i + 1, "Positive", cfg.add_explanation)
           for i, ex in enumerate(task.positive_examples[: cfg.num_pos_examples])]
    neg = [format_example(ex, i + 1, "Negative", cfg.add_explanation)
           for i, ex in enumerate(task.negative_examples[: cfg.num_neg_examples])]
    inputs = [format_task_input(instance) for instance in instances]

    n_pos = _kept_counts(pos, [definition] * len(inputs), inputs, limit, cache)
    n_neg = _kept_counts(neg, [definition + " ".join(pos[:k]) for k in n_pos], inputs, limit, cache)

    task_name = f"{task.name}. " if cfg.add_task_name else ""
    sources = [task_name + definition + "".join(pos[:kp]) + "".join(neg[:kn]) + inp
               for kp, kn, inp in zip(n_pos, n_neg, inputs)]
    return _limited(sources, limit, tokenizer, cache, truncate_source)


def _limited(sources: list[str], limit: int, tokenizer: Any, cache: _Ids, truncate_source: bool) -> EncodedPrompts:
    """Sources within ``limit`` tokens: with ``truncate_source`` a longer one becomes the decode of its last ids."""
    if not truncate_source:
        return EncodedPrompts(sources, [False] * len(sources), [None] * len(sources))
    source_ids: list[list[int] | None] = list(cache.of(sources))
    truncated = [len(ids) > limit for ids in source_ids]  # type: ignore[arg-type]
    for i in (i for i, cut in enumerate(truncated) if cut):
        sources[i] = tokenizer.decode(source_ids[i][-limit:], skip_special_tokens=True)  # type: ignore[index]
        source_ids[i] = None
    return EncodedPrompts(sources, truncated, source_ids)


def _kept_counts(blocks: list[str], heads: list[str], inputs: list[str], limit: int, cache: _Ids) -> list[int]:
    """How many of ``blocks`` each instance keeps under upstream's add-while-it-fits rule.

    Round k checks ``heads[i] + " ".join(blocks[:k]) + blocks[k] + inputs[i]`` (upstream's string, with no
    separator after the head) for the instances that kept all earlier blocks.
    """
    kept = [0] * len(inputs)
    active = list(range(len(inputs)))
    for k, block in enumerate(blocks):
        if not active:
            break
        joined = " ".join(blocks[:k])
        texts = [heads[i] + joined + block + inputs[i] for i in active]
        fits = [len(ids) <= limit for ids in cache.of(texts)]
        active = [i for i, ok in zip(active, fits) if ok]
        for i in active:
            kept[i] = k + 1
    return kept
