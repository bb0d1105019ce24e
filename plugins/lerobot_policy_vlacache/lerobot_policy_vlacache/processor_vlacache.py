"""Pre/post processors of the vlacache policy: pass-throughs. vlacache normalises inside its backbone and the
serve config's `benchmark` already gives actions in the env's convention; the policy reads the images, state and
task of LeRobot's batch as the env processor leaves them."""

from __future__ import annotations

from typing import Any

import torch

from lerobot.processor import PolicyAction, PolicyProcessorPipeline
from lerobot.processor.factory import make_policy_processor_pipelines
from lerobot_policy_vlacache.configuration_vlacache import VlaCacheConfig


def make_vlacache_pre_post_processors(
    config: VlaCacheConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[PolicyProcessorPipeline[dict[str, Any], dict[str, Any]], PolicyProcessorPipeline[PolicyAction, PolicyAction]]:
    """Identity pipelines (LeRobot's standard names and converters); dataset_stats are not used."""
    return make_policy_processor_pipelines(input_steps=[], output_steps=[])
