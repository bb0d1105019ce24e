"""Configs: shipped YAML loads, typos fail with the valid names listed."""

import pytest

from vlacache import CachePolicy
from vlacache.config import ConfigError, packaged_configs
from vlacache.experiment import BenchConfig, ExperimentConfig, load_config


@pytest.mark.parametrize("name", sorted(p.stem for p in (packaged_configs() / "policy").glob("*.yaml")))
def test_every_shipped_policy_builds(name):
    policy = CachePolicy.from_config(name)
    assert policy.label


def test_paper_ablation_rows_are_shipped():
    names = {p.stem for p in (packaged_configs() / "policy").glob("*.yaml")}
    assert {"no_cache", "static_reuse", "static_reuse_filter", "vla_cache", "reference_code"} <= names
    assert not CachePolicy.from_config("no_cache").enabled
    assert CachePolicy.from_config("vla_cache").scheduler.needs_entropy


def test_experiment_and_bench_configs_load_with_overrides():
    config = load_config(ExperimentConfig, "tiny_replay", "experiment", ["max_steps=3", "backbone.seed=4"])
    assert config.max_steps == 3 and config.backbone["seed"] == 4
    bench = load_config(BenchConfig, "cpu", "bench")
    assert bench.policy["scheduler"]["fraction"] == 0.5


@pytest.mark.parametrize("name", sorted(p.stem for p in (packaged_configs() / "bench").glob("*.yaml")))
def test_every_shipped_bench_config_loads_and_its_policies_build(name):
    bench = load_config(BenchConfig, name, "bench")
    specs = bench.policy if isinstance(bench.policy, list) else [bench.policy]
    labels = [CachePolicy.from_config(spec).label for spec in specs]
    assert len(set(labels)) == len(labels), labels


def test_config_typos_fail_loudly(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'policies'"):
        load_config(ExperimentConfig, "tiny_replay", "experiment", ["policys=[a]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nepisods: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'episods'.*Valid keys"):
        load_config(ExperimentConfig, str(bad), "experiment")
    with pytest.raises(ConfigError, match="Available: .*default"):
        load_config(ExperimentConfig, "nonexistent", "experiment")
    with pytest.raises(ConfigError, match="episodes"):
        load_config(ExperimentConfig, "tiny_replay", "experiment", ["episodes=many"])
    with pytest.raises(ConfigError, match="Valid keys: label, selector"):
        CachePolicy.from_config({"selecter": {"name": "none"}})
    with pytest.raises(ConfigError, match="reuse_order"):
        CachePolicy.from_config({"reuse_order": "random"})


def test_yaml_components_replace_defaults_and_required_keys_are_named():
    config = load_config(ExperimentConfig, "libero_spatial_ablation", "experiment", ["backbone.checkpoint=/ckpt/x"])
    assert config.backbone["checkpoint"] == "/ckpt/x" and "preset" not in config.backbone
    with pytest.raises(ConfigError, match=r"'backbone.checkpoint' is required.*backbone.checkpoint=\.\.\."):
        load_config(ExperimentConfig, "libero_spatial_ablation", "experiment")


@pytest.mark.parametrize("name", sorted(p.stem for p in (packaged_configs() / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_config_is_valid(name):
    """Each shipped experiment resolves to registered, type-checked components (no model or simulator built)."""
    from vlacache.config import resolve_component
    from vlacache.experiment import build_policy
    from vlacache.registry import BACKBONES, ENVS, PERTURBATIONS

    config = load_config(ExperimentConfig, name, "experiment", ["backbone.checkpoint=/ckpt/x"])
    spec = dict(config.backbone)
    if spec.get("preset"):
        spec.pop("checkpoint")
    resolve_component(BACKBONES, spec, "backbone")
    resolve_component(ENVS, config.env, "env")
    if config.perturbation:
        resolve_component(PERTURBATIONS, config.perturbation, "perturbation")
    labels = [build_policy(p).label for p in config.policies]
    assert len(set(labels)) == len(labels)


def test_unnorm_key_falls_back_to_no_noops():
    from vlacache.backbones.common.statistics import resolve_unnorm_key

    stats = {"libero_spatial_no_noops": {}, "bridge_orig": {}}
    assert resolve_unnorm_key(stats, "libero_spatial") == "libero_spatial_no_noops"
    with pytest.raises(Exception, match="bridge_orig"):
        resolve_unnorm_key(stats, "libero_goal")


@pytest.mark.parametrize("override,message", [
    ("max_steps=[1", r"override 'max_steps=\[1': the value does not parse as YAML"),
    ("env={name: replay", r"override 'env=\{name: replay': the value does not parse as YAML"),
    ("max_steps=0", r"max_steps must be a positive integer \(or null\), got 0; e\.g\. max_steps=50"),
    ("max_steps=-1", "max_steps must be a positive integer"),
    ("episodes=-3", r"episodes must be a positive integer \(or null\), got -3"),
    ("execute_chunk=-1", "execute_chunk must be a positive integer"),
    ("execute_chunk=0", "execute_chunk must be a positive integer"),
    ("max_retries=-1", "max_retries must be a non-negative integer"),
    ("launcher.num_nodes=0", "launcher.num_nodes must be a positive integer"),
    ("policies=[]", "policies is empty"),
])
def test_values_that_cannot_run_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ExperimentConfig, "tiny_replay", "experiment", [override])


def test_limits_that_can_run_are_accepted():
    config = load_config(ExperimentConfig, "tiny_replay", "experiment",
                         ["max_steps=null", "episodes=1", "execute_chunk=1", "max_retries=0", "retry_errors=false"])
    assert config.max_steps is None and config.episodes == 1 and config.retry_errors is False
    with pytest.raises(ConfigError, match="episodes must be a positive integer"):  # it ran nothing and exited 0
        load_config(ExperimentConfig, "tiny_replay", "experiment", ["episodes=0"])
    assert ExperimentConfig().retry_errors is True and ExperimentConfig().max_retries == 2
    with pytest.raises(ConfigError, match="warmup must be a non-negative integer"):
        load_config(BenchConfig, "tiny", "bench", ["warmup=-1"])


def test_an_override_that_names_another_component_replaces_the_node_and_the_same_name_merges():
    smoke = "tiny_libero_smoke"
    assert load_config(ExperimentConfig, smoke, "experiment", ["env={name: replay, path: x.npz}"]).env == {
        "name": "replay", "path": "x.npz"}
    assert load_config(ExperimentConfig, smoke, "experiment", ["env.name=replay"]).env == {"name": "replay"}
    merged = load_config(ExperimentConfig, smoke, "experiment", ["env={name: libero, tasks: [1]}"]).env
    assert merged["tasks"] == [1] and merged["suite"] == "libero_spatial"  # same component: its settings stay
    # in order: a later override of a key inside a node given by name expands the name first
    backbone = load_config(ExperimentConfig, "tiny_replay", "experiment",
                           ["backbone=micro_oft_libero_spatial", "backbone.chunk=8", "backbone.device=cpu"]).backbone
    assert backbone["checkpoint"] == "micro_oft_libero_spatial" and backbone["name"] == "openvla-oft"
    assert "preset" not in backbone
    bench = load_config(BenchConfig, "tiny", "bench", ["policy=vla_cache", "policy.selector.tau=0.5"]).policy
    assert bench["selector"] == {"name": "pixel-cosine", "tau": 0.5, "top_k": 100} and bench["label"] == "vla-cache"
    swapped = load_config(BenchConfig, "tiny", "bench", ["policy=vla_cache", "policy.selector.name=none"])
    assert swapped.policy["selector"] == {"name": "none"}
