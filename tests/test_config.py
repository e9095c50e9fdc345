"""The config schema: every shipped config loads; each class of bad input fails with one line that
names the file, the dotted key and what was expected; --set overrides work."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import PACKAGED_CONFIGS, Config, ConfigError, load_config

SHIPPED = sorted(p.name for p in PACKAGED_CONFIGS.glob("*.yaml"))


def write(tmp_path: Path, text: str, name="c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    cfg = load_config(PACKAGED_CONFIGS / name)
    assert isinstance(cfg, Config)
    t = cfg.train
    assert t.micro_batch * t.grad_accum * cfg.world_size == t.global_batch


def test_paper_config_values():
    cfg = load_config("simvlg_opt2.7b")
    assert cfg.model.tomeformer.r == 19 and cfg.model.tomeformer.num_layers == 12
    assert cfg.model.llm.name == "facebook/opt-2.7b"
    assert (cfg.train.steps, cfg.train.global_batch) == (250_000, 1600)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_start_lr) == (1e-4, 1e-5, 1e-6)
    assert cfg.train.warmup_steps == 5000 and cfg.train.weight_decay == 0.05
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("laion115m", 15), ("ccs14m", 4), ("coco", 1)]
    assert Path(cfg.model.llm.arch_config).is_file()


def test_inherit_merges_over_parent():
    cfg = load_config("simvlg_opt2.7b_55m_90k")
    assert cfg.train.steps == 90_000
    assert cfg.model.tomeformer.num_layers == 6
    assert cfg.model.llm.name == "facebook/opt-2.7b"  # from the parent
    assert load_config("simvlg_opt2.7b_150k").train.steps == 150_000


def test_inherit_a_list_of_parents_merges_left_to_right(tmp_path):
    write(tmp_path, "train: {lr: 3.0e-4, steps: 10}\nrun: {name: a}\n", "a.yaml")
    write(tmp_path, "train: {steps: 20}\n", "b.yaml")
    cfg = load_config(write(tmp_path, "inherit: [a.yaml, b.yaml]\nrun: {seed: 7}\n"))
    assert (cfg.train.lr, cfg.train.steps, cfg.run.name, cfg.run.seed) == (3e-4, 20, "a", 7)
    with pytest.raises(ConfigError, match="inherit: expected a config file name or a list"):
        load_config(write(tmp_path, "inherit: [a.yaml, 3]\n", "bad.yaml"))


def test_overrides_reach_nested_keys_and_list_items():
    cfg = load_config(
        "simvlg_opt2.7b",
        ["train.lr=2e-4", "data.sources.0.weight=3", "model.tomeformer.r=[1,2,3,4,5,6,7,8,9,10,11,12]"],
    )
    assert cfg.train.lr == 2e-4
    assert cfg.data.sources[0].weight == 3
    assert cfg.model.tomeformer.r == list(range(1, 13))


def test_scientific_notation_without_dot_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "train: {lr: 3e-4, min_lr: 1e-5}\n"))
    assert cfg.train.lr == 3e-4


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("train: {lrr: 1.0}\n", "train.lrr", "unknown key"),
        ("train: {steps: many}\n", "train.steps", "valid integer"),
        ("train: {lr: -1.0}\n", "train.lr", "greater than 0"),
        ("data: {mixing: random}\n", "data.mixing", "'sample', 'batch' or 'adaptive'"),
        ("data: {sources: [{name: a}]}\n", "data.sources.0.shards", "required key is missing"),
        ("model: {tomeformer: {r: [1, 2]}}\n", "model.tomeformer", "num_layers is 12"),
        (
            "model: {tomeformer: {r: abc}}\n",
            "model.tomeformer.r",
            "expected one of int | list[int] | MergeSchedule",
        ),
        ("train: {micro_batch: 7}\n", "train.global_batch", "x 8 per node) = 112, got 1600"),
        ("model: {llm: {arch_config: nope.json}}\n", "model.llm.arch_config", "file not found"),
    ],
)
def test_bad_values_name_file_key_and_expectation(tmp_path, text, key, expected):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(p)), msg
    assert key in msg and expected in msg, msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_config(write(tmp_path, "train:\n  lr: [1,\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("demo", ["train.lr"])
    with pytest.raises(ConfigError, match=r"data.sources.5: expected a list index below 1"):
        load_config("demo", ["data.sources.5.weight=2"])
    with pytest.raises(ConfigError, match=r"with --set train.stepz=3\): train.stepz: unknown key"):
        load_config("demo", ["train.stepz=3"])


def test_inherit_cycle(tmp_path):
    write(tmp_path, "inherit: b.yaml\n", "a.yaml")
    write(tmp_path, "inherit: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True)


def test_cli_config_show_and_validate(tmp_path):
    shown = run_cli("config", "show", "demo", "--set", "train.steps=7")
    assert shown.returncode == 0, shown.stderr
    assert "steps: 7" in shown.stdout
    assert run_cli("config", "validate", "simvlg_vicuna7b", "--no-file-checks").returncode == 0
    missing = run_cli("config", "validate", "simvlg_vicuna7b")  # no EVA-ViT-g weights here
    assert missing.returncode == 1 and "model.vision.checkpoint: not set" in missing.stderr
    bad = run_cli("config", "validate", str(write(tmp_path, "eval: {vqa_prompt: 'no q'}\n")))
    assert bad.returncode == 1
    assert "eval.vqa_prompt" not in bad.stdout and "must contain {q}" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def cli_help(capsys, *args) -> str:
    """`simvlg ARGS --help` in this process (one interpreter start instead of ten: ~2 s, not ~20 s;
    `python -m pipeline` itself runs in the test above)."""
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])
    assert exit_.value.code in (0, None), args
    return capsys.readouterr().out


def test_cli_help_describes_every_subcommand(capsys):
    top = cli_help(capsys)
    for name in ("config", "train", "eval", "bench", "prep", "demo"):
        assert f"    {name}" in top, name
    for sub, flag in (
        (["config", "show"], "--set"),
        (["config", "validate"], "--set"),
        (["train"], "--run-dir"),
        (["eval"], "--checkpoint"),
        (["bench", "flops"], "--vs"),
        (["bench", "kernels"], "--out"),
        (["bench", "data"], "--shards"),
        (["prep"], "--input"),
        (["demo"], "--compare"),
    ):
        out = cli_help(capsys, *sub)
        assert flag in out, (sub, out[-500:])
