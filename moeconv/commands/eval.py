"""``moeconv eval``: perplexity of an original or a converted model on a text file.

Run it on the source checkpoint and on its conversion to see what quantization
cost, on exactly the same tokens (``moeconv_torch.perplexity``: fixed,
non-overlapping windows).
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def load_for_inference(model: str, device: str | None, verify: bool = False):
    """(model, tokenizer, device) for a converted directory or any transformers causal LM.

    ``verify`` checks every tensor's checksum of a converted model first.  A
    damaged converted directory, a missing path or a missing tokenizer become a
    one-line ``ClickException`` (click prints it without a traceback).
    """
    import torch
    from transformers import AutoTokenizer

    from moeconv_numpy import FormatError
    from moeconv_torch import load_any_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        lm = load_any_model(model, device=device, verify=verify)
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (FormatError, OSError, ValueError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    return lm, tokenizer, device


@click.command()
@click.argument("model")
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="UTF-8 text file to score.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Score only the first N tokens.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="Window length; windows do not overlap and a short tail is dropped.")
@click.option("--device", default=None, help="torch device  [default: cuda if available, else cpu]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def command(model: str, text_file: Path, max_tokens: int | None, seq_len: int, device: str | None, as_json: bool) -> None:
    """Perplexity of MODEL (a converted directory, or any Hugging Face causal LM) on a text file.

    A converted model's checksums are all checked first: a figure computed from
    damaged weights would mislead.
    """
    from moeconv_torch import is_converted
    from moeconv_torch.perplexity import perplexity

    lm, tokenizer, device = load_for_inference(model, device, verify=True)
    ids = tokenizer(text_file.read_text(encoding="utf-8"), return_tensors="pt").input_ids.reshape(-1)
    available = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    try:
        value = perplexity(lm, ids, seq_len=seq_len, max_tokens=max_tokens)
    except ValueError as exc:
        raise click.ClickException(f"{text_file}: {exc}") from None
    result = {
        "model": model,
        "converted": is_converted(model),
        "perplexity": value,
        "tokens": available // seq_len * seq_len,
        "seq_len": seq_len,
        "device": device,
    }
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"perplexity {value:.4f} on {result['tokens']} tokens ({result['tokens'] // seq_len} windows of {seq_len})")
