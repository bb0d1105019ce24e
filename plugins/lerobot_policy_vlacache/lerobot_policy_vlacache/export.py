"""Write a LeRobot policy folder for vlacache, so `lerobot-eval --policy.path=DIR` loads it as a trained policy.

    python -m lerobot_policy_vlacache.export DIR [--serve-config micro_oft_libero] [--policy vla_cache]
                                                 [--device cpu] [--override KEY=VALUE ...]

The folder holds the policy config (config.json: which vlacache serve config and cache policy) and its
pre/post processor pipelines; the weights stay where the serve config's backbone checkpoint is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lerobot_policy_vlacache.configuration_vlacache import VlaCacheConfig
from lerobot_policy_vlacache.processor_vlacache import make_vlacache_pre_post_processors


def write_policy_folder(out: str | Path, **fields) -> Path:
    """config.json + policy_preprocessor.json + policy_postprocessor.json of a VlaCacheConfig(**fields) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = VlaCacheConfig(**fields)
    config.save_pretrained(out)
    for pipeline in make_vlacache_pre_post_processors(config):
        pipeline.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lerobot_policy_vlacache.export", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the folder to write (created if missing)")
    parser.add_argument("--serve-config", default="micro_oft_libero", help="a shipped serve config or a YAML path")
    parser.add_argument("--policy", default=None, help="the cache policy (default: the serve config's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--override", action="append", default=[], help="KEY=VALUE on the serve config (repeatable)")
    args = parser.parse_args(argv)
    out = write_policy_folder(args.out, serve_config=args.serve_config, policy=args.policy, device=args.device,
                              overrides=args.override)
    print(f"wrote {out}: lerobot-eval --policy.path={out} ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
