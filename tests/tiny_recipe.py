"""Recipes for end-to-end command tests: a tiny llama on a given task source, written as YAML."""

from __future__ import annotations

from pathlib import Path


def tiny_recipe(path: Path, source: Path, run: Path, method: str, **sections: str) -> Path:
    """A tiny-llama recipe over ``source`` (held-out tasks keep 3 instances for evaluation, the rest is their
    adaptation pool) with ``method`` and further sections as YAML flow mappings, e.g. ``train="{steps: 2}"``."""
    body = {
        "data": f"{{source: {source}, cache_dir: {path.parent / 'cache'}, num_pos_examples: 0, max_source_length: 96, "
                "max_target_length: 16, max_test_instances: 3}",
        "model": "{name: tiny-llama, tiny: {hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64}}",
        "method": method, **sections, "output": f"{{dir: {run}}}",
    }
    path.write_text("".join(f"{key}: {value}\n" for key, value in body.items()))
    return path
