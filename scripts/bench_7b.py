"""The 7B models at their released size on the CPU (BENCHMARKS.md "CPU: the 7B models at their released size").

    python scripts/bench_7b.py oft       # OpenVLA-OFT-7B: 2 cameras, 512 visual tokens; 50% and 70% reuse
    python scripts/bench_7b.py openvla   # OpenVLA-7B: prefill and whole step at 50% reuse; where the decode goes

Each builds a random-weight checkpoint of the released shape and layout in bfloat16 once (runs/<family>_7b_random,
15 GB; a build that was cut off is redone, a finished one reused), loads it and records the load time and peak
memory, then runs `vlacache bench` on it (configs/bench/cpu_<family>_7b.yaml: no cache and each reuse share
interleaved) and times the decoder alone over the full and the reduced sequence (the hook-free ideal).

The weights stay in bfloat16 and run in float32, one matrix at a time (vlacache/eval/held_weights.py): float32
weights (30 GB) do not fit this 24 GiB machine, and its CPU multiplies bfloat16 far slower than float32. The copies
cost the same in every row; they are timed and reported apart, with the ratios both with and without them.
Needs about 17 GB free memory (stop other jobs) and 30-40 minutes per family on 2 cores. Writes
results/bench/cpu_<family>_7b.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch

from vlacache.cli import print_bench_report
from vlacache.eval.bench import run_bench
from vlacache.eval.held_weights import HeldWeights
from vlacache.experiment import BenchConfig, build_env, load_config
from vlacache.threads import torch_threads

FAMILIES = ("oft", "openvla")


def family(name: str):
    """A family's backbone class and its `build_preset`."""
    if name == "oft":
        from vlacache.backbones.openvla_oft import OpenVLAOFTBackbone, build_preset

        return OpenVLAOFTBackbone, build_preset
    from vlacache.backbones.openvla import OpenVLABackbone, build_preset

    return OpenVLABackbone, build_preset


def build_checkpoint(name: str, path: Path, preset: str) -> float | None:
    """The random-weight 7B checkpoint in bfloat16, written to a side folder and renamed when complete."""
    if (path / "config.json").exists():
        return None
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    build_preset = family(name)[1]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise the 30 GB float32 model
    try:
        backbone = build_preset(preset, dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype(default)
    backbone.save_pretrained(partial, max_shard_bytes=2**31)  # 2 GiB shards: less memory while writing
    del backbone
    partial.rename(path)
    return time.perf_counter() - start


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load(name: str, path: Path, device: str):
    """On the CPU: the checkpoint held in bfloat16 and run in float32 (the heads and the projector wholly in
    float32). On a GPU: in bfloat16, as released (nothing held, no copies)."""
    start = time.perf_counter()
    backbone = family(name)[0].from_pretrained(path, dtype=torch.bfloat16, device=device)
    model = backbone.model
    if backbone.device.type != "cpu":
        return backbone, HeldWeights(), HeldWeights(), time.perf_counter() - start
    vision = HeldWeights(model.vision_backbone, model.projector)
    decoder = HeldWeights(model.language_model)
    for part in ("action_head", "proprio_projector"):
        if getattr(backbone, part, None) is not None:
            setattr(backbone, part, getattr(backbone, part).float())
    if backbone.dtype != torch.float32:
        raise RuntimeError(f"the backbone computes in {backbone.dtype}, not float32: a parameter was left in bfloat16")
    return backbone, vision, decoder, time.perf_counter() - start


@torch.no_grad()
def hook_free_ideal(backbone, decoder: HeldWeights, length: int, reused: dict[str, int]) -> dict:
    """The decoder alone (no engine, no hooks) over the full sequence and over the rows each row leaves to compute,
    interleaved; seconds per pass with the weight copies, and the copies' seconds."""
    width = backbone.decoder.config.hidden_size
    lengths = {"full": length} | {label: length - n for label, n in reused.items()}
    out = {}
    for label, n in lengths.items():
        embeds = torch.randn(1, n, width, device=backbone.device, dtype=backbone.dtype)
        before = decoder.seconds
        start = time.perf_counter()
        backbone.decoder(inputs_embeds=embeds, use_cache=False)
        if embeds.is_cuda:
            torch.cuda.synchronize()
        out[label] = {"rows": n, "seconds": time.perf_counter() - start, "copy_seconds": decoder.seconds - before}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: runs/<family>_7b_random")
    parser.add_argument("--device", default="cpu", help="cuda: bfloat16 on the GPU, as released (config's "
                        "backbone.device is then ignored)")
    parser.add_argument("--preset", default="7b", help="the size to build (a smaller preset tries the script out)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/bench/cpu_<family>_7b.json")
    parser.add_argument("overrides", nargs="*", help="bench config overrides, key=value")
    args = parser.parse_intermixed_args()
    path = args.checkpoint or Path(f"runs/{args.family}_7b_random")
    out = args.out or Path(f"results/bench/cpu_{args.family}_7b.json")
    config = load_config(BenchConfig, f"cpu_{args.family}_7b", "bench", args.overrides)
    with torch_threads(config.threads):
        build_seconds = build_checkpoint(args.family, path, args.preset)
        if build_seconds is not None:
            print(f"built {path} in {build_seconds:.0f} s", flush=True)
        backbone, vision, decoder, load_seconds = load(args.family, path, args.device)
        loaded_peak = peak_gib()
        params = sum(p.numel() for p in backbone.model.parameters()) / 1e9
        print(f"loaded {path}: {params:.2f} B parameters in {load_seconds:.1f} s, peak {loaded_peak:.1f} GiB", flush=True)
        report = run_bench(config, progress=True, backbone=backbone)
        queries = (config.warmup + config.repeats) * (1 + len(report["rows"])) * sum(report["steps_per_episode"])
        passes = 1 + backbone.decode_passes()  # decoder passes per query
        copies = {"vision_seconds_per_query": vision.seconds / queries,
                  "decoder_seconds_per_pass": decoder.seconds / (queries * passes),
                  "decoder_passes_per_query": passes}
        per_query = copies["vision_seconds_per_query"] + passes * copies["decoder_seconds_per_pass"]
        env = build_env(config.env)
        try:
            length = backbone.prepare(env.reset(env.episodes()[0])).layout.length
        finally:
            env.close()
        reused = {row["label"]: round(statistics.mean(statistics.mean(step["reused_per_layer"]) for step in row["steps"]
                                                      if step["reuse_ratio"] > 0)) for row in report["rows"]}
        ideal = hook_free_ideal(backbone, decoder, length, reused)
    summary = {}
    for row in report["rows"]:
        s, label = row["summary"], row["label"]
        base, cached = s["total_ms_baseline"] / 1e3, s["total_ms_cached"] / 1e3
        saved = ideal["full"]["seconds"] - ideal[label]["seconds"]
        saved_compute = saved - (ideal["full"]["copy_seconds"] - ideal[label]["copy_seconds"])
        summary[label] = {
            "whole_query_s": [base, cached], "whole_query_speedup": base / cached,
            "prefill_speedup": s["prefill_speedup"],
            "without_copies_speedup": (base - per_query) / (cached - per_query),
            "ideal_speedup": base / (base - saved),
            "ideal_without_copies_speedup": (base - per_query) / (base - per_query - saved_compute),
        }
        summary[label]["share_of_ideal"] = summary[label]["whole_query_speedup"] / summary[label]["ideal_speedup"]
    decode = None
    if passes > 1:  # where a decode pass's time goes: the weight copies, and streaming the float32 weights once
        first = report["rows"][0]["summary"]
        per_pass = first["decode_ms_baseline"] / 1e3 / (passes - 1)
        streamed = 4 * sum(p.numel() for p in backbone.model.language_model.parameters()) / 1e9
        compute = per_pass - copies["decoder_seconds_per_pass"]
        decode = {"seconds_per_pass": per_pass, "copy_seconds_per_pass": copies["decoder_seconds_per_pass"],
                  "compute_seconds_per_pass": compute, "float32_weights_gb": streamed,
                  "compute_gb_per_second": streamed / compute}
    result = {"family": args.family, "checkpoint": str(path), "parameters_billion": params,
              "build_seconds": build_seconds, "load_seconds": load_seconds, "peak_gib_after_load": loaded_peak,
              "peak_gib": peak_gib(), "sequence_length": length, "device": str(backbone.device),
              "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if backbone.device.type == "cuda" else None,
              "weight_copies": copies, "weight_copies_seconds_per_query": per_query, "hook_free_ideal": ideal,
              "decode": decode, "summary": summary, "bench": report}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_bench_report(report)
    print(f"weight copies: {per_query:.1f} s per query (the same in every row); peak {result['peak_gib']:.1f} GiB")
    for label, s in summary.items():
        print(f"{label}: whole query {s['whole_query_speedup']:.2f}x (without the copies {s['without_copies_speedup']:.2f}x)"
              f", hook-free ideal {s['ideal_speedup']:.2f}x ({s['ideal_without_copies_speedup']:.2f}x), "
              f"{s['share_of_ideal']:.0%} of it")
    if decode is not None:
        print(f"a decode pass: {decode['seconds_per_pass']:.1f} s, of which weight copies "
              f"{decode['copy_seconds_per_pass']:.1f} s; the rest streams "
              f"{decode['float32_weights_gb']:.0f} GB of float32 weights at "
              f"{decode['compute_gb_per_second']:.1f} GB/s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
