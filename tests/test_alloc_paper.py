"""The paper's combined order, level counts and signals, on hand-made numbers and tensors with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from alloc_synthetic import write_checkpoint, write_routers

from moeconv.alloc import baselines
from moeconv.alloc.paper import assign_levels, combined_order, level_counts
from moeconv.alloc.signals import max_variance, router_signal
from moeconv.alloc.source import open_source


def test_lambda_order_without_variance_outliers():
    # MaxVar all within a factor 3: the order is Λ ascending
    assert combined_order([0.4, 0.1, 0.3, 0.2], [1.0, 1.0, 1.0, 2.9]).tolist() == [1, 3, 2, 0]


def test_large_maxvar_moves_to_the_front():
    # expert 3 has the largest Λ but 3 x MaxVar of expert 0 (3.0) is below its MaxVar (10)
    assert combined_order([0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 10.0]).tolist() == [3, 0, 1, 2]


def test_move_goes_to_the_first_smaller_position_only():
    # expert 3 (MaxVar 4) passes experts 1 and 2 (3 x 1 < 4) but not expert 0 (3 x 5 > 4);
    # expert 0 (MaxVar 5) is already ahead of every expert it beats, so it stays
    assert combined_order([0.1, 0.2, 0.3, 0.4], [5.0, 1.0, 1.0, 4.0]).tolist() == [0, 3, 1, 2]


def test_zeta_controls_the_move():
    lam, var = [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 10.0]
    assert combined_order(lam, var, zeta=11.0).tolist() == [0, 1, 2, 3]
    assert combined_order(lam, var, zeta=9.0).tolist() == [3, 0, 1, 2]


@pytest.mark.parametrize(
    "levels, avg, expected",
    [
        ((4, 3, 2), 3.0, [2, 4, 2]),  # the paper's 4/3/2 at 3 bits: trade two middle pairs
        ((4, 3, 2), 3.75, [7, 0, 1]),  # above the upper third: trade every pair
        ((4, 3, 2), 2.5, [0, 4, 4]),  # lower third: two levels only
        ((4, 3, 2), 4.0, [8, 0, 0]),
        ((4, 3, 2), 2.0, [0, 0, 8]),
        ((4, 2), 3.0, [4, 4]),
    ],
)
def test_level_counts_match_the_paper_policy(levels, avg, expected):
    counts = level_counts(3, 8, levels, tuple(float(b) for b in levels), avg)
    assert counts.tolist() == [expected] * 3
    assert (counts @ np.array(levels)).sum() / 24 == pytest.approx(avg)


def test_level_counts_in_stored_bits_equal_code_bit_counts():
    # int b at g64 stores b + 0.5 bits per weight: the same counts in either unit
    code = level_counts(4, 8, (4, 3, 2), (4.0, 3.0, 2.0), 3.0)
    stored = level_counts(4, 8, (4, 3, 2), (4.5, 3.5, 2.5), 3.5)
    assert code.tolist() == stored.tolist()


def test_uneven_counts_are_spread_over_layers_within_half_an_expert():
    counts = level_counts(4, 8, (4, 2), (4.0, 2.0), 2.0 + 2.0 * 10 / 32)
    assert counts[:, 0].tolist() == [3, 3, 2, 2]
    assert counts.sum(axis=1).tolist() == [8] * 4


@pytest.mark.parametrize("levels", [(4, 3, 1), (2, 3, 4), (4,)])
def test_level_counts_reject_bad_levels(levels):
    with pytest.raises(ValueError, match="--bit-levels"):
        level_counts(1, 8, levels, tuple(float(b) for b in levels), 3.0)


def test_assign_levels_follows_the_order():
    orders = np.array([[2, 0, 3, 1]])
    assert assign_levels(orders, np.array([[1, 2, 1]])).tolist() == [[1, 2, 0, 1]]


def test_baseline_orders():
    freq = np.array([[5.0, 9.0, 1.0, 9.0]])
    assert baselines.frequency_order(freq).tolist() == [[1, 3, 0, 2]]
    assert baselines.maxvar_order(freq).tolist() == [[1, 3, 0, 2]]
    a, b = baselines.random_order(3, 8, seed=1), baselines.random_order(3, 8, seed=1)
    assert (a == b).all() and sorted(a[0].tolist()) == list(range(8))
    assert not (a == baselines.random_order(3, 8, seed=2)).all()


def test_signals_from_a_checkpoint(tmp_path):
    norms = [[1.0, 2.0, 3.0, 4.0], [4.0, 0.5, 2.0, 1.0]]
    scales = [[1.0, 1.0, 5.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    src = open_source(write_checkpoint(tmp_path / "ckpt", router_norms=norms, gate_scales=scales))
    final = router_signal(src)
    assert final.reference_norm is None and "final router-row norm" in final.note
    np.testing.assert_allclose(final.lam, norms, rtol=1e-2)

    initial = torch.full((4, 64), 0.25)  # row norm 2.0 everywhere
    ref = write_routers(tmp_path / "init.safetensors", {f"model.layers.{i}.block_sparse_moe.gate.weight": initial for i in range(2)})
    true = router_signal(src, ref)
    np.testing.assert_allclose(true.lam, np.abs(np.array(norms) - 2.0), atol=2e-2)
    np.testing.assert_allclose(true.reference_norm, 2.0, rtol=1e-6)

    maxvar = max_variance(src)
    assert maxvar.shape == (2, 4) and int(np.argmax(maxvar[0])) == 2
    # the definition: variance of the gate row with the largest norm
    w = src.read(src.experts[2].weights["gate"])
    assert maxvar[0, 2] == pytest.approx(w[w.norm(dim=1).argmax()].var().item(), rel=1e-6)


def test_reference_errors_name_the_tensor(tmp_path):
    src = open_source(write_checkpoint(tmp_path / "ckpt"))
    bad = write_routers(tmp_path / "bad.safetensors", {"model.layers.0.block_sparse_moe.gate.weight": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match="model.layers.1.block_sparse_moe.gate.weight"):
        router_signal(src, bad)
    wrong = write_routers(tmp_path / "wrong.safetensors", {f"model.layers.{i}.block_sparse_moe.gate.weight": torch.zeros(4, 8) for i in range(2)})
    with pytest.raises(ValueError, match="shape"):
        router_signal(src, wrong)
    with pytest.raises(ValueError, match="neither a file"):
        router_signal(src, tmp_path / "missing" / "x.safetensors")
