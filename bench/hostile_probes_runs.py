"""The probes of ``bench/hostile_pass.py`` that run models: checkpoints and run folders,
configs, concurrent runs, disk faults, ``compare``, ``recommend``, ``--data`` specs and model
options (the data-file kinds and the :class:`Probe` helpers are in ``hostile_probes``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import hostile_inputs as H
from hostile_probes import (
    LG,
    TRAIN,
    Maker,
    both,
    copy,
    in_folder,
    mounted,
    probe,
    python_check,
    write,
)

# ------------------------------------------------------------------ checkpoints and run folders
RUN = "run/checkpoint.pt"
FP = ("import json, torch; ck = torch.load('run/checkpoint.pt', weights_only=True); "
      "fp = json.load(open('run/data.json'))['fingerprint']; "
      "print('' if ck['data_fingerprint'] == fp else 'data.json and checkpoint differ')")


def run_copy(then: Callable[[Path], None] | None = None, src: str = "runA") -> Maker:
    return copy(src, "run", then)


def crafted(change: Callable[[dict], None]) -> Maker:
    return run_copy(lambda p: H.resign_checkpoint(p / "checkpoint.pt", change))


def from_b(p: Path) -> None:
    shutil.copy(p.parent / "runB_ck.pt", p / "checkpoint.pt")


RESUME = "train --out run --resume --set epoch=2 --no-plot --no-progress"
probe("checkpoint", "one flipped bit in a weight", "evaluate run",
      run_copy(lambda p: H.flip_byte(p / "checkpoint.pt", 0.8, 0x01)), names=RUN)
probe("checkpoint", "copied from another run (other split): evaluate", "evaluate run",
      both(copy("runB/checkpoint.pt", "runB_ck.pt"), run_copy(from_b)), names="checkpoint.pt")
probe("checkpoint", "copied from another run: recommend", "recommend run --patient 3",
      both(copy("runB/checkpoint.pt", "runB_ck.pt"), run_copy(from_b)), names="checkpoint.pt")
probe("checkpoint", "copied from another run: --resume", RESUME,
      both(copy("runB/checkpoint.pt", "runB_ck.pt"), run_copy(from_b)), names="checkpoint.pt")
probe("checkpoint", "truncated", "evaluate run",
      run_copy(lambda p: H.truncate(p / "checkpoint.pt")), names=RUN)
probe("checkpoint", "a torch.save pickle calling os.system", "evaluate run",
      run_copy(lambda p: H.torch_pickle_system(p / "checkpoint.pt")), names=RUN)
probe("checkpoint", "checkpoint.pt is a directory", "evaluate run", run_copy(lambda p: (
    (p / "checkpoint.pt").unlink(), (p / "checkpoint.pt").mkdir())), names="checkpoint.pt")
probe("checkpoint", "evaluate RUN/checkpoint.pt (legitimate)", "evaluate run/checkpoint.pt",
      run_copy(), expect="ok")
probe("checkpoint", "evaluate a folder without a checkpoint", "evaluate run",
      lambda d, fx: (d / "run").mkdir(), names="checkpoint.pt")
probe("checkpoint", "data.json truncated", "evaluate run",
      run_copy(lambda p: H.truncate(p / "data.json")), names="data.json")
probe("checkpoint", "data.json: data is a number", "evaluate run",
      run_copy(in_folder("data.json", '{"data": 5, "fingerprint": "x", "preset": null}')),
      names="data.json")
probe("checkpoint", "data.json: data is a list", "recommend run --patient 1",
      run_copy(in_folder("data.json", '{"data": ["a"], "fingerprint": "x"}')),
      names="data.json")
probe("checkpoint", "data.json: a link to /dev/zero", "evaluate run", run_copy(lambda p: (
    (p / "data.json").unlink(), (p / "data.json").symlink_to("/dev/zero"))),
    names="data.json")
probe("checkpoint", "data.json: data names a missing file", "evaluate run",
      run_copy(in_folder("data.json", '{"data": "/nonexistent/x.npz"}')), names="x.npz")
probe("checkpoint", "crafted (valid digest): selection is 5", "evaluate run",
      crafted(lambda ck: ck.update(selection=5)), names=RUN)
probe("checkpoint", "crafted: selection is 5, --resume", RESUME,
      crafted(lambda ck: ck.update(selection=5)), names=RUN)
probe("checkpoint", "crafted: config epoch is '5'", "evaluate run",
      crafted(lambda ck: ck["config"].update(epoch="5")), names=RUN)
probe("checkpoint", "crafted: config is 5", "evaluate run",
      crafted(lambda ck: ck.update(config=5)), names=RUN)
probe("checkpoint", "crafted: config latdim 16, weights 8", "evaluate run",
      crafted(lambda ck: ck["config"].update(latdim=16)), names=RUN)
probe("checkpoint", "crafted: config latdim 16, weights 8, --resume", RESUME,
      crafted(lambda ck: ck["config"].update(latdim=16)), names=RUN)
probe("checkpoint", "crafted: epoch is 'x', --resume", RESUME,
      crafted(lambda ck: ck.update(epoch="x")), names=RUN)
probe("checkpoint", "crafted: history is a string, --resume", RESUME,
      crafted(lambda ck: ck.update(history="x")), names=RUN)
probe("checkpoint", "crafted: unknown model", "evaluate run",
      crafted(lambda ck: ck["config"].update(model="nope")), names=RUN)
probe("checkpoint", "--resume with another latdim", RESUME + " --set latdim=16", run_copy(),
      names="latdim")
probe("checkpoint", "--resume with epoch=0", "train --out run --resume --set epoch=0",
      run_copy(), names="epoch")
probe("checkpoint", "--resume with another dataset", RESUME + " --data {fx}/small_b.npz",
      run_copy(), names="checkpoint.pt")
probe("checkpoint", "--resume from a folder without a checkpoint", RESUME,
      lambda d, fx: (d / "run").mkdir(), names="checkpoint.pt")
probe("checkpoint", "--resume from a missing folder", RESUME, names="run")
probe("checkpoint", "--resume after a killed write (stale .tmp)", RESUME,
      run_copy(in_folder(".checkpoint.pt.abc123.tmp", b"half")), expect="ok",
      check=lambda d: [f"left {p.name}" for p in (d / "run").glob(".*.tmp")])

# ------------------------------------------------------------------ configs
for key, value, what in [
        ("lr", "nan", "lr"), ("lr", "inf", "lr"), ("lr", "-1", "lr"), ("lr", "0", "lr"),
        ("epoch", "0", "epoch"), ("epoch", "-3", "epoch"), ("batch", "0", "batch"),
        ("test_batch", "0", "test_batch"), ("eval_every", "0", "eval_every"),
        ("seed", "-1", "seed"), ("seed", "4611686018427387904", "seed"), ("topk", "5", "topk"),
        ("patience", "-1", "patience"), ("reg", "nan", "reg"), ("latdim", "0", "latdim"),
        ("gnn_layer", "-1", "gnn_layer"),
        # wrong types, every TrainConfig key
        ("model", "5", "model"), ("epoch", "1.5", "epoch"), ("epoch", "true", "epoch"),
        ("epoch", "none", "epoch"), ("batch", "abc", "batch"), ("batch", "none", "batch"),
        ("test_batch", "[1]", "test_batch"), ("test_batch", "none", "test_batch"),
        ("lr", "abc", "lr"), ("lr", "true", "lr"), ("lr", "none", "lr"),
        ("lr", "1" + "0" * 400, "lr"), ("seed", "1.5", "seed"), ("seed", "none", "seed"),
        ("topk", "20.0", "topk"), ("topk", "none", "topk"), ("valid_metric", "5", "valid_metric"),
        ("valid_metric", "none", "valid_metric"), ("valid_metric", "mrr", "valid_metric"),
        ("patience", "1.5", "patience"), ("patience", "abc", "patience"),
        ("eval_every", "none", "eval_every"), ("eval_every", "2.5", "eval_every"),
        ("device", "5", "device"), ("device", "none", "device"), ("device", "tpu", "device"),
        ("latdim", "none", "latdim"), ("reg", "none", "reg")]:
    probe("config", f"--set {key}={value[:20]}", f"{TRAIN} --set {key}={value}", names=what)
for key, value in [("triplet_num", "none"), ("res_lambda", "none"), ("patient_codes", "none"),
                   ("use_diffusion", "none"), ("triplet_num", "-5"), ("dims", "[]"),
                   ("dims", "[0]"), ("keepRate", "2"), ("temp", "0"), ("steps", "none")]:
    probe("config", f"diffkg --set {key}={value}",
          f"train --data {{fx}}/small.npz --set epoch=1 --set {key}={value} --no-plot", names=key)
probe("config", "unknown key --set foo=1", f"{TRAIN} --set foo=1", names="foo")
probe("config", "YAML: unknown key", f"{TRAIN} --config c.yaml", write("c.yaml", "latdmi: 8\n"),
      names="latdmi")
probe("config", "YAML alias bomb under reg (10^9 leaves)", f"{TRAIN} --config c.yaml",
      write("c.yaml", H.yaml_alias_bomb("reg")), names="reg")
probe("config", "YAML alias bomb under dims (DiffKG)",
      "train --data {fx}/small.npz --set epoch=1 --no-plot --config c.yaml",
      write("c.yaml", H.yaml_alias_bomb("dims")), names="dims")
probe("config", "YAML alias bomb under an unknown key", f"{TRAIN} --config c.yaml",
      write("c.yaml", H.yaml_alias_bomb("bomb")), names="bomb")
probe("config", "YAML nested 100,000 deep", f"{TRAIN} --config c.yaml",
      write("c.yaml", "epoch: " + "[" * 100_000 + "]" * 100_000 + "\n"), names="c.yaml")
probe("config", "YAML: a 5,000-digit integer", f"{TRAIN} --config c.yaml",
      write("c.yaml", "epoch: " + "1" * 5000 + "\n"), names="c.yaml")
probe("config", "JSON nested 100,000 deep", f"{TRAIN} --config c.json",
      write("c.json", '{"epoch": ' + "[" * 100_000 + "]" * 100_000 + "}"), names="c.json")
probe("config", "JSON: a 5,000-digit integer", f"{TRAIN} --config c.json",
      write("c.json", '{"epoch": ' + "1" * 5000 + "}"), names="c.json")
probe("config", "YAML: a 1 MB key", f"{TRAIN} --config c.yaml",
      write("c.yaml", "k" * 1_000_000 + ": 1\n"), names="c.yaml")
probe("config", "YAML: dims of 1,000,000 entries", f"{TRAIN} --config c.yaml",
      write("c.yaml", "dims: [" + ",".join(["1"] * 1_000_000) + "]\n"), names="c.yaml")
probe("config", "YAML: !!python/object/apply:os.system", f"{TRAIN} --config c.yaml",
      write("c.yaml", f"reg: !!python/object/apply:os.system ['{H.PWN}']\n"), names="c.yaml")
probe("config", "YAML: a list, not a mapping", f"{TRAIN} --config c.yaml",
      write("c.yaml", "- 1\n- 2\n"), names="c.yaml")
probe("config", "config not UTF-8", f"{TRAIN} --config c.yaml",
      write("c.yaml", b"reg: \xff\xfe\n"), names="c.yaml")
probe("config", "config is a directory", f"{TRAIN} --config cdir",
      lambda d, fx: (d / "cdir").mkdir(), names="cdir")
probe("config", "config missing", f"{TRAIN} --config nope.yaml", names="nope.yaml")
probe("config", "--config /dev/zero", f"{TRAIN} --config /dev/zero", names="/dev/zero")
probe("config", "YAML: an explicit key of 1 MB", f"{TRAIN} --config c.yaml",
      write("c.yaml", "? " + "k" * 1_000_000 + "\n: 1\n"), names="c.yaml")
probe("config", "YAML: a flow list of 20,000 numbers", f"{TRAIN} --config c.yaml",
      write("c.yaml", "reg: [" + ",".join(["1"] * 20_000) + "]\n"), names="c.yaml")
BUILD = "data build --source synthetic --set n_patients=200 --out o.npz"
for key, value in [("seed", "none"), ("n_patients", "none"), ("name", "5"), ("split", "none"),
                   ("ddi", "none"), ("cooc_min_lift", "1" + "0" * 400), ("acute_rate", "none"),
                   ("n_med", "abc")]:
    probe("config", f"data build --set {key}={value[:12]}", f"{BUILD} --set {key}={value}",
          names=key)
probe("config", "data build mimic3 --set top_diag=none (legitimate: keep all)",
      "data build --source mimic3 --path mm --out o.npz --set top_diag=none", copy("mm", "mm"),
      expect="ok")
probe("config", "--set without =", f"{TRAIN} --set foo", names="--set")
probe("config", "a key given twice", f"{TRAIN} --lr 0.1 --set lr=0.2", names="lr")
probe("config", "--preset nope", f"{TRAIN} --preset nope", names="preset")
probe("config", "--device cuda without CUDA", f"{TRAIN} --device cuda", names="device")
probe("config", "checked before the data: --set epoch=0 --data missing.npz",
      f"train --data missing.npz {LG} --set epoch=0", names="epoch")
probe("config", "checked before the data: bad YAML, --data a broken folder",
      f"train --data broken {LG} --config c.yaml",
      both(write("c.yaml", "latdmi: 8\n"), lambda d, fx: (d / "broken").mkdir()),
      names="latdmi")

# ------------------------------------------------------------------ concurrent runs
probe("concurrent", "two trains on one --out at once",
      "train --data {fx}/small.npz --model lightgcn --set epoch=3 --set latdim=8 --out run "
      "--no-plot --no-progress", parallel=2, names="in use", check=python_check(FP))
probe("concurrent", "a stale lock of a dead process", f"{TRAIN} --out run",
      write("run/.lock", json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(),
                                      "since": "2020-01-01 00:00:00"})), expect="ok",
      check=lambda d: ["lock left"] if (d / "run/.lock").exists() else [])
probe("concurrent", "a lock held by a live process (pid 1)", f"{TRAIN} --out run",
      write("run/.lock", json.dumps({"pid": 1, "host": socket.gethostname(),
                                      "since": "2020-01-01 00:00:00"})), names="in use")
probe("concurrent", "a lock that is a link to /dev/zero", f"{TRAIN} --out run",
      lambda d, fx: ((d / "run").mkdir(), (d / "run/.lock").symlink_to("/dev/zero")),
      expect="ok")
probe("concurrent", "an unreadable lock older than a minute", f"{TRAIN} --out run",
      both(write("run/.lock", "garbage"), lambda d, fx: os.utime(d / "run/.lock", (0, 0))),
      expect="ok")
probe("concurrent", "two compares on one --out at once",
      "compare --data {fx}/small.npz --rows MostPop LightGCN --seeds 1 --set epoch=1 "
      "--set latdim=8 --out cmp", parallel=2, names="in use")

# ------------------------------------------------------------------ disk faults
probe("disk", "data build --out an existing directory",
      "data build --source synthetic --set n_patients=200 --out o.npz",
      lambda d, fx: (d / "o.npz").mkdir(), names="o.npz")
probe("disk", "data build --out under a file", "data build --source synthetic "
      "--set n_patients=200 --out f/o.npz", write("f", "x"), names="f")
probe("disk", "data build --out an existing file (legitimate)", "data build --source synthetic "
      "--set n_patients=200 --out o.npz", write("o.npz", "old"), expect="ok")
probe("disk", "data export --out an existing file", "data export {fx}/small.npz --format kgat "
      "--out e", write("e", "x"), names="e")
probe("disk", "train --out an existing file", f"{TRAIN} --out r", write("r", "x"), names="r")
probe("disk", "compare --out an existing file", "compare --data {fx}/small.npz --rows MostPop "
      "--seeds 1 --out c", write("c", "x"), names="c")
probe("disk", "data build into a read-only folder", "data build --source synthetic "
      "--set n_patients=200 --out ro/o.npz", mounted("ro", "1m", True), names="ro",
      needs="mount")
probe("disk", "data export into a read-only folder", "data export {fx}/small.npz --format kgat "
      "--out ro/e", mounted("ro", "1m", True), names="ro", needs="mount")
probe("disk", "train --out in a read-only folder", f"{TRAIN} --out ro/r",
      mounted("ro", "1m", True), names="ro", needs="mount")
probe("disk", "data build onto a full disk", "data build --source synthetic "
      "--set n_patients=200 --out full/o.npz", mounted("full", "48k"), names="o.npz",
      needs="mount")
probe("disk", "data export onto a full disk", "data export {fx}/small.npz --format kgat "
      "--out full/e", mounted("full", "24k"), names="full", needs="mount")
probe("disk", "train --out onto a full disk", f"{TRAIN} --out full/r",
      mounted("full", "32k"), names="full/r", needs="mount")
probe("disk", "compare --out onto a full disk", "compare --data {fx}/small.npz --rows MostPop "
      "--seeds 1 --out full/c", mounted("full", "8k"), names="full", needs="mount",
      allow=("full/c/compare.json", "full/c/compare.md"))

# ------------------------------------------------------------------ compare
CMP = "compare --data {fx}/small.npz --rows MostPop --seeds 1 --out cmp"
probe("compare", "--rows bogus", CMP.replace("MostPop", "bogus"), names="rows")
probe("compare", "--seeds -5", CMP.replace("--seeds 1", "--seeds -5"), names="seed")
probe("compare", "--threads -1", CMP + " --threads -1", names="threads")
probe("compare", "--threads 0", CMP + " --threads 0", names="threads")
probe("compare", "--set epohc=1 (a key no model takes)", CMP + " --set epohc=1", names="epohc")
probe("compare", "--set epoch=0", CMP + " --set epoch=0", names="epoch")
probe("compare", "compare.json truncated", CMP, write("cmp/compare.json", '[{"row": '),
      names="compare.json")
probe("compare", "compare.json of another shape", CMP, write("cmp/compare.json", '[{"row": 1}]'),
      names="compare.json")
probe("compare", "resumed on another dataset", CMP.replace("small.npz", "small_b.npz"),
      lambda d, fx: shutil.copytree(fx / "cmp", d / "cmp"), names="compare.json")
probe("compare", "resumed with another --set", CMP + " --set epoch=2",
      lambda d, fx: shutil.copytree(fx / "cmp", d / "cmp"), names="compare.json")
probe("compare", "--data missing", CMP.replace("{fx}/small.npz", "missing.npz"),
      names="missing.npz")

# ------------------------------------------------------------------ recommend
REC = "recommend {fx}/runD"
probe("recommend", "--top 0", REC + " --patient 1 --top 0", names="top")
probe("recommend", "--top 1000000", REC + " --patient 1 --top 1000000", names="top")
probe("recommend", "--patient -1", REC + " --patient -1", names="patient")
probe("recommend", "--patient 10^30", REC + " --patient 1" + "0" * 30, names="patient")
probe("recommend", "unknown codes", REC + " --diagnoses 99999,ABC", expect="either",
      names="99999")
probe("recommend", "no codes, no patient", REC, names="diagnoses")
probe("recommend", "codes for a LightGCN run", "recommend {fx}/runA --diagnoses 4019",
      names="diagnoses")
probe("recommend", "--format bogus", REC + " --patient 1 --format bogus", names="format")
probe("recommend", "--diagnoses of 20,000 codes", REC + " --diagnoses "
      + ",".join(["4019"] * 20_000), expect="either", names="diagnoses")
probe("recommend", "--ddi bogus", REC + " --patient 1 --ddi bogus", names="--ddi")
probe("recommend", "--ddi penalty=-1", REC + " --patient 1 --ddi penalty=-1", names="--ddi")
probe("recommend", "--ddi penalty=nan", REC + " --patient 1 --ddi penalty=nan", names="--ddi")
probe("recommend", "--ddi avoid (legitimate)", REC + " --patient 1 --ddi avoid", expect="ok")

# ------------------------------------------------------------------ --data specs
probe("data-spec", "a folder of neither layout", f"train --data empty {LG}",
      lambda d, fx: (d / "empty").mkdir(), names="empty")
probe("data-spec", "Datasets/NAME missing", f"train --data lastfm {LG}", names="lastfm")
probe("data-spec", "Datasets/NAME (legitimate)", f"train --data mini {LG}",
      copy("kg", "Datasets/mini"), expect="ok")
probe("data-spec", "--data ''", f"train --data '' {LG}", names="--data")
probe("data-spec", "a CSV file", f"train --data x.csv {LG}", write("x.csv", "a,b\n1,2\n"),
      names="x.csv")
probe("data-spec", "/dev/null", f"train --data /dev/null {LG}", names="/dev/null")
probe("data-spec", "a DiffKG folder with a broken kg.txt", f"train --data dk {LG}",
      copy("dk", "dk", in_folder("kg.txt", "1 2\n")), names="kg.txt")
probe("data-spec", "evaluate --data ''", "evaluate {fx}/runA --data ''", names="--data")

# ------------------------------------------------------------------ models with bad options
MODEL = "train --data {fx}/small.npz --set epoch=1 --no-plot --no-progress --model"
probe("model", "DDI loss, target_ddi=2", f"{MODEL} diffkg --set ddi_loss=true --set target_ddi=2",
      names="target_ddi")
probe("model", "sampled diffusion, 0 negatives",
      f"{MODEL} diffkg --set diffusion_mode=sampled --set diffusion_negatives=0",
      names="diffusion_negatives")
probe("model", "cl_mode bogus", f"{MODEL} diffkg --set cl_mode=bogus", names="cl_mode")
# Legitimate: KGAT without propagation layers, DiffRec's schedule with falling betas (its own
# code accepts both).
probe("model", "--model kgat --set layers=[] (legitimate)", f"{MODEL} kgat --set layers=[]",
      expect="ok")
probe("model", "--model diffrec, noise_min > noise_max (legitimate)",
      f"{MODEL} diffrec --set noise_min=0.1 --set noise_max=0.01", expect="ok")
# Sizes the user asked for: not bounded up front (the allocator refuses them, or the kernel's
# OOM killer would without the pass's 4 GiB address-space limit); the answer must be one line.
for model, opts in [("kgcn", "--set n_iter=20"), ("lightgcn", "--set latdim=1000000000"),
                    ("diffkg", "--set dims=[1000000000]")]:
    probe("model", f"--model {model} {opts} (out of memory)", f"{MODEL} {model} {opts}",
          names="out of memory", peak_mb=4096)
for model, opts, what in [
        ("kgat", "--set layers=[0]", "layers"),
        ("kgat", "--set aggregator_type=foo", "aggregator_type"),
        ("kgat", "--keepRate 0.2", "keepRate"),
        ("kgin", "--set context_hops=-1", "context_hops"),
        ("kgin", "--set mess_dropout_rate=nan", "mess_dropout_rate"),
        ("kgin", "--set n_factors=0", "n_factors"),
        ("kgcn", "--set neighbor_sample_size=0", "neighbor_sample_size"),
        ("kgcn", "--set aggregator=foo", "aggregator"),
        ("multivae", "--set latent_dimension=3", "latent_dimension"),
        ("multivae", "--set mlp_hidden_size=[-1]", "mlp_hidden_size"),
        ("cdae", "--set corruption_ratio=1", "corruption_ratio"),
        ("cdae", "--set loss_type=foo", "loss_type"),
        ("diffrec", "--set steps=0", "steps"),
        ("bogus", "", "model")]:
    probe("model", f"--model {model} {opts}", f"{MODEL} {model} {opts}", names=what)
