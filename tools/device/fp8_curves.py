"""Two training runs' curves side by side (FP8 vs BF16, issue 19), from their TensorBoard logs:
the positive quantities separately (text cross-entropy `train/text_loss`, image bits/dim
`train/bits_per_dim`; the summed loss crosses zero, so a relative gap of it means nothing), as
means over 50-step windows with the relative difference, and each run's median step time and
tokens/s (perf/*).

    python3 tools/device/fp8_curves.py /tmp/curve_bf16/tb /tmp/curve_fp8/tb [--window 50]

The first run is the reference. Needs the `tensorboard` package (on the lent GPU image).
"""
from __future__ import annotations

import argparse
import statistics
import sys

METRICS = ("text_loss", "bits_per_dim", "loss")


def scalars(tb_dir: str) -> dict:
    """{tag: {step: value}} of a TensorBoard log directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def window_means(ref: dict, other: dict, window: int) -> list:
    """[(first step, last step, ref mean, other mean)] over the steps both logged."""
    steps = sorted(set(ref) & set(other))
    out = []
    for a in range(0, (steps[-1] if steps else 0), window):
        w = [s for s in steps if a < s <= a + window]
        if w:
            out.append((a + 1, a + window, statistics.fmean(ref[s] for s in w), statistics.fmean(other[s] for s in w)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", help="the reference run's TensorBoard directory (BF16)")
    ap.add_argument("other", help="the compared run's (FP8)")
    ap.add_argument("--window", type=int, default=50)
    args = ap.parse_args(argv)
    runs = {}
    for name, d in (("ref", args.ref), ("other", args.other)):
        try:
            runs[name] = scalars(d)
        except Exception as e:  # a run that died early: say so, still report the other
            print(f"{d}: no curve ({type(e).__name__}: {e})")
    for name, sc in runs.items():
        st, tok = sc.get("perf/step_s", {}), sc.get("perf/tokens_per_s", {})
        late = [v for s, v in st.items() if s > 20]  # past compilation and warm-up
        print(f"{name}: last step {max(sc.get('train/loss', {0: 0}))}, median step s (after step 20) "
              f"{statistics.median(late) if late else float('nan'):.4f}, median real tokens/s "
              f"{statistics.median([v for s, v in tok.items() if s > 20] or [float('nan')]):,.0f}")
    if len(runs) < 2:
        return 1
    for m in METRICS:
        ref, other = runs["ref"].get(f"train/{m}", {}), runs["other"].get(f"train/{m}", {})
        print(f"\n{m}: steps, ref (BF16) mean, other (FP8) mean, other - ref, relative")
        for a, b, mr, mo in window_means(ref, other, args.window):
            relative = f"{(mo - mr) / abs(mr):+8.2%}" if m != "loss" else ""
            print(f"  {a:4d}-{b:4d}  {mr:9.4f}  {mo:9.4f}  {mo - mr:+9.4f}  {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
