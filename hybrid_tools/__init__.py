"""Tooling over the engine and the plugin: `bench` (speed against theory), `sweep` (grids of
VLMEvalKit runs), `report` (reports from raw outputs). Imports flow one way: hybrid_tools ->
vlmeval_plugin -> hybrid_vlm."""
