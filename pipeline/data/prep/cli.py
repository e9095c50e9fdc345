"""The `simvlg prep` command line: `prep RECIPE`, `prep list`, `prep split`, `prep merge`, `prep manifest`.

Exit status: 0 when every shard is finished, 1 when some are not (re-run the same command), 2 on bad
input or usage. The flags are the fields of lists.Args (what the list readers take) and of
download.DownloadOptions (everything else), with their defaults and help taken from there.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from .counts import build_manifest
from .download import DownloadOptions
from .lists import Args, PrepInputError
from .recipes import RECIPES
from .run import PrepError, convert_input, run_recipe
from .slurm import merge_parts, split_list


def _add_fields(p: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field: --field-name, the field's default and type (`int | None`: int),
    its metadata as argparse keywords (help, choices, ...); a bool is a store_true switch."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kw = dict(f.metadata)
        if not kw.pop("cli", True):
            continue
        flag = kw.pop("flag", "--" + f.name.replace("_", "-"))
        default = f.default_factory() if f.default is MISSING else f.default
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        if kind is bool:
            p.add_argument(flag, dest=f.name, action="store_true", **kw)
        elif "action" in kw:
            p.add_argument(flag, dest=f.name, default=default, **kw)
        else:
            p.add_argument(flag, dest=f.name, default=default, type=kind, **kw)


def _values(args: argparse.Namespace, cls):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simvlg prep",
        description="Turn a dataset's URL list into WebDataset shards + manifest.json (img2dataset). "
        "RECIPE is one of: " + ", ".join(RECIPES) + "; or list | split RECIPE | merge | manifest.",
    )
    p.add_argument("recipe", help="recipe name, or list / split / merge / manifest")
    p.add_argument("split_recipe", nargs="?", help="(split only) the recipe whose list to split")
    p.add_argument("--out", help="output folder (input/, shards/, manifest.json)")
    _add_fields(p, Args)
    _add_fields(p, DownloadOptions)
    p.add_argument("--convert-only", action="store_true", help="validate + write parquet, no download")
    p.add_argument("--parts", type=int, help="(split) number of parts, one per SLURM array task")
    p.add_argument(
        "--link",
        default="hardlink",
        choices=["hardlink", "symlink", "copy"],
        help="(merge) how merged shard names point at the parts' shards",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rargs, opts = _values(args, Args), _values(args, DownloadOptions)
    try:
        if args.recipe == "list":
            for r in RECIPES.values():
                print(f"{r.name:18s} {r.kind:5s}  {r.inputs}")
            return 0
        if not args.out:
            print("simvlg prep: --out DIR is required", file=sys.stderr)
            return 2
        if args.recipe == "merge":
            return 0 if merge_parts(Path(args.out), link=args.link).complete else 1
        if args.recipe == "manifest":
            src = Path(args.out) / "input" / "_SOURCE.json"
            recipe = json.loads(src.read_text()).get("recipe", "urls") if src.is_file() else "urls"
            m = build_manifest(Path(args.out), recipe=recipe, kind=RECIPES.get(recipe, RECIPES["urls"]).kind)
            print(json.dumps({k: getattr(m, k) for k in ("shards", "num_shards", "num_samples", "complete")}))
            return 0 if m.complete else 1
        if args.recipe == "split":
            if args.split_recipe not in RECIPES or not args.parts:
                print("simvlg prep split RECIPE --input ... --parts N --out DIR", file=sys.stderr)
                return 2
            split_list(args.split_recipe, Path(args.out), rargs, args.parts, opts)
            return 0
        if args.recipe not in RECIPES:
            print(
                f"simvlg prep: unknown recipe {args.recipe!r}; known: {', '.join(RECIPES)}", file=sys.stderr
            )
            return 2
        if args.convert_only:
            convert_input(args.recipe, Path(args.out), rargs, opts)
            return 0
        return 0 if run_recipe(args.recipe, Path(args.out), rargs, opts).complete else 1
    except PrepInputError as e:
        print(f"simvlg prep: bad input: {e}", file=sys.stderr)
        return 2
    except PrepError as e:
        print(f"simvlg prep: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
