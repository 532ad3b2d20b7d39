"""Reports from raw outputs: VLMEvalKit work dirs and `hybrid_tools.bench` results -> reports/<name>/.

    python -m hybrid_tools.report outputs --name my-sweep
    python -m hybrid_tools.report outputs runs/other --bench runs/bench-mid --name main --snapshot

Writes reports/<name>/report.md (GitHub-readable), report.json (every number, with its source
file) and figures/<dataset>.png (the dataset's main metric vs mean tokens kept and vs median
prefill time, one PNG per dataset). Every number is read from the raw files each time this runs;
nothing is typed by hand.

What it reads
- Every model folder of every WORK_DIR (`<work_dir>/<model>/`, VLMEvalKit's layout) and every
  dataset in it: datasets are found from VLMEvalKit's status.json, the plugin's stats sidecars
  (`<model>_<dataset>_stats.jsonl`) and metric files that sit beside a prediction file.
- Metrics from VLMEvalKit's own evaluation files: MCQ `<model>_<dataset>_acc.csv` (Overall and
  categories, shown in %; the `dev` split when there are several) and caption
  `<model>_<dataset>_score.json` (BLEU-1..4, ROUGE_L, CIDEr, as VLMEvalKit writes them, x100).
  Other `_acc` / `_score` files: their numeric fields, first one as the main metric.
- Per-row statistics from the sidecars: mean tokens entering the LLM, mean tokens kept after
  pruning, median prefill ms per row.
- The vanilla configuration (the unpatched name: `llava_v1.5_7b`, `llava_tiny`, or any folder
  without a `__<setting>` tag whose sidecar says `stock`) is each configuration's reference:
  the one whose name prefixes the configuration's base name, in the same work dir if possible.
  `--vanilla NAME` forces one. Deltas are absolute differences in the shown units (accuracy in
  percentage points), ratios are configuration / vanilla.
- Bench results (`--bench DIR_OR_JSON`, or a WORK_DIR that holds a bench.json): the FLOPs/latency
  table, the measured time ratio beside the theoretical MAC ratio.
- Floors (`--floors JSON...`: `hybrid_tools.blind_baselines` and `hybrid_tools.caption_baseline`
  files): what each set gives a model that never looks at the image, listed under its table with
  the configurations at or below each. `--data NAME...` keeps only those sets.
- Provenance: the command, environment settings and versions recorded beside each raw output:
  `run_info.json` (written by run.py, when it records one), `sweep_*.json` (written by
  `python -m hybrid_tools.sweep`), VLMEvalKit's `status.json` and bench.json's `meta`. What no
  file records is reported as "not recorded".

--snapshot copies the raw files the report reads (metric files, sidecars, prediction files,
status / run_info / sweep records, bench.json / bench.csv; no pickles, no logs) into
reports/<name>/raw/ and reads them from there, so the report can be committed together with its
sources and regenerated exactly from them. --recipe FILE puts a shell script (how the raw outputs
were made) verbatim at the top of the report.

Files: `cli` (this command), `render` (one function per report section), `markdown`, `plots`,
`bench` (bench.json), `floors`, `parity` (hybrid_tools.parity files), `device_checks` (a GPU run's log and test results),
`targets` (the GPU speed targets), `provenance`, `snapshot`; the raw files are read by `vlmeval_plugin.results`
and compared by `hybrid_tools.configs`. Nothing here imports vlmeval (the VLMEvalKit runs are long
finished); plots need matplotlib (the `report` extra: pip install -e .[report]).
"""
