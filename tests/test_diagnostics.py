"""Per-layer trust-ratio diagnostics (train/diagnostics.py, --trust-ratio-interval) and analysis.compare's panels.

* A LARS run of train/imagenet.py (one process, small ResNet) writes "layers" records equal to You et al. 2017's
  eq. 6 recomputed here in float64 from the weights and gradients the optimizer was handed (saved by a wrapper
  around LARS.step in the run's own process).
* Through the deepspeed launcher on 2 ranks (tests/workers/diag_worker.py, one launch): the records under ZeRO-1/2,
  where a Linear weight straddles the ranks' partitions, equal ZeRO-0's and a float64 plain-PyTorch recomputation of
  LARS, LARC (min(ratio / lr, 1)), LAMB (||u|| too; and with a max_trust_ratio that clamps one layer of three) and
  SGD (the ratio LARS would apply), to within a rounding control measured here: the distance of the same
  recomputation in fp32 from float64. bf16 ZeRO-1 equals bf16 ZeRO-0 alike. A parameter outside the forward pass
  has an entry in every record, the same in ZeRO-0 and ZeRO-2. A LAMB rank whose share of a group is only padding
  records what rank 0 does.
* In one process: an entry for a parameter the optimizer skips (no gradient); a LAMB rank holding only padding of a
  bound group keeps its record; the config check that refuses AdamW before the engine is built.
* analysis.compare's heat map, overlay and ||w||/||g|| table from hand-made metrics files.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, child_env, node_launch, read_metrics, write_config
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diag_worker as worker  # noqa: E402
import ds_optim_worker as base  # noqa: E402

ROUNDING_FACTOR = 10  # measured: every mode within 1.05x of the fp32 recomputation's own distance from float64
ETA, WD = 0.02, 1e-3


# ---------------------------------------------------------------------------------------------------------------
# A LARS run through train/imagenet.py against eq. 6 from the saved weights and gradients

DRIVER = """
import sys, torch
sys.path.insert(0, ".")
import optimizers
from train import imagenet, loop
saved, names, original = [], {}, loop.build_engine
def build_engine(*args, **kwargs):
    engine, cfg = original(*args, **kwargs)
    names.update({id(p): n for n, p in engine.module.named_parameters()})
    return engine, cfg
def step(self, closure=None, _step=optimizers.LARS.step):
    saved.append({names[id(p)]: (p.detach().clone(), p.grad.detach().clone())
                  for g in self.param_groups for p in g["params"] if p.grad is not None})
    return _step(self, closure)
loop.build_engine, optimizers.LARS.step = build_engine, step
code = imagenet.cli.run(imagenet.main, imagenet.get_args_parser().parse_args(sys.argv[2:]))
torch.save(saved, sys.argv[1])
sys.exit(code)
"""


def test_lars_run_records_match_eq6_from_saved_weights_and_gradients(tmp_path, fashion_mnist_dir):
    """ZeRO-0 fp32, 3 steps of 64 images, interval 1: every step's record holds, per parameter tensor in
    state_dict order, ||w||, ||g|| and eta ||w|| / (||g|| + wd ||w|| + eps) of the tensors LARS stepped; batch-norm
    parameters and biases (not adapted) carry their norms and a null ratio."""
    cfg = write_config(tmp_path / "lars.json", {
        "train_batch_size": 64, "train_micro_batch_size_per_gpu": 64, "zero_optimization": {"stage": 0},
        "optimizer": {"type": "LARS", "params": {"lr": 2.0, "momentum": 0.9, "weight_decay": WD,
                                                 "trust_coefficient": ETA}},
        "training": {"epochs": 1}})
    run, saved = tmp_path / "run", tmp_path / "saved.pt"
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(saved), "--deepspeed_config", str(cfg), "--dataset", "fashion-mnist",
         "--data-dir", str(fashion_mnist_dir), "--arch", "resnet_small", "--train-subset", "192", "--val-subset", "64",
         "--precision", "fp32", "--output-dir", str(run), "--no-wandb", "--trust-ratio-interval", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [r for r in read_metrics(run) if r["kind"] == "layers"]
    steps = torch.load(saved, weights_only=True)
    assert [r["step"] for r in records] == [1, 2, 3] and len(steps) == 3
    from train.models import SmallResNet

    state_names = [n for n, p in SmallResNet(1, 10).state_dict().items() if p.is_floating_point()
                   and not n.endswith(("running_mean", "running_var"))]
    adapted = {n for n, p in SmallResNet(1, 10).named_parameters() if p.ndim > 1}
    for record, tensors in zip(records, steps, strict=True):
        assert record["optimizer"] == "LARS" and record["ratio"] == "applied"
        assert [e["name"] for e in record["layers"]] == state_names
        for e in record["layers"]:
            w, g = (t.double() for t in tensors[e["name"]])
            wn, gn = float(w.norm()), float(g.norm())
            assert e["w_norm"] == pytest.approx(wn, rel=1e-5, abs=1e-12), e
            assert e["g_norm"] == pytest.approx(gn, rel=1e-5, abs=1e-12), e
            assert e["adapted"] == (e["name"] in adapted)
            if not e["adapted"]:
                assert e["trust_ratio"] is None
            elif wn == 0 or gn == 0:  # zero-initialised layers, or no gradient yet behind a zero gamma: ratio 1
                assert e["trust_ratio"] == 1.0
            else:
                assert e["trust_ratio"] == pytest.approx(ETA * wn / (gn + WD * wn + 1e-8), rel=1e-5), e
    ratios = [e["trust_ratio"] for e in records[-1]["layers"] if e["adapted"] and e["trust_ratio"] != 1.0]
    assert max(ratios) / min(ratios) > 10  # layers differ: a per-model ratio would not pass the checks above


def test_records_only_due_steps_and_refuses_optimizers_that_cannot_record():
    """Interval 2 from step 1: records at steps 2 and 4 only (a resumed run passes its next step); interval 0 builds
    nothing; a torch optimizer (no recording) is refused with a message naming it."""
    from types import SimpleNamespace

    import optimizers
    from optimizers.sgd import LARS_ETA
    from train.config import ConfigError
    from train.diagnostics import TrustRatioMonitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = optimizers.build_optimizer("sgd", model, {"lr": 0.1, "weight_decay": 1e-4})
    engine = SimpleNamespace(optimizer=opt, module=model)
    assert TrustRatioMonitor.create(engine, 0, 1) is None and not opt.record
    lars_eta = inspect.signature(optimizers.LARS).parameters["trust_coefficient"].default
    assert LARS_ETA == lars_eta  # SGD records the ratio of LARS's default eta
    log = worker.ListLog()
    monitor = TrustRatioMonitor.create(engine, 2, next_step=1)
    for step in range(1, 5):
        model.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        monitor.after_step(step, 8 * step, log)
    assert [r["step"] for r in log.records] == [2, 4]
    assert [e["name"] for e in log.records[0]["layers"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert TrustRatioMonitor.create(engine, 5, next_step=10).optimizer.record  # resumed before a due step
    adam = SimpleNamespace(optimizer=torch.optim.Adam(model.parameters()), module=model)
    with pytest.raises(ConfigError, match="--trust-ratio-interval needs one of our optimizers .* is Adam"):
        TrustRatioMonitor(adam, 1, 1)


def test_a_parameter_the_optimizer_skips_has_an_entry():
    """Used without DeepSpeed's all-reduce (which zero-fills), a parameter outside the forward pass has no gradient
    and the optimizer skips it; its entry still comes, in model order: ||w|| of the parameter, g_norm 0, no ratio,
    and "adapted" as its param group says."""
    from types import SimpleNamespace

    import optimizers
    from train.diagnostics import TrustRatioMonitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model.register_module("unused", nn.Linear(5, 2))  # registered, but Sequential.forward ran its modules before
    forward = nn.Sequential(*list(model)[:3])
    opt = optimizers.build_optimizer("lars", model, {"lr": 0.1, "weight_decay": 1e-4})
    monitor = TrustRatioMonitor(SimpleNamespace(optimizer=opt, module=model), 1, 1)
    log = worker.ListLog()
    forward(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    monitor.after_step(1, 8, log)
    entries = log.records[0]["layers"]
    assert [e["name"] for e in entries] == ["0.weight", "0.bias", "2.weight", "2.bias", "unused.weight", "unused.bias"]
    for e, p in zip(entries[4:], (model.unused.weight, model.unused.bias), strict=True):
        assert p.grad is None and e["g_norm"] == 0.0 and e["trust_ratio"] is None, e
        assert e["w_norm"] == pytest.approx(float(p.detach().double().norm()), rel=1e-12)
        assert e["adapted"] == (p.ndim > 1)  # build_param_groups: weights adapted, biases not


def test_config_check_refuses_an_optimizer_that_cannot_record_before_the_engine():
    """train/imagenet.py and train/bert.py call check_optimizer on the config right after reading it."""
    from train.config import ConfigError
    from train.diagnostics import check_optimizer

    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(ConfigError, match="--trust-ratio-interval 5 needs one of our optimizers .* type is 'AdamW'"):
        check_optimizer(cfg, 5)
    check_optimizer(cfg, 0)  # off: any optimizer
    for name in ("SGD", "LARS", "larc", "Lamb"):
        check_optimizer({"optimizer": {"type": name}}, 5)


def test_lamb_rank_holding_only_padding_keeps_its_record():
    """A rank whose share of a bound LAMB group is only padding (no segment) still records every layer of the group
    with a ratio and ||u||: the norms the group's all-reduce brings (zero here, one process: ratio 1, the zero-norm
    rule) and the update-norm scale from the group's step count. Without it the record had no ratio."""
    from optimizers import LAMB, FlatLayout

    flat = torch.nn.Parameter(torch.zeros(6))  # this rank's partition: padding only
    opt = LAMB([flat], lr=0.1, weight_decay=0.01)
    opt.set_layout(flat, FlatLayout(numel=6, segments=(), num_layers=3, group_layers=(0, 2)))
    flat.grad = torch.zeros(6)
    for _ in range(2):
        opt.record = True
        opt.step()
        (stats,) = opt.take_records()
        assert stats.layers == (0, 2)
        assert stats.ratio is not None and stats.ratio.tolist() == [1.0, 1.0]
        assert stats.u_norm is not None and stats.u_norm.tolist() == [0.0, 0.0]
    assert torch.equal(flat.detach(), torch.zeros(6))  # padding is never written


# ---------------------------------------------------------------------------------------------------------------
# ZeRO-1/2 and bf16 against ZeRO-0 and float64, through the launcher

RUNS = ("fp32-z0:lars", "fp32-z1:lars", "fp32-z2:lars", "fp32-z0:lamb", "fp32-z2:lamb", "fp32-z0:sgd",
        "fp32-z2:sgd", "bf16-z0:lars", "bf16-z1:lars", "fp32-z2:lamb_clamp", "fp32-z2:larc")
UNUSED_RUNS = ("fp32-z0:lars_unused", "fp32-z2:lars_unused")  # in the same launch, as PAD_RUN
PAD_RUN = "fp32-z1:lamb_pad"


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("diag") / "results.pt"
    cmd = node_launch("tests/workers/diag_worker.py", ["--out", str(out), "--runs", *RUNS, *UNUSED_RUNS, PAD_RUN])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@functools.cache
def reference(variant: str, dtype: torch.dtype, world_size: int = 2) -> list[dict[str, tuple]]:
    """Per step and layer (||w||, ||g||, ratio), and for LAMB ||u||, of a plain PyTorch run written out here: LARS
    (You et al. 2017, eq. 6 and Algorithm 1 in the torch momentum form), LARC (apex's clip: min(ratio / lr, 1)), LAMB
    (You et al. 2019, Algorithm 2; the ratio clamped at max_trust_ratio where set) or momentum SGD with the ratio
    LARS (eta 0.001) would apply; the gradient is the mean of the ranks' micro-batch gradients."""
    name, params = worker.VARIANTS[variant]
    model = base.make_model().to(dtype)
    adapted = {n for n, p in model.named_parameters() if p.ndim > 1}  # no BN parameters or biases (build_param_groups)
    state: dict[str, dict[str, torch.Tensor]] = {n: {} for n, _ in model.named_parameters()}
    out = []
    for step in range(worker.STEPS):
        lr = base.lr_at(params["lr"], step, worker.STEPS)
        model.zero_grad()
        loss = sum(nn.functional.cross_entropy(model(x.to(dtype)), y) for x, y in
                   (base.batch(step, r) for r in range(world_size)))
        (loss / world_size).backward()
        rec = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                w, g, s = p, p.grad, state[n]
                wd = params["weight_decay"] if n in adapted else 0.0
                wn, gn = float(w.norm()), float(g.norm())
                ratio = None
                if name in ("lars", "larc", "sgd"):
                    eta = params.get("trust_coefficient", 0.001)
                    if n in adapted:
                        ratio = eta * wn / (gn + wd * wn + 1e-8) if wn > 0 and gn > 0 else 1.0
                        if name == "larc" and wn > 0 and gn > 0:
                            ratio = min(ratio / lr, 1.0)
                    d = (g + wd * w) * (ratio if name != "sgd" and ratio is not None else 1.0)
                    s["v"] = d.clone() if step == 0 else 0.9 * s["v"] + d
                    w -= lr * s["v"]
                else:  # LAMB, eps 1e-6, betas (0.9, 0.999)
                    s["m"] = 0.1 * g if step == 0 else 0.9 * s["m"] + 0.1 * g
                    s["v"] = 0.001 * g * g if step == 0 else 0.999 * s["v"] + 0.001 * g * g
                    t = step + 1
                    u = (s["m"] / (1 - 0.9 ** t)) / ((s["v"] / (1 - 0.999 ** t)).sqrt() + 1e-6) + wd * w
                    un = float(u.norm()) if n in adapted else None
                    if un is not None:
                        ratio = min(wn / un, params.get("max_trust_ratio") or math.inf) if wn > 0 and un > 0 else 1.0
                    w -= lr * (ratio if ratio is not None else 1.0) * u
                rec[n] = (wn, gn, ratio) if name != "lamb" else (wn, gn, ratio, un)
        out.append(rec)
    return out


def rel_diff(a: float | None, b: float | None) -> float:
    assert (a is None) == (b is None), (a, b)
    return 0.0 if a is None or a == b else abs(a - b) / abs(b)


def max_diff(got: list[dict[str, tuple]], want: list[dict[str, tuple]]) -> float:
    return max(rel_diff(x, y) for g, w in zip(got, want, strict=True) for n in w
               for x, y in zip(g[n], w[n], strict=True))


def as_tuples(records: list[dict[str, Any]]) -> list[dict[str, tuple]]:
    """(w_norm, g_norm, trust_ratio), and u_norm where logged (LAMB), per step and layer."""
    return [{e["name"]: (e["w_norm"], e["g_norm"], e["trust_ratio"]) + ((e["u_norm"],) if "u_norm" in e else ())
             for e in r["layers"]} for r in records]


@functools.cache
def rounding_control(variant: str) -> float:
    """The distance of the fp32 recomputation from the float64 one (the same arithmetic, fp32 rounding)."""
    control = max_diff(reference(variant, torch.float32), reference(variant, torch.float64))
    assert 0 < control < 1e-5, f"{variant}: rounding control {control:.2e}"
    return control


@pytest.mark.launcher
@pytest.mark.parametrize("run", RUNS)
def test_zero_stages_log_the_ratios_of_zero_0_and_of_float64(zero_results, run):
    """Every mode: records at steps 1-3 naming every parameter, equal (w_norm, g_norm, trust_ratio) to the float64
    recomputation within ROUNDING_FACTOR x the rounding control, and to ZeRO-0 of the same precision likewise. In
    ZeRO-1/2 layers are split across the 2 ranks' partitions, and rank 0 reports the layers it does not hold."""
    mode, variant = run.split(":")
    res = zero_results["results"][run]
    assert [r["step"] for r in res["records"]] == [1, 2, 3]
    got = as_tuples(res["records"])
    names = [n for n, _ in base.make_model().named_parameters()]
    assert all(list(r) == names for r in got)
    tol = ROUNDING_FACTOR * rounding_control(variant)
    zero_0 = f"{mode.split('-')[0]}-z0:{variant}"
    if "z0" not in mode:
        assert res["split_layers"], f"{run}: no layer straddles the partitions ({res['binding']})"
    if "z0" not in mode and zero_0 in RUNS:
        same = as_tuples(zero_results["results"][zero_0]["records"])
        assert max_diff(got, same) < tol, f"{run} vs ZeRO-0: {max_diff(got, same):.2e} (tolerance {tol:.1e})"
    if mode.startswith("fp32"):
        want = reference(variant, torch.float64)
        assert max_diff(got, want) < tol, f"{run} vs float64: {max_diff(got, want):.2e} (tolerance {tol:.1e})"
    record = res["records"][0]
    assert record["ratio"] == {"sgd": "lars_would_apply", "larc": "larc_clipped"}.get(variant, "applied")
    assert res["wandb"][0] == {f"trust_ratio/{e['name']}": e["trust_ratio"] for e in record["layers"]
                               if e["adapted"]}
    adapted = [e for r in res["records"] for e in r["layers"] if e["adapted"]]
    if variant.startswith("lamb"):  # ||u|| logged (against float64 above), and ratio = ||w|| / ||u|| after clamping
        clamp = worker.VARIANTS[variant][1].get("max_trust_ratio") or math.inf
        for e in adapted:
            assert e["trust_ratio"] == pytest.approx(min(e["w_norm"] / e["u_norm"], clamp), rel=1e-6)
        if clamp < math.inf:  # the clamp binds for some layers, not for others
            assert {e["trust_ratio"] == pytest.approx(clamp, rel=1e-6) for e in adapted} == {True, False}
    if variant == "larc":  # min(ratio / lr, 1): clipped at 1 for some layers at step 1, not for others
        assert {e["trust_ratio"] == 1.0 for e in record["layers"] if e["adapted"]} == {True, False}


@pytest.mark.launcher
def test_a_parameter_without_gradient_has_an_entry_in_every_zero_stage(zero_results):
    """A parameter outside the forward pass (tests/workers/diag_worker.py's lars_unused model) is in every record with
    the same numbers in ZeRO-0 and ZeRO-2: DeepSpeed hands the optimizer a zero gradient for it in both (ZeRO-0's
    all-reduce zero-fills a missing gradient), so g_norm 0, LARS's ratio 1 for a zero gradient, and weight decay only
    (w_t = c_t w_0 with the momentum recursion written out here). The other layers equal the plain LARS run's."""
    w0 = float(worker.make_model("lars_unused").get_parameter(worker.UNUSED).detach().double().norm())
    lr, wd = worker.VARIANTS["lars"][1]["lr"], worker.VARIANTS["lars"][1]["weight_decay"]
    c, v, scale = 1.0, 0.0, []
    for step in range(worker.STEPS):
        scale.append(c)
        v = 0.9 * v + wd * c if step else wd * c  # d = ratio (0 + wd w) with ratio 1
        c -= base.lr_at(lr, step, worker.STEPS) * v
    plain = as_tuples(zero_results["results"]["fp32-z0:lars"]["records"])
    names = [worker.UNUSED] + [n for n, _ in base.make_model().named_parameters()]
    for run in UNUSED_RUNS:
        records = zero_results["results"][run]["records"]
        assert [r["step"] for r in records] == [1, 2, 3]
        for step, (r, others) in enumerate(zip(records, plain, strict=True)):
            assert [e["name"] for e in r["layers"]] == names, run
            e = r["layers"][0]
            assert e["adapted"] and e["g_norm"] == 0.0 and e["trust_ratio"] == 1.0, (run, e)
            assert e["w_norm"] == pytest.approx(w0 * scale[step], rel=1e-6), (run, e)
            got = {x["name"]: (x["w_norm"], x["g_norm"], x["trust_ratio"]) for x in r["layers"][1:]}
            assert max_diff([got], [others]) < ROUNDING_FACTOR * rounding_control("lars"), run


@pytest.mark.launcher
def test_lamb_rank_holding_only_padding_of_a_group_records_what_rank_0_does(zero_results):
    """ZeRO-1, 2 ranks, LAMB with a 2-element weight in a param group of its own (tests/workers/diag_worker.py's
    TinyHead): rank 1's partition of that group is only padding, yet its records equal rank 0's, the ratio and ||u||
    of that layer included (the update-norm scale comes from the group's step count). Without that, rank 1 had no
    ratio."""
    res = zero_results["results"][PAD_RUN]
    rank0, rank1 = res["ranks"]
    assert rank0["padding_only"] == [False, False, False] and rank1["padding_only"] == [False, False, True]
    assert [r["step"] for r in rank1["records"]] == [1, 2, 3]
    assert rank1["records"] == rank0["records"]
    for record in rank0["records"]:
        (tiny,) = [e for e in record["layers"] if e["name"] == "tiny"]
        assert tiny["adapted"] and tiny["trust_ratio"] == pytest.approx(tiny["w_norm"] / tiny["u_norm"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# analysis.compare's panels from hand-made metrics files

def write_run(folder: Path, batch: int, records: list[dict[str, Any]], optimizer: str = "LARS") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "run_name": folder.name, "derived": {"global_batch": batch, "lr": 1.0}, "optimizer": {"type": optimizer},
        "training": {}}))
    lines = [{"kind": "layers", "step": s, "samples": s * batch, "optimizer": optimizer, "ratio": "applied",
              "layers": layers} for s, layers in records]
    lines.append({"kind": "epoch", "epoch": 1.0, "step": records[-1][0], "samples": records[-1][0] * batch,
                  "val_top1_error": 50.0, "train_loss": 1.0, "train_error": 40.0, "lr": 1.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def layer(name: str, w: float, g: float, ratio: float | None) -> dict[str, Any]:
    return {"name": name, "w_norm": w, "g_norm": g, "trust_ratio": ratio, "adapted": ratio is not None}


NAMES = ["stem.0.weight", "stem.1.weight", "blocks.0.conv1.weight", "blocks.1.conv1.weight", "fc.weight", "fc.bias"]


def fake_records(scale: float) -> list[tuple[int, list[dict[str, Any]]]]:
    out = []
    for s in (5, 10, 15):
        out.append((s, [layer(n, 1.0 + i + s / 100, scale * (i + 1) / s, None if n.endswith(("1.weight", "bias"))
                                 and not n.startswith("blocks") else 0.001 * (1 + i) * s * scale)
                        for i, n in enumerate(NAMES)]))
    return out


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    return [write_run(tmp_path / "lars-256", 256, fake_records(1.0)),
            write_run(tmp_path / "lars-8192", 8192, fake_records(3.0))]


def test_compare_writes_heat_map_overlay_and_you_table(tmp_path, two_runs):
    from analysis import compare, runs

    loaded = [runs.load_run(p) for p in two_runs]
    out = tmp_path / "out"
    summary = compare.compare(loaded, out)
    for name in ("trust_ratio_heatmap.png", "trust_ratio_layers.png", "w_over_g_table.md"):
        assert name in summary["files"] and (out / name).stat().st_size > 0
    # the heat map's data: layers x steps, the ratio, NaN where a layer is not adapted
    names, steps, matrix = runs.trust_ratio_matrix(loaded[1])
    assert names == NAMES and steps == [5, 10, 15] and matrix.shape == (6, 3)
    for j, (_, layers) in enumerate(fake_records(3.0)):
        for i, e in enumerate(layers):
            if e["trust_ratio"] is None:
                assert math.isnan(matrix[i, j])
            else:
                assert matrix[i, j] == pytest.approx(e["trust_ratio"])
    fig = compare.plot_trust_ratio_heatmaps(loaded)
    image = next(im for ax in fig.axes for im in ax.images if im.get_gid() == f"run:{loaded[1].name}")
    drawn = image.get_array()  # the adapted layers' rows only
    adapted = [i for i, (_, e) in enumerate(zip(NAMES, fake_records(3.0)[0][1], strict=True)) if e["adapted"]]
    assert adapted == [0, 2, 3, 4] and drawn.shape == (4, 3)
    assert [float(v) for v in drawn.ravel()] == pytest.approx([float(v) for i in adapted for v in matrix[i]])
    # one log colour scale per kind of ratio: the LARS runs share one, a LAMB run (||w|| / ||u||) gets its own
    lamb = runs.load_run(write_run(tmp_path / "lamb-256", 256, fake_records(100.0), optimizer="LAMB"))
    fig = compare.plot_trust_ratio_heatmaps([*loaded, lamb])
    norms = {im.get_gid(): (im.norm.vmin, im.norm.vmax) for ax in fig.axes for im in ax.images}

    def extent(*scales: float) -> tuple[float, float]:
        ratios = [e["trust_ratio"] for sc in scales for _, ls in fake_records(sc) for e in ls if e["trust_ratio"]]
        return min(ratios), max(ratios)

    for r in loaded:
        assert norms[f"run:{r.name}"] == pytest.approx(extent(1.0, 3.0))
    assert norms[f"run:{lamb.name}"] == pytest.approx(extent(100.0))
    assert {ax.get_ylabel() for ax in fig.axes if not ax.images and ax.get_visible()} >= {
        "LARS trust ratio", "LAMB ||w|| / ||u||"}
    # the overlay: the chosen layer's ratio against epochs, one line per run
    fig = compare.plot_trust_ratio_layers(loaded, ["fc.weight"])
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines()}
    ys = lines[f"run:{loaded[0].name}:fc.weight"].get_ydata()
    assert list(ys) == pytest.approx([e["trust_ratio"] for _, layers in fake_records(1.0) for e in layers
                                      if e["name"] == "fc.weight"])
    # You et al.'s table: ||w|| / ||g|| of the first record, every layer, each run a column
    table = (out / "w_over_g_table.md").read_text()
    for col, p in enumerate(two_runs, start=1):
        first = json.loads((p / "metrics.jsonl").read_text().splitlines()[0])
        for e in first["layers"]:
            row = next(line for line in table.splitlines() if line.startswith(f"| `{e['name']}`"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[1] == ("yes" if e["adapted"] else "no")
            assert float(cells[col + 1].replace(",", "")) == pytest.approx(e["w_norm"] / e["g_norm"], rel=1e-3)


def test_compare_without_layer_records_writes_no_layer_panels(tmp_path):
    from analysis import compare, runs

    folder = write_run(tmp_path / "plain", 256, fake_records(1.0))
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if '"layers"' not in line))
    summary = compare.compare([runs.load_run(folder)], tmp_path / "out")
    assert not set(compare.LAYER_FILES) & set(summary["files"])
    assert not any((tmp_path / "out" / name).exists() for name in compare.LAYER_FILES)


def test_default_layers_are_first_middle_and_last_adapted_and_unknown_layers_are_named(tmp_path, two_runs):
    from analysis import compare, runs

    loaded = [runs.load_run(p) for p in two_runs]
    assert runs.default_layers(loaded[0]) == ["stem.0.weight", "blocks.0.conv1.weight", "fc.weight"]
    with pytest.raises(runs.RunError, match="--layers fc.weigth: no such layer"):
        compare.compare(loaded, tmp_path / "out", layers=["fc.weigth"])


def test_wandb_history_rows_give_back_the_ratios():
    """RunLog logs a layers record to wandb as layers/step and trust_ratio/<layer>; the history row comes back as a
    "layers" record with those ratios (the norms stay in metrics.jsonl)."""
    from analysis import runs

    rows = [{"samples": 512, "_step": 512, "step/loss": 2.0, "layers/step": 2, "trust_ratio/fc.weight": 0.003,
             "trust_ratio/stem.0.weight": 0.002}]
    records = list(runs.records_from_history(rows))
    layers = [r for r in records if r["kind"] == "layers"]
    assert len(layers) == 1 and layers[0]["step"] == 2 and layers[0]["samples"] == 512
    assert {e["name"]: e["trust_ratio"] for e in layers[0]["layers"]} == {"fc.weight": 0.003, "stem.0.weight": 0.002}
