"""Pre/post processors of the vlacache policy: pass-throughs. vlacache normalises inside its backbone and the
serve config's `benchmark` already gives actions in the env's convention; the policy reads the images, state and
task of LeRobot's batch as the env processor leaves them."""

from __future__ import annotations

from typing import Any

import torch

from lerobot.processor import (DeviceProcessorStep, PolicyAction, PolicyProcessorPipeline,
                               RenameObservationsProcessorStep)
from lerobot.processor.factory import make_policy_processor_pipelines
from lerobot_policy_vlacache.configuration_vlacache import VlaCacheConfig


def make_vlacache_pre_post_processors(
    config: VlaCacheConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[PolicyProcessorPipeline[dict[str, Any], dict[str, Any]], PolicyProcessorPipeline[PolicyAction, PolicyAction]]:
    """Pass-through pipelines (LeRobot's standard names and converters): an empty rename and the device step, the
    two steps lerobot-eval configures by name when it loads them from a policy folder; dataset_stats unused."""
    return make_policy_processor_pipelines(
        input_steps=[RenameObservationsProcessorStep(rename_map={}), DeviceProcessorStep(device=config.device or "cpu")],
        output_steps=[DeviceProcessorStep(device="cpu")])
