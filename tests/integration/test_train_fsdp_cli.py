"""``surgical train`` with ``training.fsdp``: 2 gloo processes under torchrun shard a tiny Llama and
end with the delta one process trains on the same data; the settings it cannot honour are refused."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import surgical as sg
from conftest import run_main
from train_fixtures import run_two_processes, save_tiny_model, write_instruct_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_cli")
    # every example has the same number of tokens: a rank's mean loss over its half of a batch
    # then averages (FSDP's gradient mean) to the whole batch's mean, as one process computes it
    return {
        "llama": save_tiny_model(root / "llama", "llama"),
        "jsonl": write_instruct_jsonl(root / "d.jsonl"),
    }


TORCHRUN = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m"]


def _config(path, files, out, **training) -> str:
    cfg = {
        "out": str(out),
        "model": {"path": str(files["llama"]), "task": "causal_lm"},
        "data": {"path": str(files["jsonl"]), "batch_size": 4, "max_length": 16},
        "selection": {"method": "random", "density": 0.05, "always": ["model.norm"]},
        "training": {"max_steps": 5, "lr": 0.01, "warmup": 0.0, **training},
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _pair(tmp_path, files, edit) -> dict[str, str]:
    """The configs of a one-process run and of a sharded one (``single``, ``fsdp``), each
    changed by ``edit(cfg)``."""
    runs = {}
    for name, extra in (("single", {}), ("fsdp", {"fsdp": True})):
        path = _config(tmp_path / f"{name}.yaml", files, tmp_path / name, **extra)
        cfg = yaml.safe_load(open(path))
        edit(cfg)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        runs[name] = path
    return runs


def _run_pair(tmp_path, monkeypatch, capsys, runs: dict[str, str]):
    """Runs both; asserts that the sharded delta and losses are the one-process run's to float
    rounding; returns both deltas and summaries."""
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", runs["single"])
    assert code == 0, err
    run_two_processes("surgical", "train", "-c", runs["fsdp"], launcher=TORCHRUN)
    one, two = (sg.Delta.load(tmp_path / n / "delta") for n in ("single", "fsdp"))
    for name, (idx, vals) in one.entries.items():
        assert torch.equal(two.entries[name][0], idx), name
        torch.testing.assert_close(two.entries[name][1], vals, rtol=1e-3, atol=1e-5)
    for name, value in one.dense.items():
        torch.testing.assert_close(two.dense[name], value, rtol=1e-3, atol=1e-5)
    s1, s2 = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("single", "fsdp"))
    assert s2["losses"] == pytest.approx(s1["losses"], rel=1e-4)
    return one, two, s1, s2


def test_two_processes_train_the_delta_of_one(tmp_path, files, monkeypatch, capsys):
    single = _config(tmp_path / "single.yaml", files, tmp_path / "single")
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", single)
    assert code == 0, err
    sharded = _config(tmp_path / "fsdp.yaml", files, tmp_path / "fsdp", fsdp=True, checkpoint_every=2)
    run_two_processes("surgical", "train", "-c", sharded, launcher=TORCHRUN)
    one = sg.Delta.load(tmp_path / "single" / "delta")
    two = sg.Delta.load(tmp_path / "fsdp" / "delta")
    # the same plan, and the delta names the same unsharded base
    assert two.entries.keys() == one.entries.keys() and two.dense.keys() == one.dense.keys()
    assert two.meta["base"]["fingerprint"] == one.meta["base"]["fingerprint"]
    moved = sum(int((v != 0).sum()) for _, v in one.entries.values())
    assert moved > 0.9 * one.num_entries  # training happened
    for name, (idx, vals) in one.entries.items():
        assert torch.equal(two.entries[name][0], idx), name
        # additive (sharded) against in-place (one process) path: float rounding only
        torch.testing.assert_close(two.entries[name][1], vals, rtol=1e-3, atol=1e-5), name
    for name, value in one.dense.items():
        torch.testing.assert_close(two.dense[name], value, rtol=1e-3, atol=1e-5)
    s1 = json.loads((tmp_path / "single" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert s2["steps"] == s1["steps"] == 5
    assert s2["losses"] == pytest.approx(s1["losses"], rel=1e-4)  # the mean over the ranks' halves
    assert s2["fsdp"]["processes"] == 2 and len(s2["fsdp"]["peak_rss_bytes"]) == 2
    # checkpoints as a one-process run writes them (the newest kept), by process 0 alone
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints").iterdir()) == ["step-5"]
    # --resume continues the sharded run: two more steps from step 5 (the length knowingly changed)
    run_two_processes("surgical", "train", "-c", sharded, "--resume", "--set", "training.max_steps=7",
                      "--allow-change", "training.max_steps", launcher=TORCHRUN)  # fmt: skip
    s3 = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert s3["resumed_from"] == 5 and s3["steps"] == 7 and s3["losses"][:5] == s2["losses"]
    assert len(s3["losses"]) == 7
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints").iterdir()) == ["step-7"]
    longer = sg.Delta.load(tmp_path / "fsdp" / "delta")
    assert any(not torch.equal(longer.entries[n][1], two.entries[n][1]) for n in two.entries)
    # one process cannot take over the checkpoint of two: one line, exit 2
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", single, "--resume", "--set",
                            f"out={tmp_path / 'fsdp'}", "--set", "training.max_steps=7")  # fmt: skip
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "training.fsdp was true, now false" in err


def test_token_selection_trains_the_same_tokens_sharded(tmp_path, files, monkeypatch, capsys):
    """Excess-loss token selection keeps each example's own top tokens: on each rank's share of a
    batch as on the whole batch, so the sharded run ends near the one-process delta. Against the
    base (toggled off on the shards) and against a tuned reference delta (its losses computed
    before sharding, where one process keeps a whole second model)."""
    full = _config(tmp_path / "all.yaml", files, tmp_path / "all")  # every token: the reference delta
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", full)
    assert code == 0, err
    s0 = json.loads((tmp_path / "all" / "summary.json").read_text())
    losses = {}
    for ref in ("base", str(tmp_path / "all" / "delta")):
        tokens = {"method": "excess_loss", "fraction": 0.5, "reference": ref}
        cfgs = {}
        for name, extra in (("single", {}), ("fsdp", {"fsdp": True})):
            path = _config(tmp_path / f"{name}.yaml", files, tmp_path / f"{name}-{len(losses)}", **extra)
            cfg = yaml.safe_load(open(path))
            cfg["token_selection"] = tokens
            (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            cfgs[name] = (path, tmp_path / f"{name}-{len(losses)}")
        code, _, err = run_main(monkeypatch, capsys, "train", "-c", cfgs["single"][0])
        assert code == 0, err
        run_two_processes("surgical", "train", "-c", cfgs["fsdp"][0], launcher=TORCHRUN)
        one, two = (sg.Delta.load(cfgs[n][1] / "delta") for n in ("single", "fsdp"))
        for name, (idx, vals) in one.entries.items():
            assert torch.equal(two.entries[name][0], idx), name
            torch.testing.assert_close(two.entries[name][1], vals, rtol=1e-3, atol=1e-5)
        for name, value in one.dense.items():
            torch.testing.assert_close(two.dense[name], value, rtol=1e-3, atol=1e-5)
        s1, s2 = (json.loads((cfgs[n][1] / "summary.json").read_text()) for n in ("single", "fsdp"))
        assert s2["losses"] == pytest.approx(s1["losses"], rel=1e-4)
        # a run on every token trains otherwise: the selection did act
        assert s0["losses"] != pytest.approx(s1["losses"], rel=1e-3)
        losses[ref] = s1["losses"]
    # the tuned reference keeps other tokens than the base does
    assert losses["base"] != pytest.approx(list(losses.values())[1], rel=1e-3)


def test_an_nf4_base_trains_sharded_as_on_one_process(tmp_path, files, monkeypatch, capsys):
    """``model.quantization: {backend: torchao, bits: 4}`` with ``training.fsdp``: the NF4 weights
    are split between the ranks and the delta is the one-process NF4 run's to float rounding."""
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")

    def nf4(cfg):
        cfg["model"]["quantization"] = {"backend": "torchao", "bits": 4}

    one, two, s1, s2 = _run_pair(tmp_path, monkeypatch, capsys, _pair(tmp_path, files, nf4))
    assert two.meta["base"]["fingerprint"] == one.meta["base"]["fingerprint"]
    assert sum(int((v != 0).sum()) for _, v in one.entries.values()) > 0.9 * one.num_entries
    q = s2["quantization"]
    assert q == s1["quantization"] and q["format"] == "NF4" and q["backend"] == "torchao" and q["bits"] == 4
    assert q["quantized"] == 14 and q["bytes_after"] < 0.2 * q["bytes_before"]  # about 0.5-0.6 of 4 bytes


@pytest.mark.parametrize("schedule", ["lisa", "hft"])
def test_lisa_and_hft_train_the_delta_of_one_process_sharded(tmp_path, files, monkeypatch, capsys, schedule):
    """A schedule that switches layers (LISA) or tensors (HFT) off and on: sharded, the inactive
    keep requires_grad (FSDP2 settles at its first forward which get gradients) and their
    gradients are dropped before each step; the run ends near the one-process delta, where
    layers and tensors first switched on after the first step train too."""
    options = {"lisa": {"every": 2, "gamma": 1}, "hft": {"every": 2}}[schedule]

    def scheduled(cfg):
        cfg["schedule"] = {"name": schedule, "options": options}
        cfg["training"]["max_steps"] = 6

    one, _, _, _ = _run_pair(tmp_path, monkeypatch, capsys, _pair(tmp_path, files, scheduled))
    # every tensor trained at some step: with one layer (LISA) or half the tensors (HFT) on at a
    # time, some were first switched on after FSDP's first forward
    moved = sum(bool((v != 0).any()) for _, v in one.entries.values())
    assert moved == len(one.entries) if schedule == "lisa" else moved > len(one.entries) // 2


@pytest.mark.parametrize(
    ("world", "training", "sections", "needle"),
    [
        (None, {}, {}, "training.fsdp needs at least 2 processes, this run has 1. Launch it with torchrun"),
        ("2", {}, {"data": {"batch_size": 3}}, "data.batch_size 3 does not split evenly between 2 processes"),
        (
            "2",
            {},
            {"model": {"quantization": {"backend": "torchao"}}},
            "training.fsdp cannot shard model.quantization.backend: torchao with bits: its default "
            "(FSDP2 splits only torchao's NF4 weights). Set model.quantization to {backend: torchao, "
            "bits: 4}",
        ),
        ("2", {}, {"schedule": {"name": "regrow"}}, "training.fsdp does not support schedule.name: regrow"),
        ("2", {}, {"data_selection": {"method": "random", "fraction": 0.5}}, "select-data"),
    ],
)
def test_what_a_sharded_run_cannot_do_is_refused_in_one_line(
    tmp_path, files, monkeypatch, capsys, world, training, sections, needle
):
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)  # checked before any process group is joined
    cfg_path = _config(tmp_path / "c.yaml", files, tmp_path / "run", fsdp=True, **training)
    cfg = yaml.safe_load(open(cfg_path))
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_main(monkeypatch, capsys, "train", "-c", cfg_path)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_rank_shares_split_every_batch_and_drop_a_last_batch_too_small_to_split():
    from surgical.core.processes import RankShares

    batches = [{"input_ids": torch.arange(8).reshape(4, 2)}, {"input_ids": torch.arange(2).reshape(1, 2)}]
    shares = [RankShares(batches, r, 2) for r in (0, 1)]
    assert [len(s) for s in shares] == [1, 1]  # the one-row last batch cannot be split
    assert torch.equal(torch.cat([s[0]["input_ids"] for s in shares]), batches[0]["input_ids"])
    with pytest.raises(IndexError):
        shares[0][1]
    assert len(RankShares(batches[:1], 0, 4)) == 1 and RankShares(batches[:1], 3, 4)[0][
        "input_ids"
    ].shape == (1, 2)
