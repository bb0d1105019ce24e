"""Adapters to the evaluation stacks researchers already run: `service` (one model, one episode per client
session, the stacks' camera and action conventions), `vla_eval` (a vla-eval model server), `openpi` (the openpi
websocket protocol)."""
