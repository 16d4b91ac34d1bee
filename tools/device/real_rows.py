"""One line per row of tools/profile_step.py JSON results (real-data or synthetic, variants included):
step time and MFU synced / back to back, slot fill, images, counted TFLOP, memory, GPU and host ms,
the anchor's MFU where the row ran --baseline, and the first losses (to compare kernels on the same
batches).

    python3 tools/device/real_rows.py OUT before after anchor [--fill-fix before]

reads OUT/NAME.json for each NAME. `--fill-fix NAME`: that row's MFU divided by its slot fill (code before
b91a671's successor scaled real-token FLOPs by the fill a second time; docs/benchmarks.md, round 6).
"""
from __future__ import annotations

import argparse
import json
import pathlib


def rows_of(out: pathlib.Path, names: list) -> list:
    rows = []
    for name in names:
        p = out / f"{name}.json"
        if not p.exists():
            print(f"{name}: no result (cut by its limit?)")
            continue
        r = json.loads(p.read_text())
        rows += [(f"{name}:{v['variant']}", v) for v in r["variants"]] if "variants" in r else [(name, r)]
    return rows


def line(name: str, r: dict, fix_fill: bool) -> str:
    if "error" in r:
        return f"{name}: {r['error']}"
    fill = r["tokens_per_s"] * r["step_time_s"] / (r["rows"] * r["seq_len"])
    fix = 1 / fill if fix_fill else 1.0
    b, clk = r.get("baseline", {}), (r.get("clocks") or {}).get("synced") or {}
    return (f"{name}: step {1e3 * r['step_time_s']:.1f} ms, MFU {100 * r['mfu'] * fix:.1f}% synced; back to back "
            f"{1e3 * r['loop_step_time_s']:.1f} ms, {100 * r['loop_mfu'] * fix:.1f}%; fill {fill:.3f}; "
            f"{r['images_per_step']} images/step; {r['model_tflop_per_step'] * fix:.2f} TFLOP/step; peak "
            f"{r['peak_memory_gib']:.1f} GiB (reserved {r.get('peak_reserved_gib') or 0:.1f}); GPU ms synced "
            f"{r.get('gpu_step_ms')} b2b {r.get('loop_gpu_step_ms')}; host ms b2b {r.get('loop_host_ms'):.1f}; "
            f"SM {clk.get('sm_mhz')} MHz {clk.get('power_w')} W; warm-up {r.get('warmup_s', 0):.0f} s; losses "
            + " ".join(f"{x:.4f}" for x in r.get("losses", [])[:4])
            + (f"; synced rest {r['synced_rest_ms']:.1f} ms" if r.get("synced_rest_ms") is not None else "")
            + (f"; b2b GPU idle between steps {r['loop_gpu_gap_ms']:.2f} ms, host prep {r['loop_prep_ms']:.1f} ms, "
               f"loop ms outside the steps {r['loop_lead_ms']:.1f}" if r.get("loop_gpu_gap_ms") is not None else "")
            + (f"; anchor {100 * b['mfu']:.1f}% / b2b {100 * b['loop_mfu']:.1f}%" if b.get("mfu") else ""))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("names", nargs="+")
    ap.add_argument("--fill-fix", action="append", default=[], metavar="NAME")
    args = ap.parse_args(argv)
    for name, r in rows_of(pathlib.Path(args.out), args.names):
        print(line(name, r, name.split(":")[0] in args.fill_fix))
    for name in args.names:  # an anchor run beside variants (--baseline with --variant): its own line
        p = pathlib.Path(args.out) / f"{name}.json"
        b = json.loads(p.read_text()).get("baseline", {}) if p.exists() else {}
        if b.get("mfu"):
            print(f"{name}:anchor: {b['name']}, {1e3 * b['step_time_s']:.1f} ms, MFU {100 * b['mfu']:.1f}% synced; back "
                  f"to back {1e3 * b['loop_step_time_s']:.1f} ms, {100 * b['loop_mfu']:.1f}%; peak "
                  f"{b.get('peak_memory_gib') or 0:.1f} GiB")


if __name__ == "__main__":
    main()
