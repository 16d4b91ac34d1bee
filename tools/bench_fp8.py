"""FP8 vs BF16, one GPU: the same model, weights and batches trained with our local layers in bf16,
Transformer Engine layers in bf16, TE layers with FP8 GEMMs (delayed and current scaling), and our
layers with torch's own FP8 linears (megaflow/fp8.py: variant `torch:current[:MIN_DIM]`, FP8 on the
block linears of both dimensions >= MIN_DIM, compiled with the blocks; `@a.b=v;c.d=w` adds config
overrides to one variant; `inductor.a.b=v` there patches torch._inductor.config.a.b for that
variant only, e.g. `@inductor.triton.prefer_nd_tiling=true`). For each: median step time, tokens/s,
the same steps back to back, MFU (bf16 peak, as everywhere in this repo) and peak memory
(tools/profile_step.py's measurement); and the losses of every step side by side, so the speed-up
comes with its numerical cost: step 1 is the same weights on the same batch, later steps show
whether training drifts. `--trace DIR` adds one profiled step per variant (GPU time
by kernel category, the top kernels: where FP8's own work goes).

    python tools/bench_fp8.py --config configs/h200_1b.yaml --steps 10 --json fp8.json   # H100/H200
    python tools/bench_fp8.py --config configs/h200_3b.yaml --variants local:off,torch:current,torch:current:2048
    python tools/bench_fp8.py --config configs/h200_3b.yaml --set data.batch_size=16 --trace /tmp/t \
        --variants local:off,torch:current:2048@parallel.fp8_fast_accum=false,torch:current:4096

Needs CUDA; the `te:` variants need Transformer Engine (shared/gpu/README.md says how it reaches
the lent H200).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
import torch._inductor.config
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.profile_step import profile, render  # noqa: E402

VARIANTS = (("local", "off"), ("te", "off"), ("te", "delayed"), ("te", "current"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/h200_1b.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (their losses are kept)")
    ap.add_argument("--variants", default=",".join(f"{b}:{f}" for b, f in VARIANTS),
                    help="backend:fp8[:fp8_min_dim][@a.b=v;c.d=w] variants, comma-separated; backend local, te, or "
                         "torch (our layers + torch's FP8 linears); after @, config overrides of that variant only "
                         "(e.g. torch:current:2048@parallel.fp8_fast_accum=false)")
    ap.add_argument("--trace", default="", metavar="DIR", help="also profile one step of every variant after its timed "
                    "steps (torch.profiler): DIR/<n>/ (n: the variant's index), GPU time by kernel category and "
                    "the top kernels printed with the variant")
    ap.add_argument("--trace-variants", default="", metavar="I,J", help="with --trace: only these variants (indices "
                    "from 0; default all)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8: needs a CUDA GPU with FP8 (H100/H200)", file=sys.stderr)
        return 2
    if any(v.startswith("te:") for v in args.variants.split(",")):
        from parallel.backend import import_te
        import_te()  # before any CUDA work: a cuDNN that torch loads first can break TE's own (seen on the H200)
    rows, traced = [], {int(i) for i in args.trace_variants.split(",") if i}
    for i, name in enumerate(args.variants.split(",")):
        spec, _, extra = name.partition("@")
        backend, fp8, *min_dim = spec.split(":")
        layers = [f"parallel.backend={backend}", f"parallel.fp8={fp8}"] if backend != "torch" else \
            ["parallel.backend=local", f"parallel.fp8={fp8}", "parallel.fp8_backend=torch"]
        extra = [kv for kv in extra.split(";") if kv]
        inductor = {k.removeprefix("inductor."): yaml.safe_load(v)
                    for k, _, v in (kv.partition("=") for kv in extra if kv.startswith("inductor."))}
        layers += [f"parallel.fp8_min_dim={d}" for d in min_dim] + [kv for kv in extra if not kv.startswith("inductor.")]
        pargs = argparse.Namespace(config=args.config, device="cuda", warmup=args.warmup, steps=args.steps,
                                   images_per_row=-1, real_data=False, peak_tflops=0.0, trace_steps=1,
                                   trace=f"{args.trace}/{i}" if args.trace and (not traced or i in traced) else "",
                                   variant=[], parts="", baseline=False, doc_mask=False,
                                   overrides=[*args.overrides, *layers, "train.dtype=bf16"])
        print(f"== variant {i}: {name}", flush=True)  # a cut run still says which rows it finished
        try:
            with torch._inductor.config.patch(inductor):
                r = profile(pargs)
        except Exception:  # one variant failing (e.g. a TE build without FP8 support) still reports the rest
            import traceback
            print(f"bench_fp8: {name} failed:\n{traceback.format_exc()}", flush=True)
            continue
        r["variant"] = name
        print(render(r), flush=True)
        rows.append(r)
        gc.collect()
        torch.cuda.empty_cache()
    if not rows:
        return 1
    base = rows[0]
    w = max(len(r["variant"]) for r in rows)
    print(f"\n{'variant':{w}s} {'step ms':>9s} {'tokens/s':>9s} {'speed-up':>9s} {'b2b ms':>8s} {'b2b x':>6s} {'MFU %':>7s} "
          f"{'mem GiB':>8s} {'loss@1 rel.diff':>16s} {'last loss':>10s}")
    for r in rows:
        d1 = abs(r["losses"][0] - base["losses"][0]) / abs(base["losses"][0])
        print(f"{r['variant']:{w}s} {r['step_time_s'] * 1e3:9.1f} {r['tokens_per_s']:9,.0f} {base['step_time_s'] / r['step_time_s']:9.2f} "
              f"{r['loop_step_time_s'] * 1e3:8.1f} {base['loop_step_time_s'] / r['loop_step_time_s']:6.2f} {100 * (r['mfu'] or 0):7.1f} {r['peak_memory_gib']:8.2f} {d1:16.2e} {r['losses'][-1]:10.4f}")
    print("losses per step:")
    for r in rows:
        print(f"  {r['variant']}: " + " ".join(f"{x:.4f}" for x in r["losses"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
