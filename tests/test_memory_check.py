"""The memory check: a run whose big tensors cannot fit is refused before anything is allocated,
with an error that names the parts and the options that shrink them."""

from __future__ import annotations

import pytest

from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.model import DiffKG
from diffkg_fast.train import make_config, train
from diffkg_fast.utils import memory_check
from diffkg_fast.utils.memory_check import check_memory, peak_lower_bound


@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", n_patients=300, seed=0)


def _bound(ds, **sets) -> int:
    cfg = make_config(**sets)
    return peak_lower_bound(cfg.model_cls.memory_estimate(ds, cfg))


@pytest.mark.parametrize("adam, per_weight", [("dense", 16), ("lazy", 12), ("deferred", 12)])
def test_denoiser_term_is_its_weights(ds, adam: str, per_weight: int) -> None:
    sets = {"dims": [96], "denoiser_adam": adam}
    if adam != "dense":
        sets.update(diffusion_mode="sampled", diffusion_negatives=64)
    cfg = make_config(**sets)
    model = DiffKG.from_dataset(ds, **cfg.model_options())
    n = sum(p.numel() for p in model.diffusion.denoiser.parameters())
    term = cfg.model_cls.memory_estimate(ds, cfg)[0]
    assert term.persistent
    # 2 E H weights: the biases and the time embedding (E + H + 120) are left out.
    assert term.bytes == per_weight * 2 * ds.n_entities * 96
    assert 0 < n * per_weight - term.bytes < 0.02 * term.bytes


def test_options_shrink_the_bound(ds) -> None:
    exact = _bound(ds)
    assert _bound(ds, dims=[100]) < exact
    assert _bound(ds, diffusion_mode="sampled", diffusion_negatives=64) < exact
    assert _bound(ds, use_diffusion=False) < _bound(ds, diffusion_mode="sampled",
                                                       diffusion_negatives=64)


def test_refused_below_the_bound_and_not_at_it(ds) -> None:
    cfg = make_config()
    need = _bound(ds)
    check_memory(ds, cfg, available=need)
    with pytest.raises(DataError) as err:
        check_memory(ds, cfg, available=need - 1)
    msg = str(err.value)
    assert "memory" in msg and "available" in msg
    for advice in ("a smaller dims", "diffusion_mode=sampled"):
        assert advice in msg, msg


def test_train_refuses_before_building(ds, monkeypatch) -> None:
    monkeypatch.setattr(memory_check, "available_bytes", lambda: 10**6)
    built = []
    monkeypatch.setattr(DiffKG, "from_dataset", classmethod(lambda *a, **k: built.append(1)))
    with pytest.raises(DataError, match="needs at least"):
        train(ds, make_config(epoch=1))
    assert not built
    # A model that gives no estimate is not checked.
    assert train(ds, make_config(model="mostpop", epoch=1)).val


def test_cli_says_it_in_one_line(ds, monkeypatch, tmp_path, capsys) -> None:
    from diffkg_fast import cli

    path = tmp_path / "small.npz"
    ds.save(path)
    monkeypatch.setattr(memory_check, "available_bytes", lambda: 10**6)
    assert cli.main(["train", "--data", str(path), "--epoch", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "needs at least" in err[0]
