"""The scale-out arithmetic: counts against FlopCounterMode and closed forms, bytes, wall times and their bounds."""
import json
import math
import textwrap

import pytest
import torch

from selagg_utils.bench import timing
from selagg_utils.checks import SelaggError
from selagg_utils.models import tiny_vit
from selagg_utils.scaleout import costs, shard_files


def test_the_closed_form_equals_the_counted_flops_of_a_real_vit(small_vit):
    for model in (small_vit, tiny_vit(depth=2, embed_dim=64, num_heads=2)):
        grid = model.patch_embed.grid_size
        images = torch.zeros(1, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
        counted = timing.forward_gflop_per_image(model, images) * 1e9
        patch_values = model.patch_embed.proj.in_channels * math.prod(model.patch_embed.patch_size)
        assert counted == pytest.approx(costs.vit_forward_flops(len(model.blocks), model.embed_dim,
                                                                1 + grid[0] * grid[1], patch_values), abs=1)


def test_token_bytes_of_imagenet_and_the_int8_scale():
    assert costs.token_bytes(1_281_167, 197, 768) == 1_281_167 * 197 * 768 * 2  # about 387 GB
    assert costs.token_bytes(10, 5, 4, "bfloat16") == costs.token_bytes(10, 5, 4, "float16") == 400
    assert costs.token_bytes(10, 5, 4, "int8") == 10 * 5 * (4 + 2)           # one float16 scale per token
    assert costs.token_bytes(10, 5, 4, "float32", blocks=4) == 4 * 800
    with pytest.raises(SelaggError, match="int4"):
        costs.token_bytes(10, 5, 4, "int4")


def test_backbone_passes_and_runs():
    assert costs.probe_runs(4, 8, 3) == 96
    assert costs.backbone_passes(96, 90, cached=False) == 8640
    assert costs.backbone_passes(96, 90, cached=True) == 1


def test_head_flops_are_counted_from_the_package_heads():
    # [cls]: a linear layer D -> C, forward 2DC and its weight gradient 2DC (frozen tokens need no input gradient)
    assert costs.head_train_flops("cls", 17, 32, 10, (4, 4)) == 4 * 32 * 10
    abmilp = costs.head_train_flops("abmilp", 17, 32, 10, (4, 4))
    assert abmilp > costs.head_train_flops("cls", 17, 32, 10, (4, 4))
    assert costs.head_train_flops("abmilp", 65, 32, 10, (8, 8)) > abmilp   # more tokens, more work


def plan(**kw):
    base = dict(n_train=1000, n_val=100, n_tokens=10, width=8, head_flops={"cls": 1e3, "abmilp": 1e5},
                lrs=2, seeds=3, epochs=10, batch_size=100)
    return costs.GridPlan(**{**base, **kw})


def test_grid_seconds_add_up_and_scale_over_devices():
    rates = costs.DeviceRates("x", images_per_s=100.0, probe_flop_s={"cls": 1e6, "abmilp": 1e6})
    one, eight = costs.grid_seconds(plan(), rates, 1), costs.grid_seconds(plan(), rates, 8)
    assert one["extraction"] == pytest.approx(1100 / 100) and eight["extraction"] == pytest.approx(one["extraction"] / 8)
    # FLOP-bound: 10 epochs x 1000 images x 6 copies x FLOPs per image / FLOP/s
    assert one["probes"] == pytest.approx(10 * 1000 * 6 * (1e3 + 1e5) / 1e6)
    assert one["total"] == pytest.approx(one["extraction"] + one["probes"])
    assert eight["probes"] == pytest.approx(one["probes"] / 8)


def test_optimizer_steps_do_not_divide_over_devices():
    rates = costs.DeviceRates("x", 100.0, {"cls": 1e12, "abmilp": 1e12}, step_s=0.5)
    steps = 10 * (1000 // 100) * 0.5                           # epochs x steps per epoch x seconds per step
    for n in (1, 8):
        assert costs.probe_seconds(plan(), rates, "abmilp", n) == pytest.approx(steps)
        assert costs.probe_bound(plan(), rates, "abmilp", n) == "optimizer steps"
    bigger = plan(batch_size=500)
    assert costs.probe_seconds(bigger, rates, "abmilp", 1) == pytest.approx(steps / 5)


def test_reading_bounds_a_slow_link_and_the_store_fits_or_not():
    gpu = costs.GpuAssumptions(memory_gb=80.0, hbm_gb_s=1000.0, host_gb_s=10.0, step_ms=0.0)
    assert costs.assumed_gpu_rates(gpu, 35.0, ("abmilp",), 50.0).probe_bytes_s["abmilp"] == 1000e9
    slow = costs.assumed_gpu_rates(gpu, 35.0, ("abmilp",), 400.0)
    assert slow.probe_bytes_s["abmilp"] == 10e9
    big = plan(n_train=10_000_000, n_tokens=197, width=768, head_flops={"abmilp": 1.0})
    assert costs.probe_bound(big, slow, "abmilp", 1) == "bytes read"
    # every seed reads the tokens once per epoch; [cls] and mean read pooled float32 features
    assert big.bytes_per_epoch("abmilp") == 3 * costs.token_bytes(10_000_000, 197, 768)
    assert big.bytes_per_epoch("cls") == 3 * 10_000_000 * 768 * 4
    assert slow.images_per_s == pytest.approx(989e12 * 0.4 / 35e9)


def test_the_reference_protocol_pays_the_backbone_every_epoch_of_every_run():
    rates = costs.DeviceRates("x", images_per_s=100.0, probe_flop_s={"cls": 1e9, "abmilp": 1e9})
    p = plan()
    backbone = 2 * 2 * 3 * 10 * 1000 / 100                    # runs x epochs x images / rate
    probes = sum(1000 * f * 6 * 10 / 1e9 for f in p.head_flops.values())
    assert costs.reference_seconds(p, rates, 1) == pytest.approx(backbone + probes)
    assert costs.reference_seconds(p, rates, 4) == pytest.approx((backbone + probes) / 4)
    assert costs.reference_seconds(p, rates, 1) > costs.grid_seconds(p, rates, 1)["total"]


def test_rates_carried_to_another_backbone_keep_the_flop_rate():
    here = costs.rates_at("cpu", measured_images_per_s=100.0, measured_gflop_per_image=0.5, gflop_per_image=50.0,
                          measured_head_flop_s={"cls": 2e9})
    assert here.images_per_s == pytest.approx(1.0) and here.probe_flop_s == {"cls": 2e9} and here.step_s == 0


def test_int8_per_token_quantisation():
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 16) * torch.logspace(-3, 2, 7)[:, None]).half()  # tokens of very different sizes
    x[0, 0] = 0                                                                # an all-zero token
    values, scales = shard_files.quantized(x)
    assert values.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (3, 7)
    assert int(values.abs().max()) == 127
    back = shard_files.dequantized(values, scales)
    assert back.dtype == torch.float16 and torch.isfinite(back).all() and torch.all(back[0, 0] == 0)
    step = scales.float()[..., None]
    assert ((back.float() - x.float()).abs() <= 0.5 * step + 1e-3 * x.float().abs() + 1e-6).all()


def test_duration_text():
    assert costs.duration_text(12.34) == "12.3 s"
    assert costs.duration_text(150) == "2.5 min"
    assert costs.duration_text(3 * 3600) == "3.0 h"
    assert costs.duration_text(3 * 86400) == "3.0 days"
    assert costs.duration_text(3 * 365.25 * 86400) == "3.0 years"


def test_results_agree_within_tolerance_only():
    a = {"head": "abmilp", "best_lr": 0.1, "val_by_lr": [0.5, 0.75, float("nan")], "test": 0.7, "seconds": 3.0}
    assert costs.results_agree(a, {**a, "test": 0.7 + 1e-9, "seconds": 9.0})
    assert not costs.results_agree(a, {**a, "best_lr": 0.3})
    assert not costs.results_agree(a, {**a, "val_by_lr": [0.5, 0.76, float("nan")]})
    assert not costs.results_agree(a, {k: v for k, v in a.items() if k != "test"})


def test_stores_equal_compares_every_byte(tmp_path):
    def store(name, payload=b"tokens"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(2):
            (folder / f"shard-0000{i}.safetensors").write_bytes(payload + bytes([i]))
        (folder / "index.json").write_text(json.dumps({"shards": [{"range": [0, 2]}, {"range": [2, 3]}]}))
        return folder

    a, b = store("a"), store("b")
    assert costs.stores_equal(a, b)
    data = bytearray((b / "shard-00001.safetensors").read_bytes())
    data[0] ^= 1
    (b / "shard-00001.safetensors").write_bytes(bytes(data))
    assert not costs.stores_equal(a, b)
    (store("c") / "shard-00001.safetensors").unlink()
    assert not costs.stores_equal(a, tmp_path / "c")
    assert not costs.stores_equal(tmp_path / "empty1", tmp_path / "empty2")


@pytest.mark.slow
def test_run_script_runs_under_torchrun_and_reports_failures(tmp_path):
    script = tmp_path / "world.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if rank == 0:
            json.dump({"world": world}, open(sys.argv[sys.argv.index("--out") + 1], "w"))
            print(f"world size {world}")
    """))
    out = tmp_path / "out.json"
    result = costs.run_script(script, ["--out", out], nproc=2, timeout=300)
    assert result["summary"] == "world size 2" and result["json"] == {"world": 2} and result["seconds"] > 0
    failing = tmp_path / "fail.py"
    failing.write_text("import sys\nprint('bad input', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(SelaggError, match="fail.py with 1 process failed"):
        costs.run_script(failing, [], nproc=1, timeout=300)


def test_failure_line_finds_the_error_under_torchruns_banners():
    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
              "SelaggError: Process 1 of 2 holds no training images; use fewer processes.\n"
              "E1130 torch.distributed.elastic.multiprocessing.api: failed (exitcode: 1)\n"
              "============================================================\n")
    assert costs.failure_line(stderr) == "SelaggError: Process 1 of 2 holds no training images; use fewer processes."
    assert costs.failure_line("just a line\n=====\n") == "just a line"
    assert costs.failure_line("") == "no message"
