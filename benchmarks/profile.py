"""Where a train step's time goes: a ``jax.profiler`` trace of the real jitted step, its XLA ops
timed one by one and grouped by what they compute.

    python -m benchmarks.profile --configs=tms:5-2,resid_mlp:1,tms:40-10
    python -m benchmarks.profile --configs=tms:5-2 --steps=20 --top=15

For each config (built with ``loop.setup`` as the CLI does) the step is compiled, warmed up and
traced for ``--steps`` steps (a Perfetto trace). Every op event of the compiled program is summed
by name, and each op is put in a group from its HLO: ``matmul`` (a dot or convolution inside),
``transcendental`` (erf, exp, log, tanh, power, ... and no dot), ``elementwise / reduce`` (other
fusions), ``data movement`` (copy, transpose, slice, concatenate, ...), ``random numbers`` (a
loop over uint32 state: threefry's rounds, drawing masks and batches), ``control flow`` (other
loops' own events; their bodies' ops are timed one by one). The table
(``results/profile_<config>.md``) lists each group's share of the traced op time and the
``--top`` ops with their group and what they produce, so "where does the time go" has a number.
Op times are summed over XLA's threads (and include the tracer's overhead), so their total
exceeds the wall-clock step time of ``benchmarks.run``; the shares are what to read.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import tempfile

from benchmarks.run import ROOT
import spdjax

TRANSCENDENTAL = ("erf", "exponential", "log", "tanh", "power", "sqrt", "rsqrt", "logistic",
                  "sine", "cosine", "exponential-minus-one", "log-plus-one")
MOVEMENT = ("copy", "transpose", "slice", "concatenate", "broadcast", "reshape", "pad",
            "dynamic-slice", "dynamic-update-slice", "gather", "scatter", "bitcast")


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_PLUMBING = {"parameter", "constant", "tuple", "get-tuple-element"}
CONTROL = {"while", "conditional", "call"}


def _instructions(hlo: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """HLO computation name -> its instructions ``(name, result shape, opcode, rest of line)``."""
    comps: dict[str, list] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            m = _INSTR.match(line)
            if m:
                current.append(m.groups())
    return comps


def op_groups(hlo: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (group, its result shape) for every instruction of the program. An
    op's group comes from its own opcode and backend config and from the opcodes of the
    computations it calls (never from its operands or metadata)."""
    comps = _instructions(hlo)

    def opcodes(name: str, seen: frozenset = frozenset()) -> set[str]:
        out = set()
        for _, _, op, rest in comps.get(name, []):
            out.add(op)
            for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest):
                if called not in seen:
                    out |= opcodes(called, seen | {name})
        return out

    def group_of(op: str, shape: str, rest: str) -> str:
        if op == "while" and "u32[" in shape and "f32[" not in shape:
            return "random numbers"  # threefry's rounds: a loop over uint32 state
        if op in CONTROL:
            return "control flow"
        inner = {op}
        for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest):
            inner |= opcodes(called)
        if inner & {"dot", "convolution"} or "__ynn_fusion" in rest or "matmul" in rest:
            return "matmul"
        if inner & set(TRANSCENDENTAL):
            return "transcendental"
        if inner - {"fusion"} <= set(MOVEMENT) | _PLUMBING:
            return "data movement"
        return "elementwise / reduce"

    return {name: (group_of(op, shape, rest), shape)
            for body in comps.values() for name, shape, op, rest in body}


def profile(name: str, steps: int) -> dict:
    import jax

    from spdjax.config import files as configs

    config = configs.load(name, {"figures": False})
    run = spdjax.setup(config)
    step, state, tp = run.step_fn, run.state, run.target_params
    key = jax.random.key(1)
    groups = op_groups(step.lower(state, tp, key).compile().as_text())
    for _ in range(5):
        state, metrics = step(state, tp, key)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                state, metrics = step(state, tp, key)
            jax.block_until_ready(metrics)
        path = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]
        events = json.loads(gzip.open(path).read())["traceEvents"]
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in groups:
            per_op[e["name"]] += e.get("dur", 0) / 1e3 / steps  # ms per step
    per_group = collections.Counter()
    for op, ms in per_op.items():
        per_group[groups[op][0]] += ms
    return {"config": name, "steps": steps, "op_ms_per_step": sum(per_op.values()),
            "groups": dict(per_group.most_common()),
            "ops": [(op, groups[op][0], groups[op][1], ms) for op, ms in per_op.most_common()]}


def to_markdown(p: dict, top: int) -> str:
    total = p["op_ms_per_step"]
    lines = [f"## {p['config']}: {total:.1f} ms of XLA ops per step (traced over {p['steps']} "
             "steps)", "", "| group | ms/step | share |", "|---|---|---|"]
    lines += [f"| {g} | {ms:.2f} | {100 * ms / total:.0f}% |" for g, ms in p["groups"].items()]
    lines += ["", f"| top-{top} op | group | result | ms/step |", "|---|---|---|---|"]
    lines += [f"| {op} | {g} | `{shape if len(shape) < 48 else shape[:45] + '...'}` | {ms:.2f} |"
              for op, g, shape, ms in p["ops"][:top]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tms:5-2,resid_mlp:1,tms:40-10")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    for name in args.configs.split(","):
        p = profile(name, args.steps)
        md = to_markdown(p, args.top)
        stem = pathlib.Path(args.out) / f"profile_{name.replace(':', '_')}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(p, indent=1))
        stem.with_suffix(".md").write_text(md)
        print(md, flush=True)


if __name__ == "__main__":
    main()
