"""``weightdiff survey``: one base, many fine-tunes of it, one row per fine-tune.

Every tuned model is compared with the base by ``weightdiff.compare`` (one task per
model: in this process, or on Dask workers through ``weightdiff.cluster``); each task
returns the compare JSON text and nothing else, and the parent alone writes files:

    DIR/models/<name>.json   the model's full compare JSON (without the varying ``run`` block)
    DIR/survey.csv           one row per model, sorted by the tuned model's absolute path
    DIR/survey.parquet       the same table (needs pyarrow: the ``pandas`` extra)

A row is built from the JSON by ``row_from_result``, so a distributed survey writes the
same bytes as a sequential one. A survey is resumable: a model whose row is ``ok`` and
whose input identity (absolute paths of base and tuned, and every file's name, size, inode,
mtime and ctime, as ``--cache`` identifies a file; the options, the weightdiff version)
matches is not compared again; with ``--hash`` its files must also still have the sha256
its row states (hashed again to decide). A model that fails is a
row with ``status = error`` and its one-line error, rerun next time; the others go on.
Every file is written atomically (weightdiff.fsutil), the tables after each model.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ._version import __version__
from .cluster import ClusterLost, Outcome, check, runner, worker_threads
from .comparison import compare
from .errors import WeightdiffError, escape_name
from .fsutil import OutputError, write_bytes, write_text
from .options import CompareOptions, HubOptions, options_from_kwargs
from .records import dumps, share_lower

PANDAS_HINT = "pip install 'weightdiff[pandas]'"

#: the table's columns in order, with their type (string, int64, double)
COLUMNS: list[tuple[str, str]] = [
    ("tuned", "string"), ("name", "string"), ("status", "string"), ("error", "string"),
    ("verdict", "string"), ("coverage", "double"), ("relative_change", "double"),
    ("one_minus_cosine", "double"), ("blocks_changed", "int64"), ("blocks_total", "int64"),
    ("delta_params", "int64"), ("delta_params_lower", "int64"), ("delta_params_share", "double"),
    ("delta_params_share_lower", "double"), ("form", "string"),
    ("max_numerical_rank", "int64"), ("max_numerical_rank_bound", "string"), ("max_numerical_rank_upper", "int64"),
    ("flags", "string"), ("params_total", "int64"),
    ("tuned_files", "int64"), ("tuned_bytes", "int64"), ("tuned_sha256", "string"), ("tuned_commit", "string"),
    ("base", "string"), ("base_bytes", "int64"), ("base_sha256", "string"), ("base_commit", "string"),
    ("identity", "string"), ("json", "string"),
]
NAMES = [c for c, _ in COLUMNS]


@dataclass
class SurveyResult:
    """What ``survey`` did: the rows (sorted), and how many were compared, skipped, failed."""

    rows: list[dict]
    directory: Path
    files: list[Path] = field(default_factory=list)
    computed: int = 0
    skipped: int = 0
    failed: int = 0
    notices: list[str] = field(default_factory=list)


# --- input identity -----------------------------------------------------------------------------

def identity(path: str | os.PathLike) -> dict:
    """The absolute path and ``[relative name, bytes, inode, mtime ns, ctime ns]`` of every regular file
    under it: a file's identity as ``--cache`` keys records by it (weightdiff.measure.cache), so a file
    rewritten in place with the same size (its mtime restored by ``touch -d`` or ``cp -p`` too: the ctime
    cannot be) is another input. The device number is left out, as there (one shared filesystem is
    numbered differently on each machine).

    Cheap (``stat`` only, no bytes read); hidden files are left out. A path that does not
    exist here has no files: spelled as a Hub repo id it is kept as given (the comparison
    resolves it), else it is made absolute like any local path (the comparison fails and
    says why).

    >>> identity("no/such-model")
    {'path': 'no/such-model', 'files': []}
    >>> identity("/no/such-model.safetensors")
    {'path': '/no/such-model.safetensors', 'files': []}
    """
    from .io.checkpoint import is_hub_candidate

    given = os.fspath(path)
    root = given if not os.path.exists(given) and is_hub_candidate(given) else os.path.abspath(given)

    def entry(name: str, p: str) -> list:
        st = os.stat(p)
        return [name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]

    files: list[list] = []
    if os.path.isfile(root):
        files.append(entry(os.path.basename(root), root))
    elif os.path.isdir(root):
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            for n in sorted(names):
                p = os.path.join(d, n)
                if n.startswith(".") or not os.path.isfile(p):
                    continue
                files.append(entry(os.path.relpath(p, root).replace(os.sep, "/"), p))
    return {"path": root, "files": sorted(files)}


def _sha256(path: Path) -> str:
    from .io.files import open_regular, sha256_fd

    fd, st = open_regular(path)
    try:
        return sha256_fd(fd, st.st_size, path)
    finally:
        os.close(fd)


def digests_hold(row: dict, directory: Path, hashed: dict[str, str]) -> bool:
    """With ``--hash``: whether the files a done row's JSON lists still have the sha256 the row states
    (``tuned_sha256``, ``base_sha256``), hashed now (``hashed``: path -> sha256 of this survey, so the
    base is read once). A Hub checkpoint is fixed by its commit (in the identity) and not read."""
    try:
        data = json.loads((directory / row["json"]).read_text(encoding="utf-8"))
        for entry, want in ((data.get("tuned"), row.get("tuned_sha256")),
                            ((data.get("base") or [None])[0], row.get("base_sha256"))):
            if entry.get("hub"):
                continue
            if want is None:
                return False
            top = Path(entry["path"])
            top = top if top.is_dir() else top.parent
            files = []
            for f in entry["files"]:
                p = os.path.realpath(top / f["name"])
                if p not in hashed:
                    hashed[p] = _sha256(Path(p))
                files.append({"name": f["name"], "sha256": hashed[p]})
            if files_digest({"files": files}) != want:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError, WeightdiffError):
        return False
    return True


def hub_identity(tid: dict) -> dict:
    """``identity`` of a Hub repo id with the commit it names now (``commit``; None when it cannot be resolved:
    the task then fails and says why), so a resumed survey compares again a model whose branch moved."""
    from .io.checkpoint import is_hub_candidate

    if not is_hub_candidate(tid["path"]):
        return tid
    from .io.hub import resolve_commit

    try:
        commit = resolve_commit(tid["path"])
    except WeightdiffError:
        commit = None
    return {**tid, "commit": commit}


def _pins(base_id: dict, tid: dict) -> tuple:
    """The task's extra argument when a Hub id is among its inputs: HubOptions reading the commits resolved here."""
    pins = tuple((i["path"], i["commit"]) for i in (base_id, tid) if i.get("commit"))
    return (HubOptions(pinned=pins),) if pins else ()


def identity_key(base: dict, tuned: dict, options: CompareOptions, hash_files: bool) -> str:
    """sha256 over everything a row depends on: both identities (each file's stat identity), the options,
    --hash, the version."""
    blob = dumps({"base": base, "tuned": tuned, "settings": options.settings(), "hash": hash_files,
                  "version": __version__})
    return hashlib.sha256(blob.encode()).hexdigest()


def safe_name(path: str) -> str:
    """A file name for a model's JSON: its last path parts, made safe, and 8 hex digits of the path.

    ``path`` is the row's ``tuned`` (``identity``'s path: absolute for a local checkpoint, a repo
    id as given), so the name does not depend on the current directory.

    >>> safe_name("/data/fine-tunes/llama ft #3"), safe_name("org/model@main")
    ('fine-tunes_llama_ft_3-3e5d1a86', 'org_model_main-285581b7')
    """
    p = Path(path)
    parts = [p.parent.name, p.stem if p.suffix in (".safetensors", ".bin", ".pt", ".gguf") else p.name]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(x for x in parts if x)).strip("._-")[:80] or "model"
    return f"{stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def files_digest(entry: dict | None) -> str | None:
    """One sha256 for a checkpoint from the compare JSON's ``files`` list: the file's own sha256
    for a single file, else the sha256 of ``sha256sum``-style lines (``<sha>  <name>``)."""
    files = (entry or {}).get("files") or []
    if not files or any(f.get("sha256") is None for f in files):
        return None
    if len(files) == 1:
        return files[0]["sha256"]
    lines = "".join(f"{f['sha256']}  {f['name']}\n" for f in sorted(files, key=lambda f: f["name"]))
    return hashlib.sha256(lines.encode()).hexdigest()


# --- the task and the row -------------------------------------------------------------------------

def survey_task(base: str, tuned: str, options: CompareOptions, hash_files: bool, hub: HubOptions | None = None) -> dict:
    """Compare one tuned model with the base: ``{"json": text}`` or ``{"error": one line}``.

    Runs in this process or on a Dask worker; reads the checkpoints, writes nothing. ``hub``: the
    commits the parent resolved for Hub ids (``HubOptions.pinned``), read instead of their revisions.
    """
    try:
        return {"json": compare(base, tuned, options=options, hash_files=hash_files,
                                hub=hub).to_json(include_run=False)}
    except WeightdiffError as exc:
        return {"error": exc.one_line()}
    except MemoryError:
        return {"error": f"{escape_name(tuned)}: out of memory on the worker (give workers more memory)"}
    except Exception as exc:   # a bug: one line in the row, the other models go on
        return {"error": escape_name(f"internal error: {type(exc).__name__}: {exc} (please report it)")}


def _commit(entry: dict | None) -> str | None:
    """The commit a Hub checkpoint was read at (its JSON entry's ``hub.commit``), None for a local one."""
    return ((entry or {}).get("hub") or {}).get("commit")


def _coverage(v: Any) -> float | None:
    """The tuned model's compared share (schema /2 ``summary.coverage.tuned.share``)."""
    if isinstance(v, dict):
        v = (v.get("tuned") or {}).get("share")
    return _num(v)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def row_from_result(data: dict | None, tuned_id: dict, base_id: dict, key: str, error: str | None = None) -> dict:
    """One table row from a compare JSON dict (or from an error line when ``data`` is None)."""
    name = safe_name(tuned_id["path"])
    row: dict[str, Any] = dict.fromkeys(NAMES)
    row.update(tuned=tuned_id["path"], name=name, base=base_id["path"], identity=key,
               tuned_commit=tuned_id.get("commit"), base_commit=base_id.get("commit"),
               tuned_files=len(tuned_id["files"]), tuned_bytes=sum(f[1] for f in tuned_id["files"]),
               base_bytes=sum(f[1] for f in base_id["files"]))
    if data is None:
        # one line, whatever the error's source wrote (distributed's messages hold newlines)
        text = " ".join(part.strip() for part in (error or "failed").splitlines() if part.strip())
        row.update(status="error", error=escape_name(text or "failed"))
        return row
    if not tuned_id["files"]:       # a Hub member: its files are the JSON's (what was read), not a local folder's
        listed = (data.get("tuned") or {}).get("files") or []
        row.update(tuned_files=len(listed), tuned_bytes=sum(int(f.get("bytes") or 0) for f in listed))
    if not base_id["files"]:
        listed = [f for b in data.get("base") or [] for f in b.get("files") or []]
        row.update(base_bytes=sum(int(f.get("bytes") or 0) for f in listed))
    s = data.get("summary") or {}
    form = s.get("form") or {}
    bracket = form.get("max_numerical_rank_bounds") if form.get("max_numerical_rank") is None else None
    cos = s.get("relatedness_cosine")
    row.update(
        status="ok", verdict=s.get("verdict"), coverage=_coverage(s.get("coverage")),
        relative_change=_num(s.get("relative_change")), one_minus_cosine=None if cos is None else max(0.0, 1.0 - cos),
        blocks_changed=s.get("blocks_changed"), blocks_total=s.get("blocks_total"),
        delta_params=s.get("delta_params"), delta_params_lower=s.get("delta_params_lower"),
        delta_params_share=_num(s.get("delta_params_share")),
        delta_params_share_lower=share_lower(s), form=form.get("kind"),
        # a bracket (the value null in the JSON): its lower end, marked, and its upper end beside it
        max_numerical_rank=form.get("max_numerical_rank") if bracket is None else bracket[0],
        max_numerical_rank_bound=None if bracket is None else "lower",
        max_numerical_rank_upper=None if bracket is None else bracket[1],
        flags=",".join(s.get("flags") or []) or None, params_total=s.get("params_total"),
        tuned_sha256=files_digest(data.get("tuned")), base_sha256=files_digest((data.get("base") or [None])[0]),
        tuned_commit=_commit(data.get("tuned")) or tuned_id.get("commit"),
        base_commit=_commit((data.get("base") or [None])[0]) or base_id.get("commit"),
        json=f"models/{name}.json")
    return row


# --- the tables -------------------------------------------------------------------------------------

def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def to_csv(rows: Sequence[dict]) -> str:
    """The rows as CSV: a header line, floats in shortest round-trip form, empty for null."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(NAMES)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in NAMES])
    return buf.getvalue()


def _parse(value: str, kind: str) -> Any:
    if value == "":
        return None
    return int(value) if kind == "int64" else float(value) if kind == "double" else value


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a survey.csv written by ``to_csv`` (typed back); [] when it has other columns. A line that does
    not parse (a cell edited to a non-number, a field past the csv module's limit) is left out, and a file that
    is not UTF-8 or not CSV gives [] (its models are measured again): a damaged table stopped a resumed survey
    with an internal error."""
    kinds = dict(COLUMNS)
    out = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header != NAMES:
                return []
            for line in reader:
                if len(line) != len(NAMES):
                    continue
                try:
                    out.append({c: _parse(v, kinds[c]) for c, v in zip(NAMES, line)})
                except ValueError:
                    continue
    except (UnicodeDecodeError, csv.Error):
        return []
    return out


def to_parquet(rows: Sequence[dict]) -> bytes:
    """The rows as a Parquet file (pyarrow, no pandas metadata): same rows, same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"string": pa.string(), "int64": pa.int64(), "double": pa.float64()}
    schema = pa.schema([(c, types[k]) for c, k in COLUMNS])
    table = pa.table({c: [r.get(c) for r in rows] for c in NAMES}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def have_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def write_tables(rows: Sequence[dict], directory: Path, parquet: bool) -> list[Path]:
    out = [write_text(directory / "survey.csv", to_csv(rows))]
    if parquet:
        out.append(write_bytes(directory / "survey.parquet", to_parquet(rows)))
    return out


# --- the survey -----------------------------------------------------------------------------------

#: the largest list file ``read_list`` reads (a million paths of 16 bytes)
LIST_CAP = 16 << 20


def read_list(path: str | os.PathLike) -> list[str]:
    """Paths from a list file: one per line; blank lines and lines starting with # are skipped, and so
    is a comment after a path (`` #`` and what follows: a path holding " #" cannot be listed). Relative
    paths are taken from the current directory, as on the command line."""
    from .io.files import read_small

    try:        # a regular file under LIST_CAP: a FIFO or /dev/zero would hang or fill the memory
        text = read_small(Path(path), LIST_CAP).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WeightdiffError(f"{path}: cannot read the list of models ({exc})", "one checkpoint path per line") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if "\0" in line:   # no file name holds one: bad input, not a row whose compare fails as a bug
            raise WeightdiffError(f"{escape_name(os.fspath(path))}: line {number} holds a NUL byte, which no path "
                                  "can hold", "one checkpoint path per line")
        line = line.strip()
        if line.startswith("#"):
            continue
        line = re.split(r"\s#", line, maxsplit=1)[0].strip()
        if line:
            out.append(line)
    return out


def survey(base: str | os.PathLike, tuned: Sequence[str | os.PathLike], out: str | os.PathLike, *,
           options: CompareOptions | None = None, hash_files: bool = False, scheduler: str | None = None,
           workers: int | None = None, memory_limit: str | None = None, client: Any = None,
           plot: bool = False, say: Callable[[str], None] = lambda m: None,
           task: Callable[..., dict] = survey_task, inputs: Sequence[str | os.PathLike] = (),
           **kwargs: Any) -> SurveyResult:
    """Compare every model of ``tuned`` with ``base`` and write the survey into ``out``.

    ``scheduler`` (an address), ``workers`` (a local cluster of that many processes) or
    ``client`` (a ``distributed.Client``) run the comparisons on Dask; with none of them,
    or without Dask installed, they run here one after another, with the same result.
    ``plot`` also draws the population figure (``population.png``/``.svg``). ``inputs``: other files the
    command read (the ``--from-file`` list), which no output may overwrite.
    ``say`` receives one progress line per model. ``task`` is the function each task runs
    (``survey_task``; tests wrap it). Raises WeightdiffError for a bad base or output folder,
    or a cluster that cannot be reached, before anything is written; ``ClusterLost`` when
    the cluster goes away during the survey (the rows done are kept, the others left for a rerun).
    """
    from .io.checkpoint import locate

    options = options if options is not None else options_from_kwargs(CompareOptions, **kwargs)
    if client is None:
        check(scheduler, workers, memory_limit)
    with locate(base) as located:     # a bad base is bad input for the whole survey: fail before writing anything
        # a Hub base: the commit every task reads (its branch may move during the survey)
        base_commit = located.hub["commit"] if located.hub else None
        base_files = None if located.hub else frozenset(os.path.realpath(f) for f in located.files)
    directory = Path(out)
    parquet = have_pyarrow()
    check_targets(directory, parquet, plot, inputs)
    if options.cache:       # the parent's folder (workers run elsewhere), checked before any work
        from dataclasses import replace

        from .measure.cache import check_folder

        options = replace(options, cache=os.path.abspath(options.cache))
        check_folder(options.cache)
    base_id = identity(base)
    if base_commit:
        base_id["commit"] = base_commit
    notices: list[str] = []
    seen = tuned_identities(tuned, base_id["path"], base_files, notices)
    if not seen:
        raise WeightdiffError("no tuned models to survey", "give TUNED paths (other than BASE) or --from-file list.txt")
    for line in notices:
        say(line)
    with contextlib.ExitStack() as stack:
        # nothing is written before the cluster is up: a fresh DIR is made only then, and an existing
        # survey's tables are rewritten only with rows (a failed connection must not drop any)
        held = directory.is_dir()
        if held:
            stack.enter_context(survey_lock(directory))
        plan = _plan(seen, base_id, directory, options, hash_files)
        run = stack.enter_context(runner(scheduler, workers, memory_limit, client, say)) if plan.todo else None
        try:
            (directory / "models").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(directory, f"cannot write here ({exc.strerror or exc})") from None
        if not held:    # a DIR made now: plan again under the lock (another survey may have made it first)
            stack.enter_context(survey_lock(directory))
            plan = _plan(seen, base_id, directory, options, hash_files)
            if plan.todo and run is None:
                run = stack.enter_context(runner(scheduler, workers, memory_limit, client, say))
        result = _survey(plan, run, base_id, directory, options, hash_files, workers, client, scheduler, plot,
                         say, task, parquet)
        result.notices[:0] = notices
        return result


def weight_files(path: str) -> frozenset[str] | None:
    """The real paths of the files a local checkpoint reads (its headers are read to find them), or None
    for a path that is not a readable local checkpoint (a Hub repo id, a missing or corrupt model: the task
    says why). One checkpoint spelled as its folder and as its single ``model.safetensors`` (or through
    a symlink) gives the same set, so a survey compares it once."""
    from .io.checkpoint import is_hub_candidate, locate
    from .io.located import weight_files as files_of

    if is_hub_candidate(path) or not os.path.exists(path):
        return None
    try:
        with locate(path) as ckpt:
            return frozenset(files_of(ckpt)[1])
    except WeightdiffError:
        return None


def tuned_identities(tuned: Sequence[str | os.PathLike], base_path: str, base_files: frozenset[str] | None,
                     notices: list[str]) -> dict[str, dict]:
    """The identity of each TUNED model to survey, by its row's ``tuned`` path. One checkpoint gets one
    row however it is spelled (``ft``, ``./ft/``, a symlink, ``ft/model.safetensors``: the same weight
    files), under the first of its spellings in sorted order, so the rows do not depend on the order of
    the list; BASE given again as a TUNED model is left out. Each model left out adds a line to
    ``notices``. A missing local path is made absolute; a Hub repo id is kept as given."""
    found: dict[object, list[dict]] = {}
    for t in dict.fromkeys(tuned):      # one spelling listed many times is looked up once
        tid = hub_identity(identity(t))
        files = weight_files(tid["path"])
        if files is None:
            real = os.path.realpath(tid["path"]) if os.path.exists(tid["path"]) else tid["path"]
            key: object = real
        else:
            key = files
        if key == base_files or (files is None and key == os.path.realpath(base_path)):
            notices.append(f"{escape_name(os.fspath(t))}: the BASE itself (the same weight files): not surveyed")
            continue
        found.setdefault(key, []).append(tid)
    seen: dict[str, dict] = {}
    for tids in found.values():
        keep = min(tids, key=lambda x: x["path"])
        seen.setdefault(keep["path"], keep)
        for other in sorted({x["path"] for x in tids} - {keep["path"]}):
            notices.append(f"{escape_name(other)}: the same checkpoint as {escape_name(keep['path'])} "
                           "(the same weight files): surveyed once")
    return seen


@dataclass
class Plan:
    """What a survey run does: the rows it keeps (done with these inputs), the models it compares, and
    the previous rows (by ``tuned``) it keeps in the tables until each model's new row replaces them."""

    rows: dict[str, dict]
    todo: list[tuple[dict, str]]
    previous: dict[str, dict]
    total: int


def _plan(seen: dict[str, dict], base_id: dict, directory: Path, options: CompareOptions, hash_files: bool) -> Plan:
    csv_path = directory / "survey.csv"
    previous = {r["tuned"]: r for r in read_csv(csv_path)} if csv_path.is_file() else {}
    rows: dict[str, dict] = {}
    todo: list[tuple[dict, str]] = []
    hashed: dict[str, str] = {}
    for path, tid in sorted(seen.items()):
        key = identity_key(base_id, tid, options, hash_files)
        old = previous.get(path)
        done = _kept_row(old, tid, base_id, key, directory) \
            if old and old.get("status") == "ok" and old.get("identity") == key else None
        if done is not None and (not hash_files or digests_hold(done, directory, hashed)):
            rows[path] = done
        else:
            todo.append((tid, key))
    return Plan(rows, todo, previous, len(seen))


def _kept_row(old: dict, tid: dict, base_id: dict, key: str, directory: Path) -> dict | None:
    """A done row, rebuilt from the model's JSON this survey wrote (``DIR/models/<name>.json``), never taken from
    the table's cells: a row edited in survey.csv (verdict, numbers, a ``json`` cell naming a file outside DIR) was
    republished as it was. None (measure again) when that JSON is not a regular file in ``models/``, or does not
    give back the row's own name."""
    name = old.get("json")                  # (a linked models/ folder is refused before: check_targets)
    if not isinstance(name, str) or Path(name).parent != Path("models") or Path(name).name in ("", ".", ".."):
        return None
    p = directory / name
    try:
        if p.is_symlink() or not p.is_file():
            return None
        data = json.loads(p.read_text(encoding="utf-8"))
        row = row_from_result(data, tid, base_id, key)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None
    return row if row.get("json") == name else None


def check_targets(directory: Path, parquet: bool, plot: bool, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """OutputError (exit 2) before any work when a file the survey writes is a folder here, or
    ``models`` is not one: found at the end, such a path cost the whole survey; or when it is one of ``inputs``
    (the ``--from-file`` list kept as ``DIR/survey.csv`` was replaced by the table)."""
    wanted = [("models", True), ("survey.csv", False)]
    wanted += [("survey.parquet", False)] if parquet else []
    wanted += [("population.png", False), ("population.svg", False)] if plot else []
    if directory.exists() and not directory.is_dir():
        raise OutputError(directory, "is a file, expected a folder for the survey")
    for name, folder in wanted:
        p = directory / name
        if p.is_symlink():
            # the survey writes DIR's files in place as it goes: through a link it wrote (or filled a folder)
            # outside DIR
            raise OutputError(p, "is a symbolic link: the survey writes its files inside its folder only",
                              "remove the link, or give --out a folder of the survey's own")
        for src in inputs:
            if p.exists() and os.path.exists(src) and os.path.samefile(p, src):
                raise OutputError(p, f"is the list of models this command reads ({os.fspath(src)}); writing the "
                                     "survey there would overwrite it", "keep the list outside the survey's folder")
        if folder and p.exists() and not p.is_dir():
            raise OutputError(p, "is a file, expected the folder of the models' JSON files")
        if not folder and p.is_dir():
            raise OutputError(p, "is a folder, expected a file name")


LOCK_NAME = ".survey.lock"


@contextlib.contextmanager
def survey_lock(directory: Path) -> Iterator[None]:
    """Hold ``DIR/.survey.lock`` (an flock, released when the process ends however it ends) while
    surveying: a second survey into the same DIR rewrote the tables from the rows it had read at start
    and dropped the other's rows. It is refused instead (exit 2, naming the other's pid and host)."""
    path = directory / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(path, f"cannot write here ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            finally:
                os.close(fd)
            raise SurveyBusy(f"{escape_name(os.fspath(directory))} is being written by another survey ({holder}; "
                             f"{escape_name(os.fspath(path))})",
                             "wait for it to finish, or give this survey another --out") from None
        try:       # the file locked must still be the one at the path (a finishing survey unlinks it)
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


class SurveyBusy(WeightdiffError):
    """Another survey holds the output folder."""


def _survey(plan: Plan, run: Any, base_id: dict, directory: Path, options: CompareOptions, hash_files: bool,
            workers, client, scheduler, plot: bool, say: Callable[[str], None], task: Callable[..., dict],
            parquet: bool) -> SurveyResult:
    task_options = options
    if workers and client is None and scheduler is None and options.threads is None:
        from dataclasses import replace

        task_options = replace(options, threads=worker_threads(workers))   # results do not depend on threads
    result = SurveyResult(rows=[], directory=directory, skipped=len(plan.rows))
    if not parquet:
        result.notices.append(f"survey.parquet not written: pyarrow is not installed ({PANDAS_HINT}); "
                              "wrote survey.csv only")
        say(result.notices[-1])
    rows = dict(plan.rows)
    todo = plan.todo
    if result.skipped:
        say(f"{result.skipped} of {plan.total} models already surveyed with these inputs and options: skipped")

    def table(final: bool = False) -> list[dict]:
        # until the run ends, a model not compared yet keeps its previous row (and so does a model not
        # in this list): a run that stops early (a lost cluster, a signal) drops no row; a rerun compares
        # the stale ones again, as their identity says
        keep = rows if final else {**plan.previous, **rows}
        return [keep[p] for p in sorted(keep)]

    if todo:
        say(f"surveying {len(todo)} model(s) on {run.description}")
        # absolute paths: workers of a --scheduler cluster do not share this process's directory
        args = [(base_id["path"], tid["path"], task_options, hash_files) + _pins(base_id, tid) for tid, _ in todo]
        tables = _Batched(lambda: write_tables(table(), directory, parquet))
        beat = Heartbeat(say, [sum(int(f[1]) for f in tid.get("files") or ()) for tid, _ in todo])
        try:
            for done, oc in enumerate(beat.watch(run.map(task, args, name="survey")), start=1):
                beat.finished(oc.index)
                tid, key = todo[oc.index]
                rows[tid["path"]] = _finish(oc, tid, base_id, key, directory)
                r = rows[tid["path"]]
                if r["status"] == "ok":
                    result.computed += 1
                    say(f"[{done}/{len(todo)}] {escape_name(tid['path'])}: {r['verdict']}")
                else:
                    result.failed += 1
                    say(f"[{done}/{len(todo)}] {escape_name(tid['path'])}: error: {r['error']}")
                tables.changed()
        except BaseException as exc:
            tables.flush()          # a run that stops early (a lost cluster, SIGINT, SIGTERM) keeps the rows done
            if not isinstance(exc, ClusterLost):
                raise
            done = result.computed + result.failed
            raise ClusterLost(exc.message, f"{done} of the {len(todo)} models to compare done, their rows kept in "
                              f"{escape_name(os.fspath(directory / 'survey.csv'))}; rerun the same command to "
                              f"compare the other {len(todo) - done}") from None
    result.rows = table(final=True)
    result.files = write_tables(result.rows, directory, parquet)
    if plot:
        from .render.population import save_population

        result.files += save_population(result.rows, directory)
    return result


#: a survey's progress line while no model finishes, every this many seconds (its comparisons run in worker
#: processes, whose own progress lines nobody sees: a 70B-width model is an hour of silence between two rows)
BEAT_SECONDS = 30.0


class Heartbeat:
    """The survey's progress between rows: every ``every`` seconds without a model finished, a line with the models
    and the tuned models' bytes done of the total, the time so far and an ETA from the bytes finished per second
    (the models done; with several workers, their throughput). Models whose size is not known here (a Hub id) count
    by number. ``line(now)`` is the text (pure, for tests); ``watch(outcomes)`` runs a daemon thread beside the
    iteration and stops it when the iteration ends, however it ends."""

    def __init__(self, say: Callable[[str], None], sizes: Sequence[int], every: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.say, self.sizes, self.clock = say, [int(x) for x in sizes], clock
        self.every = BEAT_SECONDS if every is None else float(every)
        self.t0 = self.row_at = self.said_at = clock()
        self.done: set[int] = set()

    def finished(self, index: int) -> None:
        """Model ``index`` (of ``sizes``) finished (its row is said by the caller)."""
        self.done.add(int(index))
        self.row_at = self.said_at = self.clock()

    def line(self, now: float) -> str:
        n, total = len(self.done), len(self.sizes)
        el = now - self.t0
        if self.sizes and all(self.sizes):
            got, whole = sum(self.sizes[i] for i in self.done), sum(self.sizes)
            share = f" ({got / 1e9:,.1f} of {whole / 1e9:,.1f} GB of tuned weights)"
        else:
            got, whole, share = n, total, ""
        eta = (f"ETA {(whole - got) / (got / el):,.0f} s (from the models done)" if got and el > 0
               else "ETA not yet known (no model done)")
        return (f"survey: {n} of {total} models compared{share}, {el:,.0f} s so far, "
                f"{now - self.row_at:,.0f} s since the last one, {eta}")

    def beat(self) -> None:
        """The line, when ``every`` seconds passed since the last row or line."""
        now = self.clock()
        if now - self.said_at >= self.every:
            self.said_at = now
            self.say(self.line(now))

    def watch(self, outcomes: Iterator) -> Iterator:
        import threading

        stop = threading.Event()

        def run() -> None:
            while not stop.wait(min(self.every, 5.0)):
                try:
                    self.beat()
                except (OSError, ValueError):      # stderr closed under us: nothing more to say
                    return

        thread = threading.Thread(target=run, name="weightdiff-survey-progress", daemon=True)
        thread.start()
        try:
            yield from outcomes
        finally:
            stop.set()
            thread.join()


#: while a survey runs, its tables are rewritten at most this often (seconds), and then after the last
#: row or when the run stops early: rewriting and fsyncing them whole after every row made a survey
#: quadratic in its list (3,000 missing paths took 87 s: 3,001 rewrites of a growing table)
TABLE_SECONDS = 5.0


class _Batched:
    """Calls ``write`` when rows changed and ``TABLE_SECONDS`` (or ten times the last write's duration,
    whichever is longer: writing stays a tenth of the run) have passed since the last write; ``flush``
    writes what is pending at once."""

    def __init__(self, write: Callable[[], object]):
        self.write, self.pending = write, False
        self.due = time.monotonic() + TABLE_SECONDS

    def changed(self) -> None:
        self.pending = True
        if time.monotonic() >= self.due:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        start = time.monotonic()
        self.write()
        self.pending = False
        took = time.monotonic() - start
        self.due = time.monotonic() + max(TABLE_SECONDS, 10.0 * took)


def _finish(oc: Outcome, tid: dict, base_id: dict, key: str, directory: Path) -> dict:
    """The row for one outcome; an ok result's JSON is written first, so a row never points nowhere."""
    value = oc.value if isinstance(oc.value, dict) else {}
    text = value.get("json")
    if oc.error is not None or text is None:
        return row_from_result(None, tid, base_id, key, oc.error or value.get("error"))
    data = json.loads(text)
    row = row_from_result(data, tid, base_id, key)
    write_text(directory / row["json"], text)
    return row
