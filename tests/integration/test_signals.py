"""SIGINT and SIGTERM during training: stop at a step boundary, checkpoint, say how to resume,
exit 130 / 143; the resumed run ends with the delta of an uninterrupted one, bit for bit."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import surgical as sg
from conftest import cls_batches, run_main, tiny_bert
from surgical.recipes.train import resume_command, stop_on_signals
from surgical.train.checkpoint import checkpoints, latest_checkpoint
from surgical.train.loop import fit
from train_fixtures import save_tiny_model, write_cls_csv

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, COLUMNS="250", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
BATCHES = cls_batches(n=6)
# ~10 ms a step: the run goes on for seconds after its first checkpoint, when the signal is sent,
# so that even a starved test process signals it before it ends
STEPS, EVERY = 300, 25


# --- fit(stop=...) ----------------------------------------------------------------------------


def _prepared():
    model = tiny_bert(0)
    sg.prepare(model, sg.select(model, BATCHES, method="gradient", density=0.1, progress=False))
    return model


def _stop_after(n: int, reason: str = "sigint"):
    calls = []

    def stop():
        calls.append(1)
        return reason if len(calls) >= n else None

    return stop


def _same_delta(a: sg.Delta, b: sg.Delta) -> None:
    assert a.entries.keys() == b.entries.keys() and a.full.keys() == b.full.keys()
    for name, (idx, vals) in a.entries.items():
        assert torch.equal(idx, b.entries[name][0]) and torch.equal(vals, b.entries[name][1]), name
    for name, t in a.full.items():
        assert torch.equal(t, b.full[name]), name


def test_fit_stops_at_the_step_boundary_with_a_checkpoint_and_resumes_exactly(tmp_path):
    run = dict(max_steps=8, lr=1e-2, show=False)
    ref = _prepared()
    fit(ref, BATCHES, **run)
    stopped = _prepared()
    res = fit(stopped, BATCHES, checkpoint_dir=tmp_path, stop=_stop_after(3, "sigterm"), **run)
    assert res.stopped == "sigterm" and res.steps == 3 and len(res.losses) == 3
    # no periodic checkpoints were asked for: the one there is the stop's own
    assert [p.name for p in checkpoints(tmp_path)] == ["step-3"]
    again = _prepared()
    res = fit(again, BATCHES, checkpoint_dir=tmp_path, resume=True, **run)
    assert res.resumed_from == 3 and res.steps == 8 and res.stopped is None
    _same_delta(sg.extract(ref), sg.extract(again))


def test_a_stop_after_the_last_step_just_ends_the_run(tmp_path):
    res = fit(_prepared(), BATCHES, max_steps=2, show=False, checkpoint_dir=tmp_path, stop=lambda: "sigint")
    assert res.stopped == "sigint" and res.steps == 1  # asked after step 1
    res = fit(_prepared(), BATCHES, max_steps=1, show=False, stop=lambda: "sigint")
    assert res.stopped is None and res.steps == 1  # nothing was left to stop


def test_a_stop_on_a_periodic_checkpoint_step_writes_it_once(tmp_path):
    res = fit(_prepared(), BATCHES, max_steps=6, show=False, checkpoint_dir=tmp_path, checkpoint_every=2,
              stop=_stop_after(4))  # fmt: skip
    assert res.steps == 4 and latest_checkpoint(tmp_path).name == "step-4"


# --- the handlers -----------------------------------------------------------------------------


def test_signals_set_a_flag_inside_and_the_old_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals() as stop:
        assert stop() is None
        os.kill(os.getpid(), signal.SIGTERM)  # no exception: only recorded
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop() == "sigterm"  # the first signal received is the reason
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(KeyboardInterrupt), stop_on_signals():
        raise KeyboardInterrupt  # an exception inside still restores them
    assert {s: signal.getsignal(s) for s in before} == before


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def body():
        with stop_on_signals() as stop:
            seen.append((stop(), signal.getsignal(signal.SIGINT)))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [(None, signal.getsignal(signal.SIGINT))]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/usr/bin/surgical", "train", "-c", "my run.yaml"], "surgical train -c 'my run.yaml' --resume"),
        (
            ["/x/surgical/__main__.py", "train", "-c", "a.yml", "--overwrite"],
            "surgical train -c a.yml --resume",
        ),
        (
            ["surgical", "train", "-c", "a.yml", "--resume", "--lr", "1"],
            "surgical train -c a.yml --lr 1 --resume",
        ),
        (["pytest", "-q"], "surgical train with the same config and --resume (out 'r')"),
    ],
)
def test_the_resume_command_is_the_command_line_with_resume(monkeypatch, argv, expected):
    monkeypatch.setattr(sys, "argv", argv)
    assert resume_command(Path("r")) == expected


def test_an_in_process_run_leaves_the_handlers_as_they_were(tmp_path, files, monkeypatch, capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(_config(tmp_path, files, max_steps=2)))
    assert code == 0, err
    assert {s: signal.getsignal(s) for s in before} == before


# --- `surgical train` in a subprocess ---------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    return {"bert": save_tiny_model(root / "bert", "bert"), "csv": write_cls_csv(root / "cls.csv")}


def _config(tmp_path: Path, files, max_steps: int = STEPS) -> Path:
    cfg = {
        "out": str(tmp_path / "run"),
        "model": {"path": str(files["bert"])},
        "data": {"path": str(files["csv"]), "batch_size": 8, "max_length": 16, "limit": 24},
        "selection": {"method": "gradient", "density": 0.05, "always": ["classifier"]},
        "training": {"max_steps": max_steps, "lr": 0.01, "checkpoint_every": EVERY},
    }
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _surgical(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgical", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The delta of the same run, uninterrupted."""
    root = tmp_path_factory.mktemp("reference")
    done = _surgical("train", "-c", str(_config(root, files)))
    assert done.returncode == 0, done.stderr[-2000:]
    return sg.Delta.load(root / "run" / "delta")


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_checkpoints_says_how_to_resume_and_the_resume_is_exact(
    tmp_path, files, reference, sig, code
):
    cfg = _config(tmp_path, files)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "surgical", "train", "-c", str(cfg)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and latest_checkpoint(run / "checkpoints") is None and proc.poll() is None:
        time.sleep(0.01)  # training is under way once the first periodic checkpoint exists
    assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
    os.kill(proc.pid, sig)
    os.kill(proc.pid, sig)  # a second one, impatient: absorbed while the step ends and is written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]

    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    summary = json.loads((run / "summary.json").read_text())
    step = summary["steps"]
    assert summary["status"] == "interrupted" and summary["signal"] == sig.name and EVERY <= step < STEPS
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step-{step}" and summary["checkpoint"] == str(ckpt)
    assert not (run / "delta").exists()
    resume = f"surgical train -c {shlex.quote(str(cfg))} --resume"
    assert lines[0] == (
        f"interrupted ({sig.name}) at step {step}; checkpoint written to {ckpt}; continue with: {resume}"
    )

    # exactly what the line says to run
    resumed = _surgical(*shlex.split(lines[0].split("continue with: ")[1])[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["resumed_from"] == step and summary["steps"] == STEPS
    _same_delta(reference, sg.Delta.load(run / "delta"))
