"""vlacache as a LeRobot policy plugin (`--policy.type=vlacache`).

LeRobot imports this package at start-up (distribution-name prefix `lerobot_policy_`); importing the
configuration registers the `vlacache` policy type. The modeling and processor modules are found by LeRobot's
naming convention (configuration_vlacache -> modeling_vlacache / processor_vlacache) and imported lazily.
"""

from lerobot_policy_vlacache.configuration_vlacache import VlaCacheConfig

__all__ = ["VlaCacheConfig"]
