"""The provenance section of a report: what each configuration's files record about how they were made."""

from __future__ import annotations

from hybrid_vlm.provenance import shell_join
from vlmeval_plugin.results import read_json

from ..configs import Configuration
from .markdown import Linker, display_path


def versions_text(versions: dict | None) -> str:
    if not isinstance(versions, dict) or not versions:
        return "not recorded"
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


def git_text(record: dict) -> str:
    git = record.get("git")
    if isinstance(git, dict):
        commit, dirty = git.get("commit"), git.get("dirty")
    else:
        commit, dirty = record.get("git_commit"), record.get("git_dirty")
    if not commit:
        return "not recorded"
    return f"{commit}{' (uncommitted changes)' if dirty else ''}"


def env_text(env: dict | None) -> str:
    if not isinstance(env, dict):
        return "not recorded"
    shown = [f"{k}={v}" for k, v in env.items() if v not in (None, "")]
    return " ".join(shown) if shown else "none set"


def run_commands(config: Configuration) -> list[tuple[str, str]]:
    """(command, where it was recorded) for a configuration, best record first."""
    commands = []
    for record in config.run_info:
        command = record.get("command") or (shell_join(record["argv"]) if isinstance(record.get("argv"), list) else None)
        if command:
            # run.py records exactly the settings that decide a run (RUN_INFO_ENVS), so all of them go in front
            env = record.get("env") if isinstance(record.get("env"), dict) else {}
            prefix = " ".join(f"{k}={shell_join([v])}" for k, v in env.items() if v not in (None, ""))
            commands.append(((prefix + " " if prefix else "") + command, "run_info.json"))
    for manifest, run in config.sweep_runs:
        command = run.get("command")
        if isinstance(command, list):
            command = shell_join(command)
        if command:
            env = run.get("env") if isinstance(run.get("env"), dict) else {}
            prefix = " ".join(f"{k}={shell_join([v])}" for k, v in env.items() if v not in (None, ""))
            commands.append(((prefix + " " if prefix else "") + command, manifest.name))
    return commands


def status_argv(config: Configuration) -> str | None:
    argv = (config.status or {}).get("argv")
    if isinstance(argv, list) and argv:
        return "python " + shell_join(argv)
    return None


def provenance_block(config: Configuration, linker: Linker) -> str:
    lines = [f"#### `{config.label}`", ""]
    lines.append(f"- folder: {linker.link(display_path(config.folder), config.folder)}")
    if config.run_info:
        record = config.run_info[-1]
        runs = f" (latest of {len(config.run_info)} recorded runs)" if len(config.run_info) > 1 else ""
        command = record.get("command") or (shell_join(record["argv"]) if isinstance(record.get("argv"), list) else "not recorded")
        lines.append(f"- command ({linker.link('run_info.json', config.run_info_file)}{runs}): `{command}`")
        lines.append(f"  - environment: `{env_text(record.get('env'))}`")
        if record.get("checkpoint"):
            lines.append(f"  - checkpoint: `{record['checkpoint']}`")
        if record.get("setting") is not None:
            lines.append(f"  - setting: `{record['setting']}`")
        lines.append(f"  - versions: {versions_text(record.get('versions'))}; git commit {git_text(record)}; at {record.get('time', 'not recorded')}")
    else:
        lines.append("- run.py command, environment and versions: not recorded (no `run_info.json` in the folder)")
    for manifest, run in config.sweep_runs:
        command = shell_join(run["command"]) if isinstance(run.get("command"), list) else str(run.get("command"))
        lines.append(f"- run by a sweep ({linker.link(manifest.name, manifest)}): `{command}`")
        lines.append(f"  - environment: `{env_text(run.get('env'))}`; exit status {run.get('returncode', '?')}; started {run.get('started', '?')}")
        data = read_json(manifest) or {}
        lines.append(f"  - sweep: `{data.get('command', 'not recorded')}`; versions: {versions_text(data.get('versions'))}; git commit {git_text(data)}")
    if config.status:
        status = config.status
        argv = status_argv(config)
        lines.append(
            f"- VLMEvalKit {linker.link('status.json', config.status_file)}: eval id `{status.get('eval_id', '?')}`, created "
            f"{status.get('created_at', '?')}, mode `{status.get('mode', '?')}`, argv `{argv or 'not recorded'}` "
            "(VLMEvalKit's own argv: the plugin's flags such as --model-path / --batch-size and the FASTV_K / "
            "DYMU_THRESHOLDS / HYBRID_POSITIONS environment are not in it; its `commit` field is the git hash of "
            f"the directory vlmeval is installed in: `{status.get('commit', '?')}`)"
        )
    settings = sorted({s for e in config.entries.values() for s in e.settings})
    batches = sorted({b for e in config.entries.values() for b in e.batch_sizes})
    if settings:
        lines.append(f"- engine setting per the stats sidecars: {', '.join(f'`{s}`' for s in settings)}; batch size {', '.join(map(str, batches)) or '?'}")
    return "\n".join(lines)
