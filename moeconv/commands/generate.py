"""``moeconv generate``: stream a completion from an original or a converted model to the terminal."""

from __future__ import annotations

import click

from moeconv.commands.eval import load_for_inference


@click.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default=None, help="torch device  [default: cuda if available, else cpu]")
def command(model: str, prompt: str, max_new_tokens: int, device: str | None) -> None:
    """Generate text from MODEL (a converted directory, or any Hugging Face causal LM), token by token.

    Decoding follows the model's generation_config (greedy unless it says otherwise).
    """
    import torch
    from transformers import TextStreamer

    lm, tokenizer, device = load_for_inference(model, device)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        lm.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad)
