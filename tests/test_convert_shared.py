"""The trained shared model: defaults give 4.127 stored bits per expert weight and barely move perplexity.

The full figure (32,768 tokens: 6.243 after conversion against 6.112 in BF16,
target <= 6.26) takes minutes on 2 cores; here the same comparison runs on the
first 2,048 tokens, against the BF16 model on the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from moeconv.cli import main
from moeconv_numpy import open_model

MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "moe-tiny-mixtral"

pytestmark = [
    pytest.mark.shared_model,
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.is_dir(), reason=f"{MODEL} is absent (the shared trained model)"),
]


def test_defaults_on_the_trained_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeconv_torch.perplexity import perplexity

    for args in (["convert", str(MODEL), str(tmp_path / "nf4")], ["dequantize", str(tmp_path / "nf4"), str(tmp_path / "bf16")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output

    model = open_model(tmp_path / "nf4")
    experts = [w for w in model.weights.values() if w.role == "routed_expert"]
    assert len(experts) == 4 * 8 * 3 and {w.scheme for w in experts} == {"nf4"}
    bits = sum(w.stored_bits for w in experts) / sum(w.shape[0] * w.shape[1] for w in experts)
    assert 4.0 < bits <= 4.128  # 26% of BF16

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    ids = torch.tensor(tokenizer((MODEL / "eval.txt").read_text())["input_ids"])
    ppl = {}
    for name, path in (("bf16", MODEL), ("converted", tmp_path / "bf16")):
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        ppl[name] = perplexity(lm, ids, 512, 2048)
    assert ppl["converted"] / ppl["bf16"] < 6.26 / 6.112, ppl
