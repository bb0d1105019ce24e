"""Adapters to the evaluation stacks researchers already run: `service` (one model, one episode per client
session, the stacks' camera and action conventions), `vla_eval` (a vla-eval model server), `openpi` (the openpi
websocket protocol). The LeRobot policy plugin is its own distribution (it needs Python >= 3.12):
plugins/lerobot_policy_vlacache/, checked by scripts/check_lerobot.sh."""
