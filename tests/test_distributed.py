"""Distributed projection: 2 CPU processes with gloo, the core and both framework hooks.

Every rank must hold bit-identical weights after each projection, computed once by the layer's
owner rank and broadcast; a failure on any rank must leave every layer unchanged on every rank.

- core: ``torch.multiprocessing`` spawns 2 ranks whose weights and BN statistics deliberately
  differ before projecting;
- detectron2: detectron2's own ``launch`` starts 2 CPU processes (gloo); a tiny Faster R-CNN,
  wrapped in DDP by ``create_ddp_model(..., device_ids=None)`` (``DefaultTrainer`` passes
  ``device_ids=[local_rank]``, which DDP rejects for CPU modules), trains with ``SimpleTrainer``
  and :class:`LRPETHook`;
- mmseg: ``torchrun`` runs mmseg's own ``tools/train.py`` with ``--launcher pytorch`` on the toy
  PSPNet config (gloo via ``env_cfg``). On a CPU-only machine two things of mmengine 0.10 need
  help: its launcher calls ``torch.cuda.set_device`` (made a no-op in the rank script), and its
  DDP wrapper passes ``device_ids=[LOCAL_RANK]`` (``model_wrapper_cfg`` sets ``device_ids=None``).

In every run the ranks see different data, so their plain BN statistics differ (both frameworks
wrap with ``broadcast_buffers=False``): ranks projecting on their own would end up different.

Worker functions live at module level so spawned processes can import them; heavy framework
imports happen inside them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lrpet_dense.core import ConvBN, DistributedProjectionError, project_
from lrpet_dense.core.distributed import assign_layers, layer_cost
from lrpet_dense.configs import config_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# (out_channels, in_channels, kernel) of the core test's convs, each followed by a BN; plus a linear layer.
CORE_SHAPES = [(16, 8, 3), (32, 16, 1), (24, 32, 3), (40, 24, 3), (8, 40, 1), (48, 8, 3)]
CORE_RANKS = {f"conv{i}": max(1, min(o, i_ * k * k) // 2) for i, (o, i_, k) in enumerate(CORE_SHAPES)}
CORE_RANKS["fc"] = 5


def _core_model(rank: int) -> nn.ModuleDict:
    """The same architecture on every rank; weights and BN statistics differ per ``rank``."""
    torch.manual_seed(0)
    mods = nn.ModuleDict()
    for i, (o, c, k) in enumerate(CORE_SHAPES):
        mods[f"conv{i}"] = nn.Conv2d(c, o, k, bias=False)
        mods[f"bn{i}"] = nn.BatchNorm2d(o)
    mods["fc"] = nn.Linear(30, 12)
    g = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for m in mods.values():
            m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return mods


def _core_layers(mods: nn.ModuleDict):
    layers = [ConvBN(f"conv{i}", mods[f"conv{i}"], mods[f"bn{i}"]) for i in range(len(CORE_SHAPES))]
    return layers + [ConvBN("fc", mods["fc"], None)]


def _weights(mods) -> dict:
    return {n: m.weight.detach().clone() for n, m in mods.items()}


def _core_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mods = _core_model(rank)
        layers = _core_layers(mods)
        result = {"before": _weights(mods), "bn": {n: (m.running_var.clone(), m.weight.detach().clone())
                                                   for n, m in mods.items() if isinstance(m, nn.BatchNorm2d)}}
        # Control: each rank projecting on its own gives different weights (its own BN statistics).
        alone = _core_model(rank)
        project_(_core_layers(alone), CORE_RANKS, distributed=False)
        result["alone"] = _weights(alone)

        stats = project_(layers, CORE_RANKS)
        result["after"] = _weights(mods)
        result["stats"] = [tuple(s.__dict__.values()) for s in stats]

        # Failure on one rank only: rank 1 corrupts a layer it owns (NaN weight).
        owners = assign_layers([layer_cost(l.conv.weight.shape) for l in layers], world)
        bad = next(l.name for l, o in zip(layers, owners) if o == 1)
        if rank == 1:
            with torch.no_grad():
                mods[bad].weight[0, 0].fill_(float("nan"))
        result["bad"] = bad
        result["before_failure"] = _weights(mods)
        try:
            project_(layers, CORE_RANKS)
            result["error"] = None
        except DistributedProjectionError as e:
            result["error"] = (str(e), e.layers)
        result["after_failure"] = _weights(mods)

        # An error that does not name its layer (e.g. a LAPACK failure) is traced to the layer.
        import lrpet_dense.core.distributed as core_dist
        real = core_dist.compute_layer_projections

        injected = next(l.name for l, o in zip(layers, owners) if o == 0)
        result["injected_layer"] = injected

        def flaky(sub_layers, *args, **kwargs):
            if rank == 0 and any(l.name == injected for l in sub_layers):
                raise RuntimeError("injected eigensolver failure")
            return real(sub_layers, *args, **kwargs)

        with torch.no_grad():
            mods[bad].weight.copy_(result["after"][bad])
        result["before_injected"] = _weights(mods)
        core_dist.compute_layer_projections = flaky
        try:
            project_(layers, CORE_RANKS)
            result["injected"] = None
        except DistributedProjectionError as e:
            result["injected"] = (str(e), e.layers)
        finally:
            core_dist.compute_layer_projections = real
        result["after_injected"] = _weights(mods)
        result["owners"] = owners

        # Ranks that disagree on the plan (a setup bug) get an error, not a hang or mixed weights.
        other = dict(CORE_RANKS, conv0=CORE_RANKS["conv0"] - rank)
        try:
            project_(layers, other)
            result["mismatch"] = None
        except DistributedProjectionError as e:
            result["mismatch"] = str(e)
        result["after_mismatch"] = _weights(mods)
        torch.save(result, os.path.join(out_dir, f"core_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def core_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("core")
    torch.multiprocessing.spawn(_core_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"core_rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.timeout(60)
def test_core_ranks_bit_identical_and_equal_to_owner(core_run):
    r0, r1 = core_run
    assert max_abs_diff(r0["before"], r1["before"]) > 0  # the ranks really started apart
    planned = sorted(CORE_RANKS)
    assert max_abs_diff({n: r0["alone"][n] for n in planned}, {n: r1["alone"][n] for n in planned}) > 0
    assert max_abs_diff({n: r0["after"][n] for n in planned}, {n: r1["after"][n] for n in planned}) == 0
    assert r0["stats"] == r1["stats"]
    assert set(r0["owners"]) == {0, 1}  # both ranks did work
    # Each layer is what its owner computes alone from its own weight and rank 0's BN statistics.
    expected = _core_model(0)
    bn_names = [n for n, m in expected.items() if isinstance(m, nn.BatchNorm2d)]
    layers = _core_layers(expected)
    with torch.no_grad():
        for layer, owner in zip(layers, r0["owners"]):
            layer.conv.weight.copy_(core_run[owner]["before"][layer.name])
        for n in bn_names:
            expected[n].running_var.copy_(r0["bn"][n][0])
            expected[n].weight.copy_(r0["bn"][n][1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so the eigensolver takes the same path
    try:
        stats = project_(layers, CORE_RANKS)
    finally:
        torch.set_num_threads(threads)
    for layer in layers:
        assert torch.equal(layer.conv.weight.detach(), r0["after"][layer.name]), layer.name
    assert [tuple(s.__dict__.values()) for s in stats] == r0["stats"]
    # Layers not in the plan (the BNs) are untouched.
    for n in bn_names:
        assert torch.equal(r0["after"][n], r0["before"][n]) and torch.equal(r1["after"][n], r1["before"][n])


@pytest.mark.timeout(60)
def test_core_failure_on_one_rank_changes_nothing_anywhere(core_run):
    for res in core_run:
        bad = res["bad"]
        assert res["error"] is not None, "a NaN weight on rank 1 must fail the projection on every rank"
        msg, layers = res["error"]
        assert layers == [bad] and repr(bad) in msg and "NaN" in msg and "rank 1" in msg
        assert max_abs_diff(res["after_failure"], res["before_failure"]) == 0
        # An unnamed error (injected on rank 0) is traced to its layer; again nothing changes.
        msg, layers = res["injected"]
        name = res["injected_layer"]
        assert layers == [name] and repr(name) in msg and "injected eigensolver failure" in msg and "rank 0" in msg
        assert max_abs_diff(res["after_injected"], res["before_injected"]) == 0
        assert "do not project the same layers" in res["mismatch"]
        assert max_abs_diff(res["after_mismatch"], res["after_injected"]) == 0


@pytest.mark.timeout(30)
def test_core_falls_back_without_process_group():
    assert not dist.is_initialized()
    a, b = _core_model(0), _core_model(0)
    s1 = project_(_core_layers(a), CORE_RANKS)
    s2 = project_(_core_layers(b), CORE_RANKS)
    assert s1 == s2 and max_abs_diff(_weights(a), _weights(b)) == 0


def test_assign_layers_balances_cost():
    costs = [layer_cost((o, c, k, k)) for o, c, k in CORE_SHAPES] + [layer_cost((12, 30))]
    owners = assign_layers(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(loads) - min(loads) <= max(costs)  # LPT bound
    assert assign_layers(costs, 1) == [0] * len(costs)
    assert sorted(set(assign_layers(costs, 3))) == [0, 1, 2]
    with pytest.raises(ValueError, match="world_size"):
        assign_layers(costs, 0)


# ---------------------------------------------------------------------------- detectron2
D2_MAX_ITER, D2_INTERVAL = 4, 2  # projections after steps 2 and 4; step 3 trains on projected weights
D2_OPTS = [
    "MODEL.DEVICE", "cpu", "INPUT.RANDOM_FLIP", "none",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "96",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "16", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(D2_MAX_ITER), "LRPET.INTERVAL", str(D2_INTERVAL),
    "LRPET.PRECISE_BN_ITERS", "2",  # no PreciseBN hook here: the LRPET hook recomputes BN (DDP-averaged)
]


def _d2_worker(devkit: str, out_dir: str) -> None:
    """One rank of a 2-process detectron2 run (started by detectron2's ``launch``)."""
    from detectron2.config import get_cfg
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import HookBase, SimpleTrainer, create_ddp_model
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils import comm

    from lrpet_dense.detectron2 import LRPETHook, add_lrpet_config
    from lrpet_dense.detectron2.config import register_toy_voc

    torch.set_num_threads(1)
    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(str(Path(config_path("toy/faster_rcnn_lrpet_toy.yaml"))))
    cfg.merge_from_list(D2_OPTS)
    register_toy_voc(devkit)
    torch.manual_seed(comm.get_rank())  # different init per rank: DDP must broadcast rank 0's
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    loader = build_detection_train_loader(cfg)  # each rank reads its own images: BN statistics differ
    # As DefaultTrainer does, but device_ids=None: create_ddp_model's default ([local rank]) is for GPUs.
    ddp = create_ddp_model(model, device_ids=None, broadcast_buffers=False)
    hook = LRPETHook.from_config(cfg, ddp)

    class RankCheck(HookBase):
        """After every step: max abs difference of all parameters (and of BN statistics) to rank 0."""

        def __init__(self):
            self.records = []

        def after_step(self):
            params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            bn = torch.cat([m.running_var.reshape(-1) for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
            diffs = []
            for t in (params, bn):
                ref = t.clone()
                dist.broadcast(ref, src=0)
                diffs.append((t - ref).abs().max().item())
            steps = self.trainer.iter + 1
            self.records.append({"step": steps, "projected": hook.projector.last_iter == steps,
                                 "param_diff": diffs[0], "bn_var_diff": diffs[1]})

        def after_train(self):
            hist = self.trainer.storage.history
            lrpet = {k: hist(k).values() for k in ("lrpet/energy_kept_mean", "lrpet/rel_change_max")}
            everyone = comm.all_gather({"records": self.records, "lrpet": lrpet})
            if comm.is_main_process():
                Path(out_dir, "d2.json").write_text(json.dumps(everyone))

    trainer = SimpleTrainer(ddp, loader, optimizer)
    trainer.register_hooks([hook, RankCheck()])
    trainer.train(0, D2_MAX_ITER)
    comm.synchronize()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_detectron2_hook_with_launch_ddp_ranks_identical(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.engine import launch

    from lrpet_dense.data.toy_voc import make_toy_voc

    devkit = make_toy_voc(str(tmp_path / "voc"), num_train=4, num_test=2, size=96)
    launch(_d2_worker, 2, dist_url="auto", args=(devkit, str(tmp_path)))
    ranks = json.loads((tmp_path / "d2.json").read_text())
    assert len(ranks) == 2
    for res in ranks:
        steps = [(r["step"], r["projected"]) for r in res["records"]]
        assert steps == [(1, False), (2, True), (3, False), (4, True)]
        assert all(r["param_diff"] == 0 for r in res["records"]), res["records"]
    # Plain BN statistics do differ across ranks (broadcast_buffers=False), so ranks projecting on
    # their own would disagree; the shared projection does not.
    assert max(r["bn_var_diff"] for r in ranks[1]["records"]) > 0
    assert ranks[0]["lrpet"] == ranks[1]["lrpet"] and len(ranks[0]["lrpet"]["lrpet/energy_kept_mean"]) == 2


# ---------------------------------------------------------------------------- mmseg
# Run by torchrun in each rank: mmseg's own tools/train.py, with a check hook registered first.
_MMSEG_RANK = '''
import json, os, runpy, sys
from pathlib import Path

import torch
import torch.distributed as dist
from mmengine.dist import all_gather_object, get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

# mmengine's pytorch launcher calls torch.cuda.set_device(LOCAL_RANK) before init_process_group,
# which fails on a machine without CUDA; everything else (gloo from env_cfg) is mmengine's own.
if not torch.cuda.is_available():
    torch.cuda.set_device = lambda device: None


@HOOKS.register_module()
class RankCheckHook(Hook):
    """After every iteration: max abs difference to rank 0 of all parameters (and BN statistics)."""

    priority = "LOW"  # after LRPETHook (NORMAL)

    def __init__(self, out):
        self.out, self.records = out, []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        lrpet = next(h for h in runner.hooks if type(h).__name__ == "LRPETHook")
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        bn = torch.cat([m.running_var.reshape(-1) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
        diffs = []
        for t in (params, bn):
            ref = t.clone()
            dist.broadcast(ref, src=0)
            diffs.append((t - ref).abs().max().item())
        steps = runner.iter + 1
        info = runner.message_hub.get_info("lrpet/last_projection") or {}
        self.records.append({"step": steps, "projected": lrpet.projector.last_iter == steps,
                             "param_diff": diffs[0], "bn_var_diff": diffs[1],
                             "energy_kept_mean": info.get("lrpet/energy_kept_mean"),
                             "rel_change_max": info.get("lrpet/rel_change_max")})

    def after_train(self, runner):
        everyone = all_gather_object(self.records)
        if get_rank() == 0:
            Path(self.out).write_text(json.dumps(everyone))


sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

_MMSEG_CFG = '''
_base_ = {base!r}
# CPU DDP: no device_ids (mmengine's default, [LOCAL_RANK], is for GPUs); plain BN as in the base.
model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
train_cfg = dict(max_iters=4, val_interval=100)  # projections after 2 and 4
val_cfg = None  # no validation
val_dataloader = None
val_evaluator = None
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=4, by_epoch=False)]
default_hooks = dict(checkpoint=dict(interval=100, save_last=False))
custom_hooks = [
    dict(type='LRPETHook', ratio=0.5, include=['backbone.*'], interval=2, precise_bn_iters=2),
    dict(type='RankCheckHook', out={out!r}),
]
'''


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_mmseg_runner_pytorch_launcher_ranks_identical(tmp_path):
    mmseg = pytest.importorskip("mmseg")
    train_py = Path(mmseg.__file__).parent / ".mim" / "tools" / "train.py"
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "lrpet_dense.data.toy_voc", str(data), "--train", "8", "--test", "4",
                    "--size", "96"], check=True, cwd=REPO, capture_output=True)
    rank_py = tmp_path / "rank.py"
    rank_py.write_text(_MMSEG_RANK)
    cfg = tmp_path / "cfg.py"
    out = tmp_path / "ranks.json"
    cfg.write_text(_MMSEG_CFG.format(base=str(Path(config_path("toy/pspnet_r50-d8_lrpet_toy.py"))), out=str(out)))
    env = dict(os.environ, LRPET_TOY_VOC_ROOT=str(data), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(rank_py), str(train_py), str(cfg), "--launcher", "pytorch",
                           "--work-dir", str(tmp_path / "work")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    for records in ranks:
        assert [(r["step"], r["projected"]) for r in records] == [(1, False), (2, True), (3, False), (4, True)]
        assert all(r["param_diff"] == 0 for r in records), records
    assert max(r["bn_var_diff"] for r in ranks[1]) > 0  # plain BN: the ranks' statistics differ
    for a, b in zip(*ranks):  # the logged projection stats agree too
        assert (a["energy_kept_mean"], a["rel_change_max"]) == (b["energy_kept_mean"], b["rel_change_max"])
    assert ranks[0][-1]["energy_kept_mean"] is not None
