"""Nothing hangs, nothing is lost silently: failures end every process fast with one line, and what
`simvlg train` would refuse is refused by `simvlg config validate` first (pipeline/failfast.py,
pipeline/preflight.py). The 2-rank launcher cases are in test_train.py."""

import datetime
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch.multiprocessing as mp
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.data.formats.shards import write_shard
from pipeline.preflight import check_for_training

SIMVLG = str(Path(sys.executable).parent / "simvlg")


def _jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(buf, format="JPEG")
    return buf.getvalue()


def _no_children_left(pid: int) -> list:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.is_running()]
    except psutil.NoSuchProcess:
        return []


# ---------------------------------------------------------------- a DataLoader worker's failure
def test_loader_worker_error_ends_the_process_and_its_workers(tmp_path):
    """Before: a worker that ignores SIGTERM kept multiprocessing's exit-time join waiting forever."""
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(f"""
        from pipeline.config import DataConfig, SourceConfig
        from pipeline.data import build_loader
        cfg = DataConfig(sources=[SourceConfig(name="x", shards="{tmp_path}/none/{{00000..00003}}.tar")],
                         num_workers=1)
        for b in build_loader(cfg, tokenize=None, batch_size=4):
            pass
    """)
    )
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        leftover = _no_children_left(proc.pid)
        proc.kill()
        for p in leftover:
            p.kill()
        pytest.fail("the loader hung after its worker failed")
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert "no data source gives samples" in err
    assert not _no_children_left(proc.pid)


def test_workers_die_with_their_parent(tmp_path):
    """A rank killed outright (SIGKILL) must not leave its SIGTERM-ignoring workers behind."""
    d = tmp_path / "s"
    d.mkdir()
    write_shard(d / "00000.tar", [{"__key__": f"k{i}", "jpg": _jpeg(), "txt": f"cap {i}"} for i in range(8)])
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys, time
        from pipeline.config import DataConfig, SourceConfig
        from pipeline.data import build_loader
        cfg = DataConfig(sources=[SourceConfig(name="x", shards="{d}/00000.tar")], num_workers=2,
                         image_size=32, shuffle_buffer=4)
        it = iter(build_loader(cfg, tokenize=None, batch_size=2))
        next(it)
        print("ready", flush=True)
        time.sleep(600)
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    workers = _no_children_left(proc.pid)
    assert len(workers) >= 2
    proc.kill()
    proc.wait()
    # the kernel ends them with their parent (PyTorch's own watchdog would take >= 5 s of idling)
    gone, alive = psutil.wait_procs(workers, timeout=3)
    for p in alive:
        p.kill()
    assert not alive, "DataLoader workers outlived their killed parent"


# ------------------------------------------------------------------- peers through the store
def _rank_main(rank, world, port, log_dir, mode, wait, q):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SIMVLG_FAILFAST_POLL="0.5", SIMVLG_PEER_TIMEOUT="4"
    )
    import importlib

    import torch
    import torch.distributed as dist

    import pipeline.failfast as ff

    importlib.reload(ff)  # read the poll/timeout settings above
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    with ff.RankGuard("test", Path(log_dir), rank) as guard:
        guard.watch_peers(world)
        q.put((rank, "started", time.time()))
        if rank == 1:
            time.sleep(1)
            if mode == "raise":
                raise RuntimeError("boom in rank 1")
            os.kill(os.getpid(), signal.SIGKILL)
        if wait == "blind":  # blocked where a dead peer goes unnoticed (as NCCL would be): only the
            # heartbeat can tell; a C++ wait with the GIL released, like a collective
            dist.distributed_c10d._get_default_store().wait(["never-set"], datetime.timedelta(600))
        dist.all_reduce(torch.ones(1))  # gloo: raises once rank 1's connection closes


@pytest.mark.parametrize(
    "mode,wait", [("raise", "all_reduce"), ("kill", "all_reduce"), ("raise", "blind"), ("kill", "blind")]
)
def test_a_failed_or_killed_peer_ends_the_other_rank(tmp_path, mode, wait):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(r, 2, port, str(tmp_path), mode, wait, q)) for r in range(2)
    ]
    for p in procs:
        p.start()
    t0 = time.time()
    for p in procs:
        p.join(timeout=60)
    still = [p for p in procs if p.is_alive()]
    for p in still:
        p.kill()
    assert not still, f"rank(s) {[procs.index(p) for p in still]} still running after 60 s"
    assert time.time() - t0 < 60
    assert procs[0].exitcode == 1
    if mode == "raise":
        assert procs[1].exitcode == 1
        log = (tmp_path / "rank1.log").read_text()
        assert "Traceback" in log and "boom in rank 1" in log
    else:
        assert procs[1].exitcode == -signal.SIGKILL


def test_one_line_names_the_cause():
    from pipeline.failfast import one_line

    wrapped = RuntimeError(
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback "
        '(most recent call last):\n  File "x.py", line 1\nRuntimeError: no data'
    )
    assert one_line(wrapped) == "RuntimeError: no data"
    assert one_line(ValueError("bad value")) == "ValueError: bad value"


# ---------------------------------------------------------------------- validate == train's checks
@pytest.fixture()
def usable(tmp_path):
    """A config whose files all exist: shards, a timm ViT checkpoint, HF folders."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        write_shard(shards / f"{i:05d}.tar", [{"__key__": f"{i}k", "jpg": _jpeg(), "txt": "a cap"}])
    for name in ("bert", "opt"):
        (tmp_path / name).mkdir()
    (tmp_path / "vit.safetensors").write_bytes(b"x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        textwrap.dedent(f"""
        inherit: demo.yaml
        data: {{sources: [{{name: s, shards: "{shards}/{{00000..00001}}.tar"}}]}}
        model:
          vision: {{checkpoint: {tmp_path}/vit.safetensors}}
          tomeformer: {{init: {tmp_path}/bert}}
          llm: {{name: {tmp_path}/opt}}
    """)
    )
    return cfg


def _check(cfg_path, *overrides, files=True):
    cfg = load_config(cfg_path, list(overrides))
    return check_for_training(cfg, str(cfg_path), files=files)


def test_validate_passes_a_usable_config_and_reports_token_counts(usable):
    report = _check(usable)
    assert report["tokens"] == [65, 47, 29]
    assert report["sources"] == [{"name": "s", "shards": 2, "samples": None}]
    out = subprocess.run([SIMVLG, "config", "validate", str(usable)], capture_output=True, text=True)
    assert out.returncode == 0 and "65 -> 47 -> 29" in out.stdout


@pytest.mark.parametrize(
    "override,words",
    [
        (
            "data.sources.0.shards=/nowhere/{00000..00003}.tar",
            "data.sources.0.shards: '/nowhere/{00000..00003}.tar' matches no files",
        ),
        ("data.sources=[]", "data.sources: empty"),
        ("model.vision.checkpoint=null", "model.vision.checkpoint: not set"),
        ("model.vision.checkpoint=/nowhere/vit.pth", "model.vision.checkpoint: file not found"),
        ("model.llm.name=/nowhere/opt", "model.llm.name: not found: /nowhere/opt"),
        ("model.tomeformer.init=runs/none/bert", "model.tomeformer.init: not found"),
        ("model.tomeformer.r=500", "layer 0 would merge 500 of its 65 tokens, but at most 32"),
        ("model.tomeformer.r=[18,30]", "layer 1 would merge 30 of its 47 tokens, but at most 23"),
    ],
)
def test_validate_refuses_what_train_would(usable, override, words, capsys):
    from pipeline.cli import main

    with pytest.raises(
        ConfigError,
        match=words.replace("[", r"\[").replace("{", r"\{").replace("}", r"\}").replace(".", r"\."),
    ):
        _check(usable, override)
    # the command, in this process (the console script's own one-line exit: test_config.py)
    assert main(["config", "validate", str(usable), "--set", override]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_some_missing_shards_are_refused_too(usable):
    with pytest.raises(ConfigError, match=r"1 of 3 shards .* do not exist"):
        _check(usable, "data.sources.0.shards=" + str(Path(str(usable)).parent / "shards/{00000..00002}.tar"))


def test_file_checks_can_be_skipped_for_another_machines_config(usable):
    report = _check(
        usable, "model.llm.name=/elsewhere/opt", "data.sources.0.shards=/elsewhere/{0..9}.tar", files=False
    )
    assert report["tokens"][-1] == 29
    with pytest.raises(ConfigError, match="at most 32"):  # the config-only checks still run
        _check(usable, "model.tomeformer.r=40", files=False)


def test_hub_ids_are_refused_offline_only_when_not_cached(usable, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not in the Hugging Face cache"):
        _check(usable, "model.llm.name=facebook/opt-nonexistent-test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    _check(usable, "model.llm.name=facebook/opt-nonexistent-test")  # online: fetched at load time


def test_train_refuses_in_one_line_before_starting_any_rank(usable, tmp_path):
    t0 = time.time()
    out = subprocess.run(
        [
            SIMVLG,
            "train",
            str(usable),
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            "data.sources.0.shards=/nowhere/{00000..00003}.tar",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 1 and time.time() - t0 < 90
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "'/nowhere/{00000..00003}.tar' matches no files" in lines[0], out.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- config messages
@pytest.mark.parametrize(
    "value,words",
    [
        ("[18, -3]", "model.tomeformer.r: entries should be greater than or equal to 0, got -3 at index 1"),
        ("[18, x]", "model.tomeformer.r: entries should be a valid integer, got 'x' at index 1"),
        ("{start: 4}", "model.tomeformer.r.end: required key is missing"),
        ("[1, 2, 3]", "model.tomeformer: r has 3 entries but num_layers is 2"),
    ],
)
def test_union_and_section_errors_name_the_real_problem(tmp_path, value, words):
    f = tmp_path / "c.yaml"
    f.write_text(f"inherit: demo.yaml\nmodel: {{tomeformer: {{r: {value}}}}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}: {words}"


# ------------------------------------------------------------------------------- bench data
def test_bench_data_skips_and_counts_a_garbage_jpeg(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    samples = [{"__key__": f"k{i}", "jpg": _jpeg((20 * i, 90, 9)), "txt": f"a photo {i}"} for i in range(12)]
    samples[3]["jpg"] = b"\xff\xd8\xff garbage, not a jpeg"
    write_shard(d / "00000.tar", samples)
    out = subprocess.run(
        [
            SIMVLG,
            "bench",
            "data",
            "--shards",
            str(d / "00000.tar"),
            "--workers",
            "0",
            "--seconds",
            "0.3",
            "--batch-size",
            "4",
            "--image-size",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "skipped (reading for decode): corrupt_image 1" in out.stdout
    assert "skipped (loader, 0 workers): corrupt_image" in out.stdout


# ------------------------------------------------------------------ evaluation: a crash in generate
def _eval_worker(rank, world, port, root, out):
    import torch.distributed as dist
    from test_eval import ColourCaptioner, _cfg

    from pipeline.eval.tasks import EvalDataError

    class Crashing(ColourCaptioner):
        def generate(self, *a, **kw):
            if rank == 1:
                raise RuntimeError("CUDA out of memory (simulated)")
            return super().generate(*a, **kw)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from pipeline.eval.evaluate import evaluate_task

    try:
        evaluate_task(Crashing(), _cfg(Path(root)), "tiny", Path(root) / "ev", rank=rank, world_size=world)
    except EvalDataError as e:
        Path(f"{out}.{rank}").write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_a_crash_in_generate_on_one_rank_ends_every_rank(tmp_path):
    import socket

    from test_eval import _image_set

    _image_set(tmp_path, 6)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_eval_worker, args=(r, 2, port, str(tmp_path), str(tmp_path / "err")))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank is still waiting for the crashed one"
    for r in range(2):
        msg = (tmp_path / f"err.{r}").read_text()
        assert "prediction failed on rank 1: RuntimeError: CUDA out of memory (simulated)" in msg


# ------------------------------------------------------------------------- prep's causes, in words
def test_every_failure_cause_has_a_meaning_in_the_prep_readme():
    from pipeline.data.prep.counts import _CAUSES, cause_category

    readme = (Path(__file__).resolve().parents[1] / "data_prep" / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in readme.splitlines() if line.startswith("| `")}
    assert {name for name, _ in _CAUSES} | {"other"} <= rows
    # OpenCV's raw assertion on a zero-byte body is a plain-words cause, not `other`
    assert (
        cause_category("OpenCV(4.10) error: (-215:Assertion failed) !buf.empty() in function 'imdecode_'")
        == "empty_response"
    )
