"""What Triton's JIT compiles for our kernels, and compiling it for a GPU that is not there.

    with record_variants() as seen:       # in any process, also under TRITON_INTERPRET=1
        run_something()                   # seen: {variant key: spec} of every kernel launch
    python -m kernels.jit_check specs.json --arch 80 90    # without TRITON_INTERPRET, no GPU needed

A variant key follows Triton's specialisation rules (constexprs and options by value; ints by
width, == 1 and % 16 == 0 unless do_not_specialize; tensors by dtype and 16-byte alignment): one
compile per key and process. The spec (kernel, argument types, constexpr values) is what
`compile_spec` hands to triton.compile for a GPUTarget: the full pipeline down to PTX and cubin
(ptxas ships with triton), so a kernel that would not compile on sm_80 / sm_90 fails here, on CPU.
`instructions()` lists the PTX instructions that matter: tensor-core mma/wgmma, and whether sqrt
and division are the correctly rounded forms.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import re
import sys

import torch

_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
}


def _kernels():
    from . import tome_triton

    return tome_triton.KERNELS, set(tome_triton._SHRINKING)


def _variant(name: str, bound: dict, consts: dict, options: dict, shrinking: set, specialise_all: bool):
    """(key, spec) of one launch: bound runtime arguments, constexpr values, launch options."""
    key, sig = [name], {}
    for arg, v in bound.items():
        if isinstance(v, torch.Tensor):
            key.append((arg, str(v.dtype), v.data_ptr() % 16 == 0))
            sig[arg] = "*" + _TYPES[v.dtype]
        else:  # runtime ints (we pass no runtime floats or bools)
            width = "i32" if -(2**31) <= v < 2**31 else "i64"
            fixed = arg in shrinking and not specialise_all
            key.append((arg, width) if fixed else (arg, width, v == 1, v % 16 == 0))
            sig[arg] = width
    key += sorted((k, repr(v)) for k, v in {**consts, **options}.items())
    sig.update({k: "constexpr" for k in consts})
    return tuple(key), dict(kernel=name, signature=sig, constexprs=consts, options=options)


@contextlib.contextmanager
def record_variants(specialise_all: bool = False):
    """Collect {variant key: spec} of every kernel launch inside the block: its length is the number
    of compiles a fresh process does. specialise_all: as if nothing were do_not_specialize."""
    kernels, shrinking = _kernels()
    seen: dict = {}
    hooks = []
    for k in kernels:
        sig = inspect.signature(k.fn)
        const_names = {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}

        def hook(*args, _k=k, _sig=sig, _cn=const_names, **kwargs):
            bound = _sig.bind_partial(*args, **{n: v for n, v in kwargs.items() if n in _sig.parameters})
            consts = {n: v for n, v in bound.arguments.items() if n in _cn}
            runtime = {n: v for n, v in bound.arguments.items() if n not in _cn}
            opts = {n: v for n, v in kwargs.items() if n in ("num_warps", "num_stages")}
            key, spec = _variant(_k.__name__, runtime, consts, opts, shrinking, specialise_all)
            seen.setdefault(key, spec)

        k.add_pre_run_hook(hook)
        hooks.append((k, hook))
    try:
        yield seen
    finally:
        for k, hook in hooks:
            k.pre_run_hooks.remove(hook)


def compiled_constexprs(spec: dict) -> dict:
    """The spec's constexprs as a compiled (not interpreted) launch sets them: specs recorded under
    TRITON_INTERPRET=1 carry the interpreter's three switches (fp32 dots, tl.sort replaced)."""
    consts = dict(spec["constexprs"])
    dtype = next(t for a, t in spec["signature"].items() if a in ("m_ptr", "x_ptr", "g_ptr", "val_ptr"))
    for name, compiled in (("DOT16", dtype in ("*bf16", "*fp16")), ("NATIVE_SORT", True), ("PREC", "tf32x3")):
        if name in consts:
            consts[name] = compiled
    return consts


def compile_spec(spec: dict, arch: int):
    """Compile one recorded variant for NVIDIA sm_<arch> (no GPU needed). Returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import tome_triton

    if tome_triton.INTERPRET:
        raise RuntimeError("compile_spec needs the compiled kernels: run without TRITON_INTERPRET=1")
    fn = getattr(tome_triton, spec["kernel"])
    consts = compiled_constexprs(spec)
    options = tome_triton.launch_options(spec["kernel"], **consts)  # the interpreter drops them
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options or None)


def instructions(ptx: str) -> list[str]:
    """The tensor-core, square-root and division instructions of a PTX listing."""
    found = re.findall(r"\b((?:w?g?mma|sqrt|div|rcp)\.[\w.]+)", ptx)
    return sorted(set(found))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.jit_check", description=__doc__.split("\n")[0])
    ap.add_argument("specs", help="JSON list of specs (from record_variants)")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="sm_ versions, e.g. 80 90")
    args = ap.parse_args(argv)
    with open(args.specs) as f:
        specs = json.load(f)
    failed = 0
    for arch in args.arch:
        for spec in specs:
            consts = " ".join(
                f"{k}={v}" for k, v in compiled_constexprs(spec).items() if not k.startswith("BLOCK")
            )
            dtypes = "/".join(
                sorted({t[1:] for t in spec["signature"].values() if t[1:] in ("fp32", "bf16", "fp16")})
            )
            try:
                ck = compile_spec(spec, arch)
                res = dict(
                    ok=True,
                    shared_bytes=ck.metadata.shared,
                    num_warps=ck.metadata.num_warps,
                    instructions=instructions(ck.asm["ptx"]),
                )
            except Exception as e:  # report every variant, then fail
                failed += 1
                res = dict(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
            print(
                json.dumps(dict(arch=arch, kernel=spec["kernel"], dtypes=dtypes, constexprs=consts, **res)),
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())


def tomeformer_pass(backend="triton", device="cpu", dtype=torch.bfloat16, N=257, layers=12, r=19, C=64):
    """The merges of one TomeFormer forward + backward (bf16, CLS protected, size=None first)."""
    from . import merge_tokens

    x = torch.randn(1, N, C, device=device, dtype=dtype, requires_grad=True)
    y, size = x, None
    for _ in range(layers):
        y, size = merge_tokens(y, y[..., :64].detach(), size, r, backend=backend)
    y.float().sum().backward()


def print_variants(device, archs=None, file=None) -> int:
    """`simvlg bench kernels --variants [--compile-for SM ...]`."""
    import os
    import subprocess
    import tempfile

    file = file or sys.stdout
    counts = {}
    for dns in (True, False):
        with record_variants(specialise_all=not dns) as seen:
            tomeformer_pass(device=device)
        counts[dns] = seen
    names = sorted({k[0] for k in counts[True]})
    per = ", ".join(f"{n} {sum(k[0] == n for k in counts[True])}" for n in names)
    print(
        f"TomeFormer pass (257 tokens, 12 layers, r=19, fwd+bwd): {len(counts[True])} kernel variants "
        f"({per}); {len(counts[False])} if the shrinking sizes were specialised",
        file=file,
    )
    if not archs:
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(list(counts[True].values()), f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "kernels.jit_check", f.name, "--arch", *map(str, archs)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(res.stdout, end="", file=file)
    if res.returncode:
        print(res.stderr[-2000:], file=file)
    os.unlink(f.name)
    return res.returncode
