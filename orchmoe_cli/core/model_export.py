"""`orchmoe export`: what a checkpoint's family can freeze into plain LoRAs, written as peft adapters or folded into
full Hugging Face models that plain transformers loads (orchmoe not needed).

Every routing a family offers (:meth:`RoutingFamily.fixed_routings`: one per task, one per abstract task, the
average of skills) mixes its skills into one rank-r LoRA per layer, so both formats are exact for the inputs that
routing serves; what no format can express exactly is refused by the family before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from orchmoe_cli import __version__
from orchmoe_cli.adapters.family import FixedRouting
from orchmoe_cli.adapters.layer import WrappedLinear
from orchmoe_cli.adapters.model import AdaptedModel
from orchmoe_cli.adapters.peft_interop import export_lora
from orchmoe_cli.adapters.placement import install
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_directory, atomic_write_json
from orchmoe_cli.paths import claim_new_directory

EXPORT_MANIFEST = "orchmoe_export.json"
Format = Literal["peft", "merged"]


def write_merged(model: AdaptedModel, tokenizer: Any, directory: Path, routing: FixedRouting) -> float:
    """The base model with ``routing``'s LoRA folded into its weights (in float32, rounded once to the base dtype),
    saved without orchmoe's wrappers, with its tokenizer: ``AutoModel*.from_pretrained(directory)`` loads it.

    Returns the share of the LoRA update the stored weights keep (1.0 in float32; in bf16 a small update is mostly
    rounded away, which the caller reports rather than let a merged model be silently weaker)."""
    wrappers = {name: m for name, m in model.base.named_modules() if isinstance(m, WrappedLinear)}
    pairs = model.fixed_loras(routing.state)
    model.merge_routing(routing.state)
    try:
        kept, total = 0.0, 0.0
        for name, (a, b) in pairs.items():
            update = model.lora_scale * (a.float() @ b.float()).T
            stored = wrappers[name].folded_update()
            kept += float((stored * update.to(stored.device)).sum())
            total += float((update * update).sum())
        install(model.base, {name: wrapper.base_layer for name, wrapper in wrappers.items()})
        try:
            model.base.save_pretrained(directory, safe_serialization=True)
        finally:
            install(model.base, wrappers)
    finally:
        model.unmerge()
    tokenizer.save_pretrained(directory)
    return kept / total if total > 0 else 1.0


def export_model(model: AdaptedModel, tokenizer: Any, source: Path, base_model: str, to: Format,
                 tasks: list[str] | None, out: Path, notes: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``model``'s fixed routings for ``tasks`` (None: all; []: none named) to ``out`` in format ``to`` and
    return the manifest (with ``notes``). One routing fills ``out`` itself; several get a subdirectory each. The whole export is
    staged beside ``out`` and appears in one rename, so an interrupted export leaves nothing."""
    claim_new_directory(out, "--out", option=True)
    try:  # a family's refusal comes before anything is written, naming the checkpoint
        routings = model.family.fixed_routings(model, tasks)
    except OrchmoeError as exc:
        raise OrchmoeError(f"{source}: {exc}") from None
    single = len(routings) == 1
    entries = []
    with atomic_directory(out) as staging:
        for routing in routings:
            target = staging if single else staging / routing.name
            entry = {"name": routing.name, "path": "." if single else routing.name, "routes": routing.label,
                     "exact_for": routing.exact}
            if to == "peft":
                export_lora(model, target, routing.state)
            else:
                entry["update_kept"] = round(write_merged(model, tokenizer, target, routing), 4)
            entries.append(entry)
        manifest = {
            "format": f"orchmoe-export-{to}", "orchmoe_version": __version__, "source": str(source),
            "method": model.method.name, "base_model": base_model, "adapters": entries,
            "dtype": str(next(model.base.parameters()).dtype).removeprefix("torch."),
            **(model.family.export_extras(model, staging) if to == "peft" else {}), **(notes or {}),
        }
        atomic_write_json(staging / EXPORT_MANIFEST, manifest)
    return manifest
