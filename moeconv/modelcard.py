"""The model card (``README.md``) written into every converted model.

The Hub reads the YAML front matter: ``base_model`` with
``base_model_relation: quantized`` lists the model under the original's
quantizations, ``library_name: moeconv`` and the tags say how to load it.  The
body tells a reader what was quantized how (a table of schemes with their
stored bits per weight), what that saves against BF16, and the ways to load it.

Everything comes from the conversion plan, so the card is written in the same
atomic step as the index and is identical for identical conversions (no dates).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from huggingface_hub import ModelCardData

from .adapters import ROUTED
from .cardplot import HEATMAP_NAME
from .pipeline import Conversion, Task, double_quant_of, group_size_of

#: Task-specific pipeline tags by the suffix of the source's architecture class.
_PIPELINE_TAGS = (("ForCausalLM", "text-generation"), ("ForConditionalGeneration", "text2text-generation"))


@dataclass(frozen=True)
class Row:
    """One line of the scheme table: tensors of one role stored one way."""

    role: str
    storage: str
    tensors: int
    params: int
    bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


def _storage(task: Task) -> str:
    if task.spec is None:
        return f"{task.store_dtype} (as stored)"
    dq = " + double quant" if double_quant_of(task.spec) else ""
    return f"{task.spec.scheme}, group {group_size_of(task.spec)}{dq}"


def _role(task: Task) -> str:
    if task.item.router:
        return "router"
    return task.item.role or "other"


def scheme_rows(conv: Conversion) -> list[Row]:
    """The scheme table: (role, storage) -> tensors, parameters, bytes; routed experts first."""
    acc: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for task in conv.tasks:
        cell = acc[(_role(task), _storage(task))]
        cell[0] += 1
        cell[1] += task.numel
        cell[2] += task.out_bytes
    order = {ROUTED: 0, "shared_expert": 1, "router": 2, "dense": 3, "other": 4}
    rows = [Row(role, storage, *cell) for (role, storage), cell in acc.items()]
    return sorted(rows, key=lambda r: (order.get(r.role, 9), r.storage))


def routed_average_bits(conv: Conversion) -> tuple[float, float]:
    """(stored bits, code bits) per routed-expert weight over every quantized routed expert."""
    from moeconv_numpy.schemes import scheme_info

    quantized = [t for t in conv.tasks if t.item.role == ROUTED and t.spec is not None]
    numel = sum(t.numel for t in quantized)
    if not numel:
        return 0.0, 0.0
    stored = sum(8 * t.out_bytes for t in quantized) / numel
    code = sum(scheme_info(t.spec.scheme).bits * t.numel for t in quantized) / numel
    return stored, code


def bf16_bytes(conv: Conversion) -> int:
    """What the same model takes with every tensor in BF16 (the usual published size)."""
    return sum(2 * t.numel for t in conv.tasks)


def _pipeline_tag(conv: Conversion) -> str | None:
    tag = conv.source.readme_metadata.get("pipeline_tag")
    if tag:
        return tag
    for arch in conv.source.config.get("architectures") or []:
        for suffix, value in _PIPELINE_TAGS:
            if arch.endswith(suffix):
                return value
    return None


def front_matter(conv: Conversion) -> ModelCardData:
    src = conv.source
    schemes = sorted({t.spec.scheme for t in conv.tasks if t.spec is not None})
    model_type = src.config.get("model_type")
    tags = ["moeconv", "moe", "mixture-of-experts", "quantized", *schemes]
    if model_type:
        tags.append(model_type)
    if conv.assignment:
        tags.append("mixed-precision")
    license_ = src.readme_metadata.get("license")
    return ModelCardData(
        base_model=src.repo_id,
        base_model_relation="quantized" if src.repo_id else None,
        library_name="moeconv",
        tags=tags,
        pipeline_tag=_pipeline_tag(conv),
        license=license_,
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def render(conv: Conversion, title: str, location: str) -> str:
    """The whole README.md for a conversion (front matter + body); ``location`` is where it will be loaded from."""
    src = conv.source
    stored, code = routed_average_bits(conv)
    bf16, out = bf16_bytes(conv), conv.out_bytes
    where = f"[`{src.repo_id}`](https://huggingface.co/{src.repo_id})" if src.repo_id else f"`{src.path.name}`"
    revision = f" (revision `{src.revision}`)" if src.revision else ""
    lines = [
        "---",
        front_matter(conv).to_yaml(),
        "---",
        "",
        f"# {title}",
        "",
        f"{where}{revision} quantized per expert with [moeconv](https://github.com/moeconv/moeconv) "
        f"({conv.options.method.upper()}, adapter `{conv.adapter.name}`): the routed experts are quantized, "
        "routers are kept exactly as in the original, everything else as listed below.",
        "",
        "## What is stored how",
        "",
        "| Role | Storage | Tensors | Parameters | Bits per weight |",
        "|---|---|---:|---:|---:|",
    ]
    for r in scheme_rows(conv):
        lines.append(f"| {r.role} | {r.storage} | {r.tensors} | {r.params:,} | {r.bits_per_weight:.3f} |")
    lines += [
        "",
        f"- Routed experts: **{stored:.3f} stored bits per weight** (codes, scales, zero points and "
        f"double-quantization constants), {code:.3f} code bits.",
        f"- Size: **{_mb(out)}** of tensors, {100 * out / bf16:.1f}% of the {_mb(bf16)} the model takes in BF16.",
    ]
    if conv.assignment:
        lines += [
            "- Mixed precision: experts of a layer have different schemes, chosen by the allocator "
            f"(see `quantization_config` in config.json).",
            "",
            f"![Bit allocation per layer and expert]({HEATMAP_NAME})",
        ]
    repo = location
    lines += [
        "",
        "## How to use it",
        "",
        "1. In PyTorch with the moeconv loader (`pip install moeconv`); experts stay packed in memory:",
        "",
        "```python",
        "import moeconv_torch",
        f'model = moeconv_torch.load_model("{repo}", device="cuda")',
        "```",
        "",
        "2. Through transformers: importing `moeconv_torch` registers the `moeconv` quantization method:",
        "",
        "```python",
        "import moeconv_torch  # noqa: F401",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        "```",
        "",
        "3. For runtimes that cannot read the format, write a plain BF16 checkpoint with the original's",
        "   tensor names, which transformers loads without moeconv:",
        "",
        "```bash",
        f"moeconv dequantize {repo} ./bf16",
        "```",
        "",
        "The format is documented in moeconv's `spec/FORMAT.md`; `moeconv_numpy` reads it with NumPy only.",
        "",
    ]
    return "\n".join(lines)
