"""Data-parallel training: real gloo process groups of 2 CPU processes against 1 process.

The multi-process checks share one spawn (``ranks``: both ranks train LightGCN, DiffKG and
every other trainable model (``EVERY_MODEL``) for one or two epochs, rebuild the KG and
evaluate, then form a second group in which rank 1 dies; the parent computes the
single-process references) and one ``torchrun`` launch of the CLI. The graphs are tiny (200
patients, latdim 8) so that the file stays under a minute on two shared cores (25-40 s
measured, most of it the imports of four fresh processes).

Tolerances. Two ranks compute the same batches as one process, but a batch's gradient is summed
in another order (each rank's part, then DDP's average of the parts), so the parameters differ
by float32 rounding, not by bits: a relative ~1e-7 in a gradient moves Adam's step
``lr·m/(sqrt(v)+eps)`` by about as much, ~1e-10 at lr 1e-3 (more only for a gradient near Adam's
eps 1e-8: see KGIN's row of ``EVERY_MODEL``). Measured: 3e-8 after an epoch (LightGCN), 1.2e-7
(DiffKG, two epochs), the ulp of the weights. ``atol=2e-6`` leaves a wide margin over that and
is far below one step's update (~lr = 1e-3), so a wrong batch, remainder weight or draw, each of
which moves weights by ~lr, fails it. Tried: each rank's own norm in EmbLoss, 2e-3 to 6e-3 on
KGAT, KGIN and KGCN; the DDI term over a rank's own patients, 7.5e-3 (LightGCN), and with
in-batch InfoNCE over a rank's own nodes too, 1.1e-2 (DiffKG); MultiVAE's draws per part (the
earlier code), 2e-3. Evaluation sums float64 per-user values in another order: ``rel=1e-12``.
The rebuilt KG is computed from the same denoiser weights, batch by batch as one process does:
equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffkg_fast.data.build import build_dataset
from diffkg_fast.model import DiffKG
from diffkg_fast.train import distributed as launch
from diffkg_fast.train import make_config, train
from diffkg_fast.train.config import config_defaults
from diffkg_fast.train.evaluation import evaluate_split
from diffkg_fast.train.sampling import PairSampler
from diffkg_fast.utils.distributed import Dist, batch_part, block

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")

ATOL = 2e-6


def _ds(split: str = "interaction"):
    return build_dataset("synthetic", n_patients=200, n_diag=120, n_proc=60, n_med=30, seed=0,
                         split=split)


def _cfg(model: str, **kw):
    # batch 301: 2,574 interactions = 8 × 301 + 166 and 246 KG rows < 301, so the last batch
    # of the recommender and the denoiser's only batch split unevenly over two ranks.
    base = {"model": model, "epoch": 1, "latdim": 8, "dims": [16], "seed": 5, "batch": 301,
            "test_batch": 37, "embedding_size": 8, "kg_embedding_size": 8, "layers": [8],
            "latent_dimension": 16, "mlp_hidden_size": [16], **kw}
    keys = config_defaults(model)
    return make_config(**{k: v for k, v in base.items() if k in keys})


# key -> (model, options): every trainable model beside LightGCN and DiffKG's defaults, with the
# options whose loss is not a plain per-row mean. reg_weight 0.1: RecBole's EmbLoss is a norm of
# the whole batch's embeddings; at the default 1e-5 a per-part norm would hide under rounding.
EVERY_MODEL = {
    # 200 patients in batches of 61: three full batches and one of 17, split 9 / 8.
    "multivae": ("multivae", {"batch": 61}),
    "cdae": ("cdae", {"batch": 61}),
    # Epoch 2: the importance history (filled in epoch 1) draws the steps.
    "diffrec": ("diffrec", {"batch": 61, "epoch": 2}),
    "kgat": ("kgat", {"reg_weight": 0.1}),
    # KGIN without its dropouts: with them, a few entity rows whose messages were all dropped
    # get gradients of rounding size, and Adam's first steps on such a row (g / (|g| + eps))
    # turn a reordered sum into ~3e-4: measured in ONE process by merely summing each batch's
    # gradient in two halves. Without dropout one process and two ranks agree to 2e-8. The
    # dropouts' draws are whole-graph, the same on every rank, as KGAT's (its row keeps them).
    "kgin": ("kgin", {"reg_weight": 0.1, "node_dropout_rate": 1.0, "mess_dropout_rate": 0.0}),
    "kgcn": ("kgcn", {"reg_weight": 0.1}),
    "lightgcn-ddi": ("lightgcn", {"ddi_loss": True, "ddi_scale": 0.5}),
    "diffkg-ddi-in-batch": ("diffkg", {"ddi_loss": True, "cl_mode": "in_batch"}),
}


def _silent(_: str) -> None:
    pass


# --------------------------------------------------------------------- without processes
def test_blocks_cover_in_order_and_factors_average_to_the_batch_mean() -> None:
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            ranks = [Dist(r, world) for r in range(world)]
            assert [i for d in ranks for i in block(n, d)] == list(range(n))
            if n == 0:
                continue
            parts = [batch_part(n, d) for d in ranks]
            # DDP averages factor_r × mean_r over ranks: the weights of the rows must sum to 1.
            sizes = [len(block(n, d)) for d in ranks]
            assert sum(f / world for (_, f) in parts) == pytest.approx(1.0)
            for (sl, f), size in zip(parts, sizes, strict=True):
                assert f == pytest.approx(world * size / n)
                assert (sl.stop - sl.start) == max(size, 1)  # an empty part computes 1 row × 0


def test_rank_parts_are_the_single_process_batches() -> None:
    ds = _ds()
    ref = PairSampler(ds.train, 301, 5)
    parts = [PairSampler(ds.train, 301, 5) for _ in range(3)]
    neg = ref.negatives()
    assert all(torch.equal(p.negatives(), neg) for p in parts)  # the same draws everywhere
    streams = [p.part_batches(neg, Dist(r, 3)) for r, p in enumerate(parts)]
    for whole, *mine in zip(ref.batches(neg), *streams, strict=True):
        kept = [b for b, f in mine if f > 0]
        for field in range(3):
            assert torch.equal(torch.cat([b[field] for b in kept]), whole[field])


def test_without_torchrun_nothing_is_initialised(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d, device = launch.init("cpu")
    assert d == Dist() and device == "cpu" and not dist.is_initialized()
    model = torch.nn.Linear(2, 2)
    assert launch.wrap(model, torch.optim.Adam(model.parameters()), d) is model


def test_a_lost_peer_is_one_clear_error() -> None:
    with pytest.raises(launch.DistributedError, match="rank 1 of 2 lost the other ranks"), \
            launch.report_errors(Dist(1, 2)):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    with pytest.raises(RuntimeError, match="unrelated"), launch.report_errors(Dist(1, 2)):
        raise RuntimeError("unrelated")


# --------------------------------------------------------------------- two gloo processes
def _init(rank: int, world: int, store: str) -> Dist:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    return Dist(rank, world)


def _worker(rank: int, world: int, out: str) -> None:
    """Both scenarios in one pair of processes (a spawn costs ~10 s of imports here)."""
    _train_worker(rank, world, out)
    _dying_worker(rank, world, out)


def _train_worker(rank: int, world: int, out: str) -> None:
    d = _init(rank, world, str(Path(out) / "store-train"))
    try:
        res: dict = {}
        lgcn = train(_ds(), _cfg("lightgcn"), log=_silent)  # dist: the initialised group
        res["lightgcn"] = {"state": lgcn.model.state_dict(), "history": lgcn.history,
                           "test": lgcn.test}
        ds = _ds("visit")
        dk = train(ds, _cfg("diffkg", epoch=2), log=_silent)  # 2: the rebuild after training
        m = dk.model
        assert isinstance(m, DiffKG) and m.diffusion is not None
        res["diffkg"] = {"state": m.state_dict(), "history": dk.history, "test": dk.test,
                         "sets": dk.sets.to_dict()}
        # The rebuild from this (identical on every rank) denoiser, with a known stream.
        m.diffusion.generators["rebuild"].manual_seed(11)
        res["rebuild"] = m.diffusion.rebuild().to_triplets()
        res["eval"] = evaluate_split(m, ds, "test", batch_size=37, sets=dk.sets, dist=d)
        # DiffKG with its denoiser sharded (FSDP), writing a run folder that one process resumes.
        fs = train(ds, _cfg("diffkg", epoch=2, denoiser_sharding="fsdp"), log=_silent,
                   out_dir=Path(out) / "fsdp-run")
        state = fs.model.state_dict()  # every rank: the full tensors are gathered collectively
        den = fs.model.diffusion.denoiser  # type: ignore[union-attr]
        res["fsdp"] = {"state": state, "history": fs.history,
                       "shard_rows": {k: tuple(p.to_local().shape) for k, p in
                                      den.named_parameters()},
                       "adam_rows": {k: tuple(v["exp_avg"].to_local().shape) for k, v in
                                     fs.model.diffusion.opt.state_dict()["state"].items()}}
        # Every other trainable model, each with what makes its loss more than a per-row mean.
        for key, (name, kw) in EVERY_MODEL.items():
            res[key] = train(_ds(), _cfg(name, **kw), log=_silent).model.state_dict()
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results of one 2-process run (:func:`_worker`) and their exit codes."""
    tmp = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(_worker, args=(2, str(tmp)), nprocs=2, start_method="spawn",
                             join=False)
    for p in ctx.processes:  # not ctx.join(): it would kill rank 0 when rank 1 dies
        p.join(240)
    codes = [p.exitcode for p in ctx.processes]
    assert (tmp / "rank0.pt").exists() and (tmp / "rank1.pt").exists(), codes
    res = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in range(2):
        res[r]["exit"] = codes[r]
        res[r]["fsdp_run"] = tmp / "fsdp-run"
        path = tmp / f"dying{r}.json"
        res[r]["dying"] = json.loads(path.read_text()) if path.exists() else None
    return res


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max())
                for k in a if isinstance(a[k], torch.Tensor) and a[k].is_floating_point()
                and a[k].numel()), default=0.0)


def _assert_same_ranks(r0: dict, r1: dict) -> None:
    for k, v in r0.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, r1[k]), k  # DDP's all-reduce gives every rank the same bits


def test_lightgcn_two_ranks_follow_one_process(ranks) -> None:
    one = train(_ds(), _cfg("lightgcn"), log=_silent)
    two = ranks[0]["lightgcn"]
    _assert_same_ranks(two["state"], ranks[1]["lightgcn"]["state"])
    assert _max_diff(two["state"], one.model.state_dict()) < ATOL
    assert two["history"][0]["loss"] == pytest.approx(one.history[0]["loss"], rel=1e-5)
    assert two["history"][0]["info"]["world_size"] == 2


def test_diffkg_two_ranks_follow_one_process(ranks) -> None:
    one = train(_ds("visit"), _cfg("diffkg", epoch=2), log=_silent)
    two = ranks[0]["diffkg"]
    _assert_same_ranks(two["state"], ranks[1]["diffkg"]["state"])
    mine = one.model.state_dict()
    # The denoiser (its own DDP) and the encoder both follow the single process …
    assert _max_diff(two["state"], mine) < ATOL
    # … and the last epoch trained on the same denoised KG, edge for edge.
    kg = two["state"]["_extra_state"]["kg_denoised"]
    assert torch.equal(kg, mine["_extra_state"]["kg_denoised"])
    assert torch.equal(kg, ranks[1]["diffkg"]["state"]["_extra_state"]["kg_denoised"])
    for h2, h1 in zip(two["history"], one.history, strict=True):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)  # diffusion parts included
        assert h2["info"]["kg_edges"] == h1["info"]["kg_edges"]
    assert two["sets"] == ranks[1]["diffkg"]["sets"]


@pytest.mark.parametrize("key", list(EVERY_MODEL))
def test_every_model_two_ranks_follow_one_process(ranks, key) -> None:
    """Per-row draws made for the whole batch and cut (MultiVAE, CDAE, DiffRec and its
    importance history), CDAE's summed loss, the norm of the batch's embeddings (KGAT, KGIN,
    KGCN at a reg_weight where it matters), the DDI loss over the batch's distinct patients,
    and in-batch InfoNCE: each is the single process's, to float reduction order."""
    name, kw = EVERY_MODEL[key]
    _assert_same_ranks(ranks[0][key], ranks[1][key])
    one = train(_ds(), _cfg(name, **kw), log=_silent).model.state_dict()
    assert _max_diff(ranks[0][key], one) < ATOL


def test_fsdp_denoiser_is_sharded_and_follows_one_process(ranks, tmp_path) -> None:
    """``denoiser_sharding="fsdp"``: each rank holds half of every denoiser weight's rows and of
    Adam's moments; the run is DDP's (the single process's, to rounding), its checkpoint holds
    full tensors, and one process resumes it where two left off."""
    import shutil

    two = ranks[0]["fsdp"]
    _assert_same_ranks(two["state"], ranks[1]["fsdp"]["state"])
    model = DiffKG.from_dataset(_ds("visit"), **_cfg("diffkg").model_options())
    assert model.diffusion is not None
    full = dict(model.diffusion.denoiser.named_parameters())
    for k, shape in two["shard_rows"].items():
        rows = full[k].shape[0]
        assert shape[0] == -(-rows // 2) and shape[1:] == full[k].shape[1:], k  # rank 0's half
    assert len(two["adam_rows"]) == len(full)
    for (k, p), shape in zip(full.items(), two["adam_rows"].values(), strict=True):
        assert shape[0] == -(-p.shape[0] // 2), k
    one = train(_ds("visit"), _cfg("diffkg", epoch=2), log=_silent)
    assert _max_diff(two["state"], one.model.state_dict()) < ATOL
    kg = two["state"]["_extra_state"]["kg_denoised"]
    assert torch.equal(kg, one.model.state_dict()["_extra_state"]["kg_denoised"])
    for h2, h1 in zip(two["history"], one.history, strict=True):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
    # The run folder of the two ranks, resumed for a third epoch by one process.
    run = tmp_path / "run"
    shutil.copytree(ranks[0]["fsdp_run"], run)
    resumed = train(_ds("visit"), _cfg("diffkg", epoch=3, denoiser_sharding="fsdp"),
                    log=_silent, out_dir=run, resume=True)
    straight = train(_ds("visit"), _cfg("diffkg", epoch=3), log=_silent)
    assert _max_diff(resumed.model.state_dict(), straight.model.state_dict()) < ATOL


def test_sharded_rebuild_is_the_single_process_rebuild(ranks) -> None:
    assert np.array_equal(ranks[0]["rebuild"], ranks[1]["rebuild"])
    model = DiffKG.from_dataset(_ds("visit"), **_cfg("diffkg").model_options())
    model.load_state_dict(ranks[0]["diffkg"]["state"])
    assert model.diffusion is not None
    model.diffusion.generators["rebuild"].manual_seed(11)
    assert np.array_equal(model.diffusion.rebuild().to_triplets(), ranks[0]["rebuild"])


def test_sharded_evaluation_is_the_single_process_evaluation(ranks) -> None:
    from diffkg_fast.eval.set_choice import SetChoice

    ds = _ds("visit")
    model = DiffKG.from_dataset(ds, **_cfg("diffkg").model_options())
    model.load_state_dict(ranks[0]["diffkg"]["state"])
    sets = SetChoice.from_dict(ranks[0]["diffkg"]["sets"])
    one = evaluate_split(model, ds, "test", batch_size=37, sets=sets)
    for r in ranks:
        two = r["eval"]
        assert two.keys() == one.keys() and two["n_users"] == one["n_users"]
        for k in one:
            # Ranking sums in float64 in another order; the visit metrics from the same scores.
            assert two[k] == pytest.approx(one[k], rel=1e-12, abs=1e-15), k


# --------------------------------------------------------------------- torchrun and the CLI
def _run(cmd: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=tmp, env=e, capture_output=True, text=True, timeout=300)


def test_torchrun_cli_trains_and_resumes_at_another_world_size(tmp_path) -> None:
    from diffkg_fast.cli import main

    data = tmp_path / "tiny.npz"
    _ds().save(data)
    flags = ["--data", str(data), "--model", "lightgcn", "--latdim", "8", "--batch", "301",
             "--seed", "5", "--no-progress", "--no-plot"]
    two = tmp_path / "two"
    p = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "diffkg_fast", "train", *flags, "--epoch", "1",
              "--out", str(two)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    # Rank 0 alone prints: one header, one epoch line, one table.
    lines = p.stdout.splitlines()
    assert sum(x.startswith("data synthetic:") for x in lines) == 1
    assert sum(x.startswith("epoch 0 ") for x in lines) == 1
    assert "data-parallel over 2 processes" in p.stdout
    assert json.loads((two / "data.json").read_text())["world_size"] == 2
    assert "world_size" in (two / "log.csv").read_text().splitlines()[0]
    # Resumed by one process for a second epoch …
    assert main(["train", "--out", str(two), "--resume", "--epoch", "2", "--no-progress",
                 "--no-plot"]) == 0
    assert json.loads((two / "data.json").read_text())["world_size"] == 1
    # … it is the straight single-process run of two epochs, up to float reduction order.
    one = tmp_path / "one"
    assert main(["train", *flags, "--epoch", "2", "--out", str(one)]) == 0
    a = torch.load(two / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(one / "checkpoint.pt", weights_only=False)["model"]
    assert _max_diff(a, b) < 2 * ATOL


# --------------------------------------------------------------------- a rank that dies
def _dying_worker(rank: int, world: int, out: str) -> None:
    """Rank 1 ends abruptly after its first batch; rank 0 records what it saw and when."""
    d = _init(rank, world, str(Path(out) / "store-dying"))
    if rank == 1:
        real = PairSampler.part_batches

        def die_after_one(self, *a, **kw):  # the second batch never comes: the process ends
            it = real(self, *a, **kw)
            yield next(it)
            os._exit(3)

        PairSampler.part_batches = die_after_one  # type: ignore[method-assign]
    t0 = time.perf_counter()
    try:
        with launch.report_errors(d):
            train(_ds(), _cfg("lightgcn"), log=_silent, dist=d)
        msg = "no error"
    except launch.DistributedError as exc:
        msg = str(exc)
    finally:
        # As `diffkg-fast train` does: without it the process group's destructor runs at
        # interpreter exit, where gloo with a dead peer aborted rank 0 now and then (SIGABRT).
        launch.shutdown(d)
    Path(out, f"dying{rank}.json").write_text(json.dumps(
        {"msg": msg, "s": time.perf_counter() - t0}))


def test_a_rank_that_dies_ends_the_others_with_a_clear_error(ranks) -> None:
    assert [r["exit"] for r in ranks] == [0, 3]
    got = ranks[0]["dying"]
    assert "rank 0 of 2 lost the other ranks" in got["msg"] and "--resume" in got["msg"]
    assert got["s"] < 45  # the peer's closed socket ended it, not the 60 s timeout
