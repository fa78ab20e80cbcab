"""Routed calibration for the allocator: which tokens reach each expert, and how much the loss cares.

One pass over the calibration text (forward, and backward when loss weights
are asked for) with hooks on every MoE block of the transformers model:

* the experts module's inputs give, per expert, the hidden states routed to
  it and the routing weight each carried (``top_k_weights``, the factor the
  expert's output is multiplied by);
* the router's logits give each expert's probability mass over all tokens;
* the gradient of the summed next-token loss with respect to the block's
  output gives, per token, ``||g_t||^2``: how strongly the loss reacts to an
  error added to the residual stream at that layer and position.

Each routed token gets the weight ``q_t = w_t^2 * ||g_t||^2`` (``w_t^2`` only
without gradients), so that ``sum_t q_t ||E_q(x_t) - E(x_t)||^2`` is an isotropic
Fisher (Gauss-Newton) estimate of the loss increase caused by quantizing the
expert: plain output error ranks late-layer experts too high because the
residual stream grows with depth, while the loss does not.

Per expert a uniform random sample of at most ``max_tokens`` routed tokens
is kept (smallest random keys, merged batch by batch), with the count of all
routed tokens so that damages can be scaled back to the full set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["RoutedSample", "CalibrationStats", "measure", "load_model_and_ids"]


@dataclass
class RoutedSample:
    """A uniform sample of the tokens routed to one expert: inputs, Fisher weights, and how many there were."""

    x: torch.Tensor
    weight: torch.Tensor
    key: torch.Tensor
    total: int = 0

    @classmethod
    def empty(cls, hidden: int) -> RoutedSample:
        return cls(torch.zeros(0, hidden), torch.zeros(0), torch.zeros(0))

    def add(self, x: torch.Tensor, weight: torch.Tensor, key: torch.Tensor, cap: int) -> None:
        """Merge new routed tokens; keep the ``cap`` with the smallest keys (a uniform sample of all seen)."""
        self.total += x.shape[0]
        xs, ws, ks = torch.cat([self.x, x]), torch.cat([self.weight, weight]), torch.cat([self.key, key])
        if ks.numel() > cap:
            keep = torch.topk(ks, cap, largest=False).indices
            xs, ws, ks = xs[keep], ws[keep], ks[keep]
        self.x, self.weight, self.key = xs, ws, ks

    @property
    def scale(self) -> float:
        """Factor from a sum over the sample to an estimate of the sum over all routed tokens."""
        return self.total / self.x.shape[0] if self.x.shape[0] else 0.0


@dataclass
class CalibrationStats:
    """Routing statistics and routed samples per (layer, expert), and what they were measured on."""

    tokens: dict[tuple[int, int], float]
    mass: dict[tuple[int, int], float]
    samples: dict[tuple[int, int], RoutedSample] = field(default_factory=dict)
    description: str = ""
    loss_weighted: bool = False
    #: damages already measured, by (candidates, method): plans at other budgets reuse them
    damages: dict[tuple, dict] = field(default_factory=dict)


def _get(module: torch.nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


class _LayerHooks:
    """Hooks of one MoE block, collecting one batch at a time."""

    def __init__(self, block, arch, want_grad: bool):
        self.arch, self.batch = arch, {}
        router, experts = _get(block, arch.router), _get(block, arch.experts)
        self.handles = [
            router.register_forward_hook(self._router),
            experts.register_forward_pre_hook(self._experts, with_kwargs=True),
        ]
        if want_grad:
            self.handles.append(block.register_forward_hook(self._block))

    def _router(self, _module, _args, output):
        logits = (output[0] if isinstance(output, tuple) else output).detach().float()
        logits = logits.reshape(-1, logits.shape[-1])
        self.batch["probs"] = logits.softmax(-1) if self.arch.scoring == "softmax" else logits.sigmoid()

    def _experts(self, _module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = dict(zip(names, args)) | {k: kwargs[k] for k in names if k in kwargs}
        x = values["hidden_states"].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        self.batch["x"] = x
        self.batch["index"] = values["top_k_index"].reshape(x.shape[0], -1)
        self.batch["weights"] = values["top_k_weights"].detach().reshape(x.shape[0], -1).float()

    def _block(self, _module, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        if out.requires_grad:
            out.register_hook(self._grad)

    def _grad(self, grad):
        self.batch["g2"] = grad.reshape(-1, grad.shape[-1]).float().square().sum(-1)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _moe_blocks(model, arch) -> dict[int, torch.nn.Module]:
    blocks = {}
    for index, layer in enumerate(_get(model, arch.layers)):
        block = getattr(layer, arch.block, None)
        if block is not None and getattr(block, arch.experts, None) is not None:
            blocks[index] = block
    return blocks


def _collect(stats: CalibrationStats, layer: int, batch: dict, n_experts: int, cap: int, generator) -> None:
    x, index, weights = batch["x"], batch["index"], batch["weights"]
    probs = batch["probs"]
    fisher = batch.get("g2")
    flat = index.reshape(-1)
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1])
    q = weights.reshape(-1).square() * (fisher[token] if fisher is not None else 1.0)
    mass = probs.sum(0).cpu()
    for e in range(n_experts):
        chosen = flat == e
        rows = token[chosen]
        key = (layer, e)
        stats.tokens[key] = stats.tokens.get(key, 0.0) + float(rows.numel())
        stats.mass[key] = stats.mass.get(key, 0.0) + float(mass[e])
        if key not in stats.samples:
            stats.samples[key] = RoutedSample.empty(x.shape[1])
        keys = torch.rand(rows.numel(), generator=generator)
        stats.samples[key].add(x[rows].cpu(), q[chosen].cpu(), keys, cap)


def measure(
    model,
    input_ids: torch.Tensor,
    *,
    loss_weighted: bool = True,
    max_tokens: int = 4096,
    batch_size: int = 8,
    seed: int = 0,
    description: str = "",
) -> CalibrationStats:
    """Routed samples and routing statistics of every MoE layer of ``model`` on ``input_ids`` ``[n, seq_len]``.

    ``model`` is a transformers MoE model (``moeconv.calib.arch_for`` knows
    where its routers and experts are); it is not modified and no parameter
    gradient is computed.  With ``loss_weighted`` one backward pass per batch
    (to the activations only) provides the loss weights.
    """
    from moeconv.calib import arch_for

    arch = arch_for(model)
    blocks = _moe_blocks(model, arch)
    hooks = {layer: _LayerHooks(block, arch, loss_weighted) for layer, block in blocks.items()}
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    stats = CalibrationStats({}, {}, description=description, loss_weighted=loss_weighted)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for parameter in trainable:  # gradients flow to the activations only, never into .grad
        parameter.requires_grad_(False)
    try:
        for batch in input_ids.split(batch_size):
            batch = batch.to(device)
            if loss_weighted:
                with torch.enable_grad():
                    inputs = embed(batch).detach().requires_grad_(True)
                    loss = model(inputs_embeds=inputs, labels=batch, use_cache=False).loss
                    (loss * batch[:, 1:].numel()).backward()
            else:
                with torch.no_grad():
                    model(input_ids=batch, use_cache=False)
            for layer, hook in hooks.items():
                n_experts = hook.batch["probs"].shape[-1]
                _collect(stats, layer, hook.batch, n_experts, max_tokens, generator)
                hook.batch = {}
    finally:
        for hook in hooks.values():
            hook.remove()
        for parameter in trainable:
            parameter.requires_grad_(True)
        model.train(was_training)
    return stats


def load_model_and_ids(source_path: Path, calib: Path, n_samples: int, seq_len: int, skip_tokens: int, device: str):
    """The float32 transformers model of a checkpoint directory and ``[n, seq_len]`` calibration ids from a text file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeconv.calib import calibration_ids

    tokenizer = AutoTokenizer.from_pretrained(source_path)
    ids = calibration_ids(calib, tokenizer, n_samples, seq_len, skip_tokens)
    model = AutoModelForCausalLM.from_pretrained(source_path, dtype=torch.float32).to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, ids
