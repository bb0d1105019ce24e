"""The `vlacache` command: list, bench, run, record, demos, train, serve.

A bad input (config, override, checkpoint, recording, output location, a results directory that must not be
mixed) ends with one line `vlacache: error: <problem>; <fix>` on stderr and exit code 2, before any compute."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .errors import VlacacheError
from .types import InputError

EXIT_BAD_INPUT = 2


def _list(args) -> int:
    from fnmatch import fnmatch

    from .backbone import resolve_checkpoint, shipped_policies
    from .registry import BACKBONES, ENVS, PERTURBATIONS, STRATEGIES

    sections = [("backbones", BACKBONES), *((f"strategies ({kind})", r) for kind, r in STRATEGIES.items()),
                ("envs", ENVS), ("perturbations", PERTURBATIONS)]
    lines = {title: [f"  {name:<20} {first_sentence(registry.get(name).__doc__)}" for name in registry.names(args.pattern)]
             for title, registry in sections}
    policies = []
    for name in shipped_policies():
        if fnmatch(name, args.pattern):
            folder = resolve_checkpoint(name)
            config = json.loads((folder / "config.json").read_text())
            kind = "openvla-oft" if any(folder.glob("action_head--*")) else config.get("model_type", "?")
            policies.append(f"  {name:<28} {kind}, trained on {', '.join(config.get('norm_stats', {})) or '?'}")
    lines["shipped policies (backbone.checkpoint=NAME)"] = policies
    if not any(lines.values()):
        print(f"nothing matches '{args.pattern}'; `vlacache list` shows every name (patterns are shell-style: 'entropy*')")
        return 0
    for title, rows in lines.items():
        if rows or args.pattern == "*":
            print(f"{title}:", *rows, sep="\n")
    return 0


def first_sentence(doc: str | None) -> str:
    """A docstring's first sentence, whole (its first paragraph up to the first full stop)."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = re.search(r"[.!?](?=\s+[A-Z(`'\"]|$)", paragraph)  # not "i.e. the"
    return paragraph[: end.start() + 1] if end else paragraph


def _bench(args) -> int:
    from .eval.bench import run_bench
    from .eval.results import check_writable_file
    from .experiment import BenchConfig, load_config

    config = load_config(BenchConfig, args.config, "bench", args.overrides)
    out = check_writable_file(args.out, "the bench report", "pass a writable path, e.g. --out /tmp/bench.json")
    report = run_bench(config, progress=not args.quiet)
    out.write_text(json.dumps(report, indent=1))
    print_bench_report(report)
    print(f"wrote {out}")
    return 0


def print_bench_report(report: dict) -> None:
    """The bench report's self-checks, one line per row, the cost models of guarded rows, the compile checks."""
    if report["zero_reuse_max_abs_diff"] is None:
        checks = "self-checks skipped (self_checks: false)"
    else:
        checks = (f"zero-reuse max|diff| {report['zero_reuse_max_abs_diff']:.3g}  identical-frame max|diff| "
                  f"{report['identical_frame_max_abs_diff']:.3g}")
    print(f"{checks}  ({report['episodes']} episode(s), {sum(report['steps_per_episode'])} steps)")
    for row in report["rows"]:
        s = row["summary"]
        print(f"{row['label']}: mean reuse {s['mean_reuse_ratio']:.1%}  prefill {s['prefill_ms_baseline']:.2f} -> "
              f"{s['prefill_ms_cached']:.2f} ms ({s['prefill_speedup']:.2f}x)  total {s['total_ms_baseline']:.2f} -> "
              f"{s['total_ms_cached']:.2f} ms ({s['total_speedup']:.2f}x)  FLOPs x{s['flops_ratio']:.3f}  "
              f"max|a_cached - a_nocache| {max(s['action_abs_diff']['max']):.3g}  "
              f"same action as no cache {s['identical_action_steps']:.0%}"
              + (f"  vs compiled no cache: total {s['vs_compiled_baseline']['total_speedup']:.2f}x"
                 if "vs_compiled_baseline" in s else ""))
    for row in report["rows"]:
        model = row.get("cost_model")
        if model:
            print(f"{row['label']}: cost guard ran {row['summary']['guard_declined_steps']} step(s) untouched; "
                  f"cost model (ms) untouched {model['untouched_ms']:.2f}, engine +{model['engine_ms']:.2f}, probe "
                  f"+{model['probe_ms']:.2f}, reuse +{model['reuse_ms']:.2f}, -{model['token_layer_ms'] * 1e3:.2f} us "
                  f"per token-layer skipped"
                  + (f", its planning {model['plan_ms'][row['label']]:.2f}" if row["label"] in model["plan_ms"] else ""))
    for label, check in (report.get("compile_checks") or {}).items():
        tokens = "" if check["identical_tokens"] is None else f"  identical tokens {check['identical_tokens']:.0%}"
        print(f"compiled vs eager, {label}: max|logit diff| {check['max_abs_logit_diff']:.3g}  max|action diff| "
              f"{check['max_abs_action_diff']:.3g}{tokens}  same plan {check['same_plan']:.0%}  ({check['steps']} steps)")


def _run(args) -> int:
    from .experiment import ExperimentConfig, load_config
    from .eval.report import print_summary
    from .eval.runner import launch

    config = load_config(ExperimentConfig, args.config or "default", "experiment", args.overrides)
    rows = launch(config, progress=not args.quiet, restart=args.restart, verify_code_change=args.verify_code_change)
    if rows:
        print_summary(rows)
        out = Path(config.output_dir)
        print(f"results: {out}/episodes*.jsonl (one line per episode), {out / 'summary.md'}, "
              f"{out / 'summary.csv'}, {out / 'summary.png'}")
    return 0


def _report(args) -> int:
    from .eval.report import combined_table
    from .eval.results import check_writable_file

    missing = [d for d in args.dirs if not Path(d).is_dir()]
    if missing:
        raise InputError(f"no such result directory: {', '.join(missing)}; pass the output_dir of `vlacache run`s")
    out = args.out and check_writable_file(args.out, "the table", "pass a writable path, e.g. --out /tmp/table.md")
    table = combined_table([Path(d) for d in args.dirs])
    if out:
        out.write_text(table)
        print(f"wrote {out}")
    else:
        print(table, end="")
    return 0


def _record(args) -> int:
    from .experiment import ExperimentConfig, load_config
    from .eval.recording import record_episode

    config = load_config(ExperimentConfig, args.config, "experiment", args.overrides)
    path = record_episode(config, args.out, max_steps=args.steps, episode_index=args.episode)
    print(f"wrote {path}")
    return 0


def _in_maniskill_venv(args) -> None:
    """ManiSkill's motion planner (mplib 0.1.1) crashes under numpy 2: run this command again in the venv that
    pins numpy 1.26 (scripts/setup_maniskill.sh), when this Python has numpy 2."""
    from .train.planner import numpy_breaks_mplib

    if not numpy_breaks_mplib() or os.environ.get("VLACACHE_MANISKILL_VENV"):
        return
    python = Path(__file__).resolve().parents[1] / ".venvs" / "maniskill" / "bin" / "python"
    if not python.exists():
        return  # the recorder names the fix (bash scripts/setup_maniskill.sh)
    os.environ["VLACACHE_MANISKILL_VENV"] = "1"
    sys.stdout.flush()
    argv = ["demos", args.config, *args.overrides, *(["--quiet"] if args.quiet else [])]
    os.execv(str(python), [str(python), "-m", "vlacache.cli", *argv])


def _demos(args) -> int:
    from .experiment import load_config
    from .train.demos import DemosConfig, record_demos

    config = load_config(DemosConfig, args.config, "demos", args.overrides)
    if config.planned:
        _in_maniskill_venv(args)
    summary = record_demos(config, progress=not args.quiet)
    print(f"expert success {summary['succeeded']}/{summary['attempted']} episodes; per task:")
    for task, row in summary["per_task"].items():
        print(f"  {task:<20} {row['succeeded']}/{row['attempted']}")
    print(f"wrote {config.output_dir} (index.jsonl, one .npz per stored episode, dataset_statistics.json, summary.json)")
    return 0


def _train(args) -> int:
    from .config import load_yaml, resolve_config_path
    from .experiment import load_config

    objective = load_yaml(resolve_config_path(args.config, "train")).get("objective", "bc")
    objective = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("objective=")), objective)
    if objective == "reuse":
        from .train.reuse import ReuseTrainConfig, train_reuse

        config = load_config(ReuseTrainConfig, args.config, "train", args.overrides)
        folder = train_reuse(config, progress=not args.quiet, restart=args.restart)
        print(f"wrote {folder} (a learned selector: name it in a policy as selector: {{name: learned, checkpoint: "
              f"{folder}}}) and {config.output_dir}/curves.csv / .png")
        return 0
    from .train.bc import TrainConfig, train

    config = load_config(TrainConfig, args.config, "train", args.overrides)
    policy = train(config, progress=not args.quiet, restart=args.restart)
    print(f"wrote {policy} (the released layout: load it with backbone.checkpoint={policy}) and "
          f"{config.output_dir}/loss_curves.csv / .png")
    return 0


def _serve(args) -> int:
    from .config import ConfigError
    from .integrations.service import PolicyService, check_can_serve, load_serve_config

    if args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be a positive integer, got {args.max_batch_size}")
    if args.protocol == "openpi":
        from .integrations import openpi

        if args.max_batch_size != 1:
            raise ConfigError("--max-batch-size batches the queries of several vla-eval sessions; the openpi server "
                              "answers one client's query at a time: drop it, or use --protocol vla-eval")
        config = load_serve_config(args.config, args.overrides)
        check_can_serve(args.host, args.port, config)
        service = PolicyService(config, default_cameras=openpi.OPENPI_CAMERAS)
        openpi.serve(service, args.host, args.port)
    else:
        from .integrations import vla_eval

        argv = ([args.config] if args.config else []) + args.overrides  # main loads and checks the config, once
        return vla_eval.main(argv + ["--host", args.host, "--port", str(args.port), "--max-batch-size", str(args.max_batch_size)])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlacache", description="VLA-Cache: adaptive token caching for VLA policies")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list registered backbones, strategies and envs")
    p.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'entropy*'")
    p.set_defaults(func=_list)
    p = sub.add_parser("bench", help="baseline vs cache policies over recorded episodes -> JSON (a row per policy)")
    p.add_argument("config", help="bench YAML path or shipped name (configs/bench/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. backbone.device=cuda")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)
    p = sub.add_parser("run", help="run an experiment (default: tiny OpenVLA on the embedded demo frames)")
    p.add_argument("config", nargs="?", default=None, help="experiment YAML path or shipped name (configs/experiment/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=4")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--restart", action="store_true",
                   help="start over in output_dir: its previous results move to output_dir/restarted-<time>/ "
                        "(never deleted) instead of being resumed")
    p.add_argument("--verify-code-change", action="store_true",
                   help="when only the code of a policy's strategies, backbone or env changed since its results were "
                        "recorded, re-run its first recorded episode under the new code and resume if it comes out "
                        "the same (the evidence goes into run.json)")
    p.set_defaults(func=_run)
    p = sub.add_parser("report", help="one markdown table over several runs' result directories (a row per policy)")
    p.add_argument("dirs", nargs="+", help="output_dir of each `vlacache run`, e.g. results/micro_oft_*")
    p.add_argument("--out", default=None, help="write the table to this .md file instead of printing it")
    p.set_defaults(func=_report)
    p = sub.add_parser("record", help="record one episode's observations (all cameras, proprio, instruction) for replay")
    p.add_argument("config", help="experiment YAML path or shipped name; its first policy drives the env")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--out", required=True, help="output .npz (replay it with env: {name: replay, path: FILE})")
    p.add_argument("--steps", type=int, default=None, help="at most this many env steps")
    p.add_argument("--episode", type=int, default=0, help="index into the env's episode list")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_record)
    p = sub.add_parser("demos", help="record scripted-expert demonstrations: LIBERO, or ManiSkill by its motion "
                                     "planner (resumable, parallel)")
    p.add_argument("config", help="demos YAML path or shipped name (configs/demos/), e.g. libero_spatial")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. episodes_per_task=10 workers=2")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_demos)
    p = sub.add_parser("train", help="behaviour cloning of a backbone on demonstrations, or (objective: reuse) a learned "
                                     "reuse selector on recorded episodes (Lightning, resumable)")
    p.add_argument("config", help="train YAML path or shipped name (configs/train/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 demos=data/demos/libero_spatial")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--restart", action="store_true",
                   help="start over in output_dir: its previous run moves to output_dir/restarted-<time>/ (never "
                        "deleted) instead of being resumed")
    p.set_defaults(func=_train)
    p = sub.add_parser("serve", help="serve a backbone + cache policy to an evaluation stack (openpi protocol, vla-eval)")
    p.add_argument("config", nargs="?", default=None, help="serve YAML path or shipped name (configs/serve/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. policy=no_cache benchmark=simpler")
    p.add_argument("--protocol", choices=["openpi", "vla-eval"], default="openpi",
                   help="openpi: the openpi websocket `infer` protocol; vla-eval: a vla-eval model server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=1,
                   help="vla-eval: run up to N sessions' queries that arrive together as one batch of episodes")
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides.extend(extra)  # key=value overrides given after an option such as --out
    if args.command in ("run", "serve") and args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("vlacache: interrupted. Finished episodes are saved; run the same command again to resume.", file=sys.stderr)
        return 130
    except VlacacheError as error:  # what a user can fix (the message says how); anything else is a bug: traceback
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"vlacache: error: {one_line(message)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def one_line(message: object) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
