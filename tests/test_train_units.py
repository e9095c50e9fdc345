"""Pieces of the trainer that need no distributed run: lr schedule, parameter groups, DeepSpeed
config filling, checkpoint completeness and fall-back, RNG round trip, tracking that survives MLflow
being unreachable."""

import json
import math
import random
import time
import warnings

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.train import checkpoint
from pipeline.train.deepspeed_setup import deepspeed_config
from pipeline.train.schedule import lr_at, param_groups
from pipeline.train.tracking import Tracker


def test_cosine_schedule_of_the_variant():
    t = load_config("simvlg_opt2.7b_variant").train  # the paper's run itself: test below (lavis)
    assert t.lr_schedule == "cosine"
    assert lr_at(0, t) == pytest.approx(1e-6)
    assert lr_at(2500, t) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr_at(5000, t) == pytest.approx(1e-4)
    assert lr_at(t.steps - 1, t) == pytest.approx(1e-5)
    after = [lr_at(s, t) for s in range(5000, t.steps, 997)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    mid = 5000 + (t.steps - 1 - 5000) // 2
    assert lr_at(mid, t) == pytest.approx((1e-4 + 1e-5) / 2, rel=1e-3)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = param_groups(model.named_parameters(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # two biases + norm weight/bias; the frozen weight is out


def test_deepspeed_config_takes_batch_and_precision_from_yaml():
    cfg = load_config("demo", ["train.precision=fp16", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg)
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (32, 16, 1)
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert ds["bf16"] == {"enabled": False}
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert not any(k.startswith("_") for k in ds)


class FileWritingEngine:
    """Stands in for DeepSpeed's save_checkpoint: writes a tag folder with a weights file."""

    def save_checkpoint(self, save_dir, tag, exclude_frozen_parameters):
        folder = f"{save_dir}/{tag}"
        import os

        os.makedirs(folder, exist_ok=True)
        with open(f"{folder}/mp_rank_00_model_states.pt", "wb") as f:
            f.write(b"x" * 1000)


def save(root, step, keep=3):
    return checkpoint.save(
        FileWritingEngine(),
        root,
        step,
        {"loader": {"n": step}},
        rank=0,
        world_size=1,
        keep=keep,
        barrier=lambda: None,
    )


def test_checkpoint_is_complete_and_latest_moves(tmp_path):
    root = tmp_path / "checkpoints"
    first = save(root, 100)
    assert checkpoint.problem(first) is None
    assert (root / "latest").read_text() == "step_00000100"
    save(root, 200)
    assert (root / "latest").read_text() == "step_00000200"
    assert not list(root.glob(".tmp-*"))
    assert json.loads((root / "step_00000200" / "rank0.json").read_text())["loader"] == {"n": 200}


def test_keep_last_k(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save(root, step, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("damage", ["truncate", "delete", "no_marker"])
def test_damaged_checkpoint_is_skipped_with_warning(tmp_path, damage):
    root = tmp_path / "checkpoints"
    save(root, 100)
    newest = save(root, 200)
    weights = newest / "ds" / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        weights.write_bytes(b"x" * 10)
    elif damage == "delete":
        weights.unlink()
    else:
        (newest / "COMPLETE.json").unlink()
    with pytest.warns(UserWarning, match="not resuming from .*step_00000200"):
        found = checkpoint.find_resumable(root)
    assert found == root / "step_00000100"


def test_interrupted_write_is_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 100)
    (root / ".tmp-step_00000200" / "ds").mkdir(parents=True)  # killed mid-write
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.find_resumable(root) == root / "step_00000100"
    assert checkpoint.find_resumable(tmp_path / "nothing") is None


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    state = json.loads(json.dumps(state))  # it is stored as JSON
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_tracking_survives_unreachable_server(tmp_path):
    cfg = load_config("demo", ["tracking.uri=http://127.0.0.1:9"])  # nothing listens on port 9
    t0 = time.time()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        tracker = Tracker(cfg, tmp_path)
        for step in range(3):
            tracker.log(step, {"loss": 1.0 / (step + 1)})
        tracker.close()
    assert time.time() - t0 < 60
    assert tracker.failures >= 1
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    assert lines[2]["loss"] == pytest.approx(1 / 3)


def test_tracking_local_sqlite_has_params_metrics_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = load_config("demo")
    tracker = Tracker(cfg, tmp_path)
    tracker.log(10, {"loss": 2.5, "lr": 1e-3})
    (tmp_path / "note.txt").write_text("hello")
    tracker.artifact(tmp_path / "note.txt")
    tracker.table([{"id": 1, "caption": "a red circle"}], "captions.json")
    tracker.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.data.params["train.steps"] == str(cfg.train.steps)
    assert run.data.metrics["loss"] == 2.5
    names = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "config.json", "note.txt", "captions.json"} <= names
    assert run.info.status == "FINISHED"
    assert math.isclose(client.get_metric_history(tracker.run_id, "lr")[0].value, 1e-3)


def test_lavis_schedule_is_the_official_staircase():
    from pipeline.config import TrainConfig
    from pipeline.train.schedule import lr_at

    t = load_config("simvlg_opt2.7b").train
    assert (t.lr_schedule, t.iters_per_inner_epoch, t.steps) == ("lavis", 5000, 250_000)
    assert lr_at(0, t) == pytest.approx(1e-6)
    assert lr_at(2500, t) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr_at(4999, t) < 1e-4
    cos = lambda e: 1e-5 + 0.9e-4 * 0.5 * (1 + math.cos(math.pi * e / 50))
    assert lr_at(5000, t) == pytest.approx(cos(1)) and lr_at(9999, t) == lr_at(5000, t)  # flat per epoch
    assert lr_at(10_000, t) == pytest.approx(cos(2)) and lr_at(249_999, t) == pytest.approx(cos(49))
    short = TrainConfig(
        steps=10,
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=2,
        warmup_start_lr=0.0,
        lr_schedule="lavis",
        iters_per_inner_epoch=5,
    )
    assert [round(lr_at(s, short) / 1e-4, 3) for s in range(10)] == [0, 0.5, 1, 1, 1] + [0.55] * 5
    with pytest.raises(ValueError, match="iters_per_inner_epoch"):
        TrainConfig(lr_schedule="lavis")


def test_step_sums_count_only_rows_with_a_target_token_in_their_arm():
    """A task row whose text input filled the whole row has per_sample_loss 0 and no token: counting it
    would pull its arm's mean loss (what adaptive mixing reads) towards 0."""
    from pipeline.train.engine import StepSums

    sums = StepSums(arms=2, device="cpu")
    out = {
        "loss": torch.tensor(1.0),
        "num_tokens": torch.tensor(7),
        "per_sample_loss": torch.tensor([2.0, 0.0, 4.0]),
        "per_sample_tokens": torch.tensor([3, 0, 4]),
    }
    sums.add(out, {"input_ids": torch.zeros(3, 5, dtype=torch.long), "arm_idx": torch.tensor([0, 0, 1])})
    assert sums.arm_loss.tolist() == [2.0, 4.0] and sums.arm_count.tolist() == [1.0, 1.0]
    del out["per_sample_tokens"]  # a model that does not say: every row counts
    sums.add(out, {"input_ids": torch.zeros(3, 5, dtype=torch.long), "arm_idx": torch.tensor([0, 0, 1])})
    assert sums.arm_count.tolist() == [3.0, 2.0]
