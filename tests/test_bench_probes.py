"""Tests of selagg_utils.bench.probe_rows: probe banks, tokens kept in memory, the probe side of the ladder."""
from __future__ import annotations

import pytest
import torch

from selagg_utils import SelaggError
from selagg_utils.bench import probe_rows
from selagg_utils.bench.rows import MeasureOptions

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, small_vit: conftest.py


def test_probes_of_each_kind_give_logits(small_vit):
    tokens = torch.randn(3, 65, 128)
    for kind in probe_rows.PROBE_KINDS:
        bank, _ = probe_rows.probe_bank(kind, small_vit, 10, [0.1, 0.01])
        assert [probe(tokens).shape for probe in probe_rows.bank_members(bank)] == [(3, 10)] * 2
    assert type(probe_rows.bank_members(probe_rows.probe_bank("linear", small_vit, 10, [0.1])[0])[0].pool)\
        .__name__ == "ClsPool"
    with pytest.raises(SelaggError, match="Unknown probe 'transformer'; choose one of linear"):
        probe_rows.probe_kind_head("transformer")


def test_bad_step_counts_are_refused(small_vit):
    with pytest.raises(SelaggError, match="steps"):
        probe_rows.probe_data(small_vit, 4, 0, CPU)


def test_tokens_in_memory_are_the_backbones_tokens_in_the_runs_precision(small_vit):
    data = probe_rows.probe_data(small_vit, 4, 2, CPU)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        tokens = probe_rows.tokens_in_memory(small_vit, data.images, precision)
        assert tokens.shape == (8, 65, 128) and tokens.dtype == dtype
    expected = torch.cat([small_vit.forward_features(x) for x in data.images])
    torch.testing.assert_close(probe_rows.tokens_in_memory(small_vit, data.images, "fp32"), expected)


def test_one_pass_over_many_lrs_equals_separate_runs(small_vit):
    lrs = probe_rows.learning_rates(3)
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1.0)
    torch.manual_seed(0)
    bank, opt = probe_rows.probe_bank("abmilp", small_vit, 10, lrs)
    assert sorted({g["lr"] for g in opt.param_groups}) == sorted(lrs)
    singles = []
    for probe, lr in zip(probe_rows.bank_members(bank), lrs):
        one, one_opt = probe_rows.probe_bank("abmilp", small_vit, 10, [lr])
        probe_rows.bank_members(one)[0].load_state_dict(probe.state_dict())
        singles.append((one, one_opt))
    tokens, labels = torch.randn(8, 65, 128), torch.randint(0, 10, (8,))
    for _ in range(2):
        probe_rows.train_step_fn(bank, opt, "fp32")(tokens, labels)
        for one, one_opt in singles:
            probe_rows.train_step_fn(one, one_opt, "fp32")(tokens, labels)
    for probe, (one, _) in zip(probe_rows.bank_members(bank), singles):
        for a, b in zip(probe.parameters(), probe_rows.bank_members(one)[0].parameters()):
            torch.testing.assert_close(a, b)


def test_probe_ladder_caches_and_compares(small_vit):
    data = probe_rows.probe_data(small_vit, 8, 2, CPU)
    rows = probe_rows.probe_ladder(small_vit, data, MeasureOptions(repeats=2), n_lrs=2)
    by_step = {r.step: r for r in rows}
    assert all(r.ok for r in rows)
    assert list(by_step) == ["cache tokens (once)", "online epoch, linear", "cached epoch, linear",
                             "2 lrs, 2 cached passes", "2 lrs, one cached pass", "linear head, cached epoch",
                             "abmilp head, cached epoch", "attentive head, cached epoch"]
    assert data.tokens.shape == (16, 65, 128)
    online, cached = by_step["online epoch, linear"], by_step["cached epoch, linear"]
    assert cached.versus == "online epoch, linear" and online.repeats == cached.repeats == 2
    assert online.gflop_per_image > cached.gflop_per_image > 0  # the online epoch also runs the backbone
    assert by_step["2 lrs, one cached pass"].versus == "2 lrs, 2 cached passes"
    heads = [by_step[f"{k} head, cached epoch"] for k in ("linear", "abmilp", "attentive")]
    assert heads[0].params < heads[1].params < heads[2].params
    assert heads[1].versus == heads[2].versus == "linear head, cached epoch"
