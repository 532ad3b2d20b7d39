"""Speed benchmark: stock transformers, the engine with nothing cut, FastV, the methods, DyMU and the
hybrid, timed in one process beside their theoretical MACs. `python -m hybrid_tools.bench --help`
says what each column measures (`options.py` holds that text).

The package reads one way: options -> configs; timing, counts and output; session runs them all.
"""

from .configs import BENCH_METHODS, LAYER_METHODS, BenchConfig, activate, build_configs
from .counts import count_columns, dymu_layer_counts, generate_tokens_per_s, theory, token_counts
from .options import KERNEL_TRACE_DECODE_STEPS, SYNC_CHECK_DECODE_STEPS, checked_device_dtype, parse_args
from .output import CSV_COLUMNS, CSV_HEADER, STATISTICS, environment, summarize
from .session import BenchRun, cli, main, run
from .timing import Clock, LlmStartMark, decode, measure_memory, prefill, timed_run

__all__ = [
    "BENCH_METHODS", "BenchConfig", "BenchRun", "CSV_COLUMNS", "CSV_HEADER", "Clock", "KERNEL_TRACE_DECODE_STEPS", "LAYER_METHODS",
    "LlmStartMark", "STATISTICS", "SYNC_CHECK_DECODE_STEPS", "activate", "build_configs", "checked_device_dtype", "cli",
    "count_columns", "decode", "dymu_layer_counts", "environment", "generate_tokens_per_s", "main", "measure_memory",
    "parse_args", "prefill", "run", "summarize", "theory", "timed_run", "token_counts",
]
