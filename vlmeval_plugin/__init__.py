"""VLMEvalKit plugin for hybrid-vlm: LLaVA-1.5 (stock, FastV, DyMU, hybrid) as VLMEvalKit models.

Entry point: `python run.py ...` at the repository root (vlmeval_plugin.cli.main). The modules
settings, stats, results and tiny_data do not import vlmeval; model and cli do. Importing this package
imports nothing heavy.
"""
