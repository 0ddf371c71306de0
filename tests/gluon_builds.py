"""Compile one of our Gluon kernels for sm_90a with the installed Triton, no GPU needed, and write its
PTX to stdout: `python tests/gluon_builds.py NAME [OPTION=VALUE ...]`, NAME one of BUILDS; with
`all`, every build as JSON ({name: {"ptx": ...} or {"why": ...}}).

Run in a child process by the tests (test_gluon_compile, test_grid_dependency): their session runs
Triton's interpreter (conftest), under which nothing compiles. Exit status 3: this Triton has no
Gluon or refuses the kernel's source (stderr says why); 0: compiled.

Each build passes the arguments, constexprs and compile options its launch passes (the scan's
bulk_ws and per-query loaders, HCA and CSA split programs under both schedules, the rows decoder),
with one-element tensors of the launch's dtypes standing for the pointers. Where it cannot
build, its one line on stderr starts with 'gluon_builds:'.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TARGET = ("cuda", 90, 32)  # sm_90a: Hopper, wgmma and the bulk copy engine


def _t(dtype):
    return torch.zeros(1, dtype=dtype)


def _scan(loader: str, opts: dict):
    from kernels import indexer_scan_hopper as H
    from kernels import indexer_topk as K

    consts = dict(HP=64, SENTINEL_KEY=K.SENTINEL, MODE=K.MODE_FP8, BLOCK_S=int(opts.get("BLOCK_S", 0)),
                  SENTINELS=opts.get("SENTINELS", "1") == "1")
    args = dict(q8_ptr=_t(torch.float8_e4m3fn), w8_ptr=_t(torch.float32), mode_ptr=_t(torch.int32),
                pos_ptr=_t(torch.int32), table_ptr=_t(torch.int32), out_ptr=_t(torch.int64), len_ptr=_t(torch.int32))
    if loader == "bulk_ws":
        head, tail = H._page_descriptors(torch.zeros(8, 64, 68, dtype=torch.uint8))
        args.update(head_desc=head, tail_desc=tail, rows_ptr=_t(torch.uint8), parts_ptr=_t(torch.bfloat16),
                    w_pad_ptr=_t(torch.float32), inv_sqrt_di=0.5)
        consts.update(STAGES=H.STAGES, SCORED_PAGES=H.SCORED_PAGES, DEPENDENT=opts.get("DEPENDENT", "1") == "1",
                      FACTORED=int(opts.get("FACTORED", H.factored_from())),
                      GENERAL=opts.get("GENERAL", "0") == "1")
        return H._scan_kernel_ws, args, consts, H.bulk_launch_options()
    args.update(rows_ptr=_t(torch.uint8))
    consts.update(row_stride=68)
    return H._scan_kernel, args, consts, dict(num_warps=H.WARPS)


def _split(schedule: str, selected: bool):
    from kernels import geometry
    from kernels import split_attention_hopper as A

    args = dict(q_ptr=_t(torch.bfloat16), sink_ptr=_t(torch.float32), pos_ptr=_t(torch.int32), sm_scale=0.5,
                swa_ptr=_t(torch.uint8), swa_tab_ptr=_t(torch.int32), ent_ptr=_t(torch.uint8),
                blk_tab_ptr=_t(torch.int32), topk_ptr=_t(torch.int32), out_ptr=_t(torch.bfloat16),
                part_o_ptr=_t(torch.bfloat16), part_ml_ptr=_t(torch.float32))
    if selected:  # CSA: the window and the top-k picks, one split size
        split = dict(RATIO=1, SPLIT=A.SPARSE_KEYS_PER_SPLIT, SHORT_KEYS=0, SHORT_SPLIT=A.SPARSE_KEYS_PER_SPLIT,
                     PER_PAGE=64)
    else:  # HCA: the window and every visible entry, two entries a page
        split = dict(RATIO=128, SPLIT=A.KEYS_PER_SPLIT, SHORT_KEYS=A.SHORT_QUERY_KEYS,
                     SHORT_SPLIT=A.SHORT_QUERY_SPLIT, PER_PAGE=2)
    consts = dict(split, W=128, ROW_STRIDE=584, SWA_PAGE=geometry.SWA_PAGE,
                  SCHEDULE_ID=A.SCHEDULES.index(schedule), SELECTED=selected)
    return A._split_kernel, args, consts, A.launch_options(schedule)


def _rows(_opts):
    from kernels import split_attention_hopper as A

    return (A._decode_rows_kernel, dict(rows_ptr=_t(torch.uint8), out_ptr=_t(torch.bfloat16)), dict(ROW_STRIDE=584),
            dict(num_warps=A.WARPS))


BUILDS = {
    "scan_bulk_ws": lambda o: _scan("bulk_ws", o),
    # the bulk_ws launch without the general scan's queries (GENERAL_HERE off) and with them (on)
    "scan_bulk_ws_general": lambda o: _scan("bulk_ws", {**o, "GENERAL": "1"}),
    "scan_registers": lambda o: _scan("registers", o),
    "hca_lockstep": lambda o: _split("lockstep", False),
    "hca_warp_specialized": lambda o: _split("warp_specialized", False),
    "csa_lockstep": lambda o: _split("lockstep", True),
    "csa_warp_specialized": lambda o: _split("warp_specialized", True),
    "decode_rows": _rows,
}


class Refused(Exception):
    """This Triton cannot build the kernel: it has no Gluon, or refuses the kernel's source."""


def build(name: str, opts: dict):
    """The compiled kernel (triton.compile's); Refused where this Triton cannot build it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import mangle_type

    try:
        from triton.experimental.gluon._runtime import GluonASTSource

        fn, args, consts, options = BUILDS[name](opts)
    except (ImportError, AttributeError) as e:  # no Gluon, or not these of its names
        raise Refused(f"{type(e).__name__} {e}") from e
    ints = {n: 7 for n in fn.arg_names if n not in args and n not in consts}  # strides, counts: i32
    sig = {n: "constexpr" if n in consts else mangle_type({**args, **ints}[n]) for n in fn.arg_names}
    try:
        return triton.compile(GluonASTSource(fn, sig, consts), target=GPUTarget(*TARGET), options=options)
    except Exception as e:  # Triton's compile errors chain the cause (the source line it refused)
        raise Refused(f"{type(e).__name__} {repr(e.__cause__ or e)[-1500:]}") from e


def compile_in_child(*argv: str):
    """`python ARGV` from the repository's root in a child process, without TRITON_INTERPRET (which
    the tests' conftest sets, and under which kernels do not compile): its CompletedProcess."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *argv], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)


def build_ptx(name: str, *opts: str):
    """This script for NAME OPTS in a child process (compile_in_child): its stdout is the PTX."""
    return compile_in_child(__file__, name, *opts)


def build_all_ptx() -> dict:
    """Every build with its launch's options, in one child process (one import of torch and
    Triton, not one each): {name: {"ptx": PTX} or, where this Triton refused it, {"why": ...}}."""
    import json

    run = compile_in_child(__file__, "all")
    if run.returncode != 0:
        raise RuntimeError(f"gluon_builds.py all failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout)


def why_not(run) -> str:
    """The line this script wrote for a refused build (Triton's bindings may print more after it)."""
    return next((ln for ln in run.stderr.splitlines() if ln.startswith("gluon_builds:")), run.stderr[-300:])[-300:]


def _main(argv: list[str]) -> int:
    if argv[0] == "all":
        import json

        out = {}
        for name in BUILDS:
            try:
                out[name] = {"ptx": build(name, {}).asm["ptx"]}
            except Refused as e:
                out[name] = {"why": str(e)}
        sys.stdout.write(json.dumps(out))
        return 0
    try:
        sys.stdout.write(build(argv[0], dict(a.split("=", 1) for a in argv[1:])).asm["ptx"])
    except Refused as e:
        print("gluon_builds:", str(e).replace("\\n", " "), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
