"""mkdocs hook: the example gallery and the execution switch.

On every build, each ``examples/*.py`` becomes a page ``gallery/<name>.md`` (added through
``on_files``; nothing is written into ``docs/``): the script's introduction, its printed
output, the figures it saved, and its source rendered cell by cell (jupytext percent format).

Execution. With ``PROBSSM_DOCS_EXECUTE`` unset or true (``make docs``), each script runs in a
subprocess whose working directory is a fresh folder of the cache, so the figures it writes
(``figures/*.png`` relative to the working directory) are collected from there. Results are
cached in ``.cache/gallery/`` (git-ignored), keyed by a hash of the script, its arguments and
every ``probssm/**/*.py`` source: a rebuild reruns only what changed. A script that fails or
times out is logged as a warning, so ``mkdocs build --strict`` fails. With
``PROBSSM_DOCS_EXECUTE=0`` (``make docs-check``, CI) nothing runs: a page shows a cached
result for the current sources when there is one, otherwise its source and a note. The same
variable switches mkdocs-jupyter's execution of the tutorials (``docs/tutorials/*.py``).

Environment: ``PROBSSM_DOCS_EXECUTE`` (default 1), ``PROBSSM_DOCS_TIMEOUT`` (seconds per
script, default 1800).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.gallery")

GALLERY = "gallery"  # URL folder of the generated pages; the nav entry "gallery/index.md" is expanded
# Command-line arguments per script (the defaults of the others are used).
ARGS = {"brain_states_synthetic.py": ["--quick"]}
# Data a script reads from outside the repository: (path relative to the repository root, what it is).
# When missing, the page says so instead of running the script.
REQUIRES = {"brain_states_locust.py": ("../shared/data/neural", "the locust spike trains (`--data-dir`)")}
IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif")

_state: dict = {}


def _truthy(value: str | None, default: bool = True) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def execute_enabled() -> bool:
    return _truthy(os.environ.get("PROBSSM_DOCS_EXECUTE"))


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#\s+#\s+(.+)", line)
        if m:
            return m.group(1).strip()
    return path.stem.replace("_", " ")


def _sources_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((root / "probssm").rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _key(script: Path, args: list[str], sources: str) -> str:
    h = hashlib.sha256()
    h.update(script.read_bytes())
    h.update(json.dumps(args).encode())
    h.update(sources.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# Events
# ------------------------------------------------------------------------------------------


def on_config(config):
    root = _root(config)
    execute = execute_enabled()
    _state.update(root=root, execute=execute, cache=root / ".cache" / "gallery",
                  examples=sorted((root / "examples").glob("*.py")))
    # One switch for the tutorials too: mkdocs-jupyter executes them only when we execute.
    if "mkdocs-jupyter" in config.plugins:
        config.plugins["mkdocs-jupyter"].config["execute"] = execute
    # Expand the nav entry "gallery/index.md" into the index and one page per example.
    titles = [(_title(p), f"{GALLERY}/{p.stem}.md") for p in _state["examples"]]

    def expand(items):
        out = []
        for item in items:
            if isinstance(item, dict):
                (name, value), = item.items()
                if value == f"{GALLERY}/index.md":
                    value = [{"Overview": value}] + [{t: uri} for t, uri in titles]
                elif isinstance(value, list):
                    value = expand(value)
                out.append({name: value})
            else:
                out.append(item)
        return out

    if config.nav:
        config.nav = expand(config.nav)
    log.info("gallery: %d examples, execution %s", len(titles), "on" if execute else "off")
    return config


def on_files(files, config):
    root, cache = _state["root"], _state["cache"]
    sources = _sources_digest(root)
    entries = []
    for script in _state["examples"]:
        args = ARGS.get(script.name, [])
        result = _result(script, args, _key(script, args, sources), root, cache)
        page, images = _page(script, args, result, root)
        files.append(File.generated(config, f"{GALLERY}/{script.stem}.md", content=page))
        for name, path in images:
            files.append(File.generated(config, f"{GALLERY}/{script.stem}/{name}", abs_src_path=str(path)))
        entries.append((script, result, images))
    files.append(File.generated(config, f"{GALLERY}/index.md", content=_index(entries)))
    return files


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------


def _result(script: Path, args: list[str], key: str, root: Path, cache: Path) -> dict | None:
    """The cached or fresh result of running ``script``: a dict, or None when not run."""
    folder = cache / script.stem / key
    meta = folder / "result.json"
    if meta.exists():
        result = json.loads(meta.read_text())
        result["folder"] = folder
        if result["returncode"] == 0:
            return result
    if not _state["execute"]:
        return None
    need = REQUIRES.get(script.name)
    if need and not (root / need[0]).exists():
        log.info("gallery: %s not run, %s not found at %s", script.name, need[1], need[0])
        return {"skipped": f"{need[1]} not found at `{need[0]}`", "folder": folder}
    if folder.parent.exists():
        shutil.rmtree(folder.parent)  # older results of this script
    work = folder / "run"
    work.mkdir(parents=True)
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    timeout = float(os.environ.get("PROBSSM_DOCS_TIMEOUT", "1800"))
    log.info("gallery: running %s %s", script.relative_to(root), " ".join(args))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout)
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        returncode = -1
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = f"timed out after {timeout:.0f} s (PROBSSM_DOCS_TIMEOUT)"
    wall = time.perf_counter() - start
    (folder / "stdout.txt").write_text(stdout)
    (folder / "stderr.txt").write_text(stderr)
    result = {"returncode": returncode, "wall_s": round(wall, 1), "args": args, "key": key}
    meta.write_text(json.dumps(result))
    result["folder"] = folder
    if returncode != 0:
        log.warning("gallery: %s failed (exit %s) after %.0f s; stderr ends:\n%s", script.name, returncode, wall,
                    "\n".join(stderr.splitlines()[-15:]))
    else:
        log.info("gallery: %s done in %.0f s", script.name, wall)
    return result


def _images(result: dict) -> list[tuple[str, Path]]:
    run = result["folder"] / "run"
    found = sorted(p for p in run.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [(p.name, p) for p in found]


# ------------------------------------------------------------------------------------------
# Pages
# ------------------------------------------------------------------------------------------


def _fence(text: str, lang: str = "") -> str:
    ticks = "````" if "```" not in text else "`````"
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}\n"


def _cells(script: Path):
    import jupytext

    return jupytext.read(script, fmt="py:percent").cells


def _page(script: Path, args: list[str], result: dict | None, root: Path):
    cells = _cells(script)
    intro, rest = "", cells
    if cells and cells[0].cell_type == "markdown":
        intro, rest = cells[0].source, cells[1:]
    if not intro.lstrip().startswith("# "):
        intro = f"# {_title(script)}\n\n{intro}"
    command = " ".join(["python", f"examples/{script.name}", *args])
    out = [intro.rstrip(), ""]
    out.append(f"Source: `examples/{script.name}`. Run it yourself with `{command}` "
               "(from the repository root, in the project's virtual environment).\n")
    images: list[tuple[str, Path]] = []
    if result is None:
        out.append('!!! note "Not executed in this build"\n    The printed output and figures of this '
                   "script are produced by `make docs`, which runs every example (this build ran with "
                   "`PROBSSM_DOCS_EXECUTE=0`, as CI's `make docs-check` does).\n")
    elif "skipped" in result:
        out.append(f'!!! note "Not executed"\n    This script needs {result["skipped"]}; '
                   "the build skipped it.\n")
    else:
        if result["returncode"] != 0:
            stderr = (result["folder"] / "stderr.txt").read_text()
            out.append(f'!!! failure "The script failed (exit {result["returncode"]})"\n')
            out.append(_fence("\n".join(stderr.splitlines()[-40:]), "text"))
        out.append(f"## Output\n\nPrinted by `{command}` ({result['wall_s']:.0f} s when this page was built):\n")
        stdout = (result["folder"] / "stdout.txt").read_text()
        out.append(_fence(stdout or "(nothing printed)", "text"))
        images = _images(result)
        if images:
            out.append("## Figures\n")
            for name, _ in images:
                out.append(f"![{name}]({script.stem}/{name})\n")
    out.append("## Source\n")
    for cell in rest:
        if cell.cell_type == "markdown":
            out.append(cell.source.rstrip() + "\n")
        elif cell.source.strip():
            title = cell.metadata.get("title")
            if title:
                out.append(f"**{title}**\n")
            out.append(_fence(cell.source, "python"))
    return "\n".join(out), images


def _index(entries) -> str:
    out = ["# Gallery", "",
           "Every script in `examples/` is executed by `make docs` and rendered here with what it prints "
           "and the figures it saves. `make docs-check` (CI) builds the same pages without running the "
           "scripts; `make demo` runs the Nile, Bayesian and C-MAPSS examples from the command line.", "",
           "| example | what it shows | run time |", "|---|---|---|"]
    for script, result, images in entries:
        summary = ""
        cells = _cells(script)
        if cells and cells[0].cell_type == "markdown":
            paras = [p for p in cells[0].source.split("\n\n") if p.strip() and not p.lstrip().startswith("#")]
            if paras:
                summary = " ".join(paras[0].split())
                summary = re.split(r"(?<=[.:])\s", summary)[0].rstrip(":")
        summary = summary.replace("|", "\\|")
        if result is None:
            when = "not run in this build"
        elif "skipped" in result:
            when = "skipped (data not found)"
        elif result["returncode"] != 0:
            when = "**failed**"
        else:
            when = f"{result['wall_s']:.0f} s"
        out.append(f"| [{_title(script)}]({script.stem}.md) | {summary} | {when} |")
    return "\n".join(out) + "\n"
