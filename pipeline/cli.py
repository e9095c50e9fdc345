"""`simvlg`: the command line. Each subcommand parses its flags, loads the config, and calls into
the module that does the work; nothing here knows how that work is done."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, dump_yaml, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config file, or the name of a packaged one (e.g. demo)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set train.lr=2e-4 "
        "--set data.sources.0.weight=3 (repeatable)",
    )


def cmd_config_show(args) -> int:
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_config_validate(args) -> int:
    from pipeline.preflight import check_for_training, describe

    cfg = load_config(args.config, args.overrides)
    report = check_for_training(cfg, args.config, files=not args.no_file_checks)
    print(f"{args.config}: ok" + (" (files not checked)" if args.no_file_checks else ""))
    for line in describe(report):
        print(line)
    return 0


def cmd_train(args) -> int:
    from pipeline.train.launch import main

    return main(args)


def cmd_eval(args) -> int:
    from pipeline.eval.run import run

    return run(args)


# Commands whose module owns its flags: `simvlg bench flops --help` shows that module's help.
PASS_THROUGH = {
    ("bench", "kernels"): ("kernels.bench", "token-merging kernels: Triton vs eager (vs torch.compile)"),
    ("bench", "flops"): (
        "pipeline.models.flops",
        "FLOPs, parameters and memory per sample on the meta device (--vs blip2)",
    ),
    ("bench", "data"): ("pipeline.data.bench", "data loader throughput: decode+augment, workers, waits"),
    ("bench", "step"): (
        "pipeline.train.bench_step",
        "real training steps of a config: where a step's time goes, samples/s, memory, MFU",
    ),
    ("prep",): ("pipeline.data.prep", "download a dataset recipe into WebDataset shards (img2dataset)"),
    ("demo",): (
        "pipeline.demo.run",
        "the whole pipeline in miniature on CPU: corpus, shards, "
        "backbones, 2-rank DeepSpeed training, eval, report",
    ),
}


def cmd_pass_through(args) -> int:
    import importlib

    return importlib.import_module(args.module).main(args.rest) or 0


def _add_pass_through(sub, name: str, module: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=f"arguments of {module} (try --help)")
    p.set_defaults(func=cmd_pass_through, module=module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simvlg",
        description="SimVLG pretraining: frozen ViT -> TomeFormer (token-merging connector) -> "
        "frozen LLM, trained in one stage with one language-modelling loss.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = sub.add_parser(
        "config",
        help="show or validate a config",
        description="Inspect the one config schema that drives every stage.",
    )
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser(
        "show",
        help="print the resolved config (defaults, inherit, --set)",
        description="Print the fully resolved config as YAML.",
    )
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)
    check = config_sub.add_parser(
        "validate",
        help="check a config; exit 0 if usable, 1 if not",
        description="Check everything `simvlg train` would refuse: the schema, the files and folders "
        "the config names (shards, weights), and that r leaves the promised tokens; "
        "errors name the file and key in one line.",
    )
    _add_config_args(check)
    check.add_argument(
        "--no-file-checks",
        action="store_true",
        help="skip checks of files and folders (a config written for another machine)",
    )
    check.set_defaults(func=cmd_config_validate)
    train = sub.add_parser(
        "train",
        help="train the connector with DeepSpeed ZeRO-2 (resumes from the run dir)",
        description="Train SimVLG (one stage, one LM loss) with DeepSpeed ZeRO-2 against the frozen "
        "ViT and LLM. Started bare it launches launch.gpus_per_node ranks on this node "
        "through the `deepspeed` launcher; under a launcher it is one rank. Resumes "
        "automatically from the latest complete checkpoint in the run dir; SIGUSR1/SIGTERM "
        "checkpoint at the next step and exit 0 (and requeue under SLURM).",
    )
    from pipeline.train.launch import add_arguments as add_train_arguments

    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "eval",
        help="zero-shot captioning / VQA / video captioning with the standard metrics",
        description="Evaluate a trained connector: COCO/NoCaps/Flickr captioning (CIDEr, BLEU-4, "
        "METEOR, ROUGE-L), VQAv2/OK-VQA/GQA accuracy, MSR-VTT/MSVD captioning. Writes "
        "predictions, metrics, a gallery and merged-token figures to the run dir and MLflow.",
    )
    from pipeline.eval.run import add_arguments as add_eval_arguments

    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    bench = sub.add_parser(
        "bench",
        help="benchmarks: kernels, flops, data, step",
        description="Benchmarks that print figures (ratios measured side by side).",
    )
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    for key, (module, help_text) in PASS_THROUGH.items():
        if key[0] == "bench":
            _add_pass_through(bench_sub, key[1], module, help_text)
    _add_pass_through(sub, "prep", *PASS_THROUGH[("prep",)])
    _add_pass_through(sub, "demo", *PASS_THROUGH[("demo",)])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    for key in PASS_THROUGH:  # argparse's REMAINDER drops a leading --flag
        if tuple(argv[: len(key)]) == key:
            argv = [*key, "--", *argv[len(key) :]]
            break
    args = build_parser().parse_args(argv)
    if getattr(args, "rest", None) and args.rest[0] == "--":
        args.rest = args.rest[1:]
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"simvlg: config error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
