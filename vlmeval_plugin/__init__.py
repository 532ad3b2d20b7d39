"""VLMEvalKit plugin for hybrid-vlm: LLaVA-1.5 (stock, FastV, DyMU, hybrid) as VLMEvalKit models.

Entry point: `python run.py ...` at the repository root (vlmeval_plugin.cli.main). The modules
settings, stats, results, tiny_data and layouts do not import vlmeval; robust and caption_scores
(the reaches into VLMEvalKit internals) import it only inside their functions; model and cli do. Importing this package
imports nothing heavy.
"""
