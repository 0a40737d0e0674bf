"""Pseudo-targets (PTs): teacher outputs for labeled and unlabeled inputs, generated once and stored on disk.

A PT is identified by (teacher fingerprint, decoding spec fingerprint, input key, sample index): the input key
is the sha256 of the source text the teacher reads, so an input that appears in two splits is generated once.
Generation asks the store what is missing, generates only that, and adds the results as one new shard:

    store = PTStore("runs/xsum/pts")
    spec = get_spec("sample_t15")
    todo = store.missing(teacher_fp, spec, [e.source for e in examples])    # [MissingPT(key, index, source), ...]
    ...generate `todo` (seeds from `sample_seed`; `distilgen.pt_generation.generate_pts` does all this)...
    store.add(teacher_fp, spec, [PTRecord(key, index, text, token_ids, seed), ...])
    pts = store.get(teacher_fp, spec, [e.source for e in examples])        # {input_key: [PTRecord, ...]}
    items = pt_schedule(examples, pts, k=spec.num_per_input, epoch=epoch)   # what each example trains on

On disk (see [store layout note]):

    root/manifest.json            the shards that count, each with rows, tokens, bytes and sha256
    root/shards/<uuid>.parquet    immutable; one per `add`
    root/.lock                    file lock serialising writers (and the recovery on open)
    root/quarantine/              shards set aside as unreadable (never deleted)
    root/claims/                  which inputs each running writer is generating (see [claims note])
    root/journal/                 a paid teacher's answers not yet in a shard, one file per writer ([journal note])
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import os
import socket
import statistics
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock

from distilgen.config import SPECS, DecodingSpec, get_spec, register_spec  # noqa: F401 (specs are named here too)
from distilgen.data import Example
from distilgen.generation import input_key, sample_seed  # noqa: F401 (PT seeds are named here too)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Seeds: a sampled PT depends only on (base seed, input, sample index)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PTRecord:
    """One stored PT: the teacher's text and tokens for one input and sample index."""

    input_key: str
    """`input_key(source)` of the input."""
    sample_index: int
    """0..K-1: the sample, or the rank of the beam."""
    text: str
    """The decoded PT."""
    token_ids: list[int]
    """The teacher's tokens of the PT (no special tokens), the positions `topk_*` describe."""
    seed: int | None = None
    """The seed it was sampled with (`sample_seed`); None for greedy and beam PTs."""
    topk_ids: list[list[int]] | None = None
    """Per PT token, the teacher's k most likely token ids (any k, chosen by the caller)."""
    topk_logprobs: list[list[float]] | None = None
    """Per PT token, the teacher's log-probabilities of its top-k (`topk_ids` or `topk_bytes`) over its full
    vocabulary (stored as float32)."""
    token_bytes: list[bytes] | None = None
    """A teacher without a vocabulary here (an API's): its tokens as the bytes they write; `token_ids` is empty, and
    each student maps them onto its own vocabulary (`token_alignment`)."""
    topk_bytes: list[list[bytes]] | None = None
    """...and per token, its top-k candidates as bytes (in place of `topk_ids`)."""

    @property
    def num_tokens(self) -> int:
        """The teacher's tokens in the PT: the positions the top-k describe."""
        return len(self.token_bytes) if self.token_bytes is not None else len(self.token_ids)

    def check(self) -> None:
        """A ValueError if the fields are inconsistent (top-k given for some other number of tokens)."""
        where = f"PT ({self.input_key[:12]}, {self.sample_index})"
        if self.sample_index < 0:
            raise ValueError(f"{where}: sample_index must be >= 0")
        candidates = self.topk_ids if self.topk_bytes is None else self.topk_bytes
        if self.topk_ids is not None and self.topk_bytes is not None:
            raise ValueError(f"{where}: give topk_ids or topk_bytes, not both")
        if self.topk_bytes is not None and self.token_bytes is None:
            raise ValueError(f"{where}: topk_bytes describe token_bytes: give them too")
        if (candidates is None) != (self.topk_logprobs is None):
            raise ValueError(f"{where}: give both top-k candidates and topk_logprobs, or neither")
        if candidates is not None:
            if not len(candidates) == len(self.topk_logprobs) == self.num_tokens:
                raise ValueError(
                    f"{where}: top-k for {len(candidates)}/{len(self.topk_logprobs)} positions, "
                    f"but {self.num_tokens} tokens"
                )
            if any(len(i) != len(p) for i, p in zip(candidates, self.topk_logprobs, strict=True)):
                raise ValueError(f"{where}: top-k candidates and topk_logprobs differ in length at some position")


class MissingPT(NamedTuple):
    """A PT the store lacks: generate sample `sample_index` of `source`."""

    input_key: str
    sample_index: int
    source: str


@dataclass(frozen=True)
class PTStats:
    """What the store holds for one (teacher, spec)."""

    teacher_fp: str
    spec_fp: str
    spec_name: str
    inputs: int
    pts: int
    tokens: int
    bytes: int
    topk: int
    """Largest top-k stored (0: texts and tokens only)."""

    @property
    def bytes_per_million_tokens(self) -> float:
        return self.bytes / max(self.tokens, 1) * 1e6


SCHEMA = pa.schema(
    [
        ("teacher_fp", pa.string()),
        ("spec_fp", pa.string()),
        ("input_key", pa.string()),
        ("sample_index", pa.int32()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("seed", pa.int64()),
        ("token_bytes", pa.list_(pa.binary())),
        ("topk_bytes", pa.list_(pa.list_(pa.binary()))),
    ]
)
_RECORD_COLUMNS = [f.name for f in dataclasses.fields(PTRecord)]
_ADDED_COLUMNS = ("token_bytes", "topk_bytes")
"""Columns later versions added: shards written before them are read as they are."""
_MANIFEST_FORMAT = 1


@dataclass
class _PairIndex:
    """Where each PT of one (teacher, spec) lives; built from the key columns of its shards, in manifest order."""

    files: list[str] = dataclasses.field(default_factory=list)
    where: dict[str, dict[int, tuple[str, int]]] = dataclasses.field(default_factory=dict)
    """input_key -> sample_index -> (shard file, row); the first shard to hold a PT wins."""

    def add(self, file: str, keys: Sequence[str], indices: Sequence[int]) -> None:
        self.files.append(file)
        for row, (key, index) in enumerate(zip(keys, indices, strict=True)):
            self.where.setdefault(key, {}).setdefault(index, (file, row))


class PTStoreError(ValueError):
    """A store that cannot be used as it is (an unreadable manifest, a store path that is a file): one line
    naming the file and how to recover; nothing on disk was changed."""


_ENTRY_KEYS = {"file", "teacher_fp", "spec_fp", "rows", "tokens", "topk", "bytes", "sha256"}
_SPEC_METADATA = b"distilgen.spec"
"""Parquet metadata key under which a shard carries its spec, so a lost manifest can be rebuilt in full."""


CLAIM_TTL_S = 1800.0
"""A claim not renewed for this long is stale: its writer hung, or runs on a machine that is gone."""


def _process_alive(host: str, pid: int) -> bool:
    """Whether process `pid` of `host` may still run (a process of another machine cannot be checked: yes)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


class PTStore:
    """PTs on disk: Parquet shards listed in a manifest, indexed in memory per (teacher, spec) on first use.

    [store layout note] Shards are immutable; the manifest says which count. `add` writes its shard to a
    temporary name, fsyncs and renames it, then replaces the manifest (temp file + `os.replace`), all under
    `root/.lock`: a crash at any point leaves the previous manifest. Nothing is ever deleted that may be the only
    copy of paid-for PTs (an API teacher's): when a store is opened, a complete shard the manifest does not list
    (a writer crashed before its commit, or the manifest was lost) is verified and adopted, its rows and spec read
    from the shard itself; a shard that cannot be read, or whose sha256 disagrees with the manifest, is moved to
    `root/quarantine/` and its PTs are reported missing. A manifest that cannot be read is a `PTStoreError`, with
    nothing touched. A `readonly` store (`distilgen pts show`) does all this in memory and writes nothing.

    [claims note] Two `distilgen generate` runs started on one store (not sharded by `accelerate launch`) would
    each plan every missing PT. Before decoding a batch, a writer claims its inputs (`claim`, a file per writer
    under `root/claims/`, updated under the lock) and skips inputs another live writer holds; it releases its
    claims once their PTs are stored. A claim whose process has exited (same machine) or that was not renewed for
    `CLAIM_TTL_S` no longer counts. Claims only avoid duplicate work: a PT generated twice is stored once.

    [journal note] A paid teacher's answer (an API's) must not be lost between its arrival and the next shard: the
    writer appends each to its journal (`journal`, a fsynced JSON line) and empties it (`clear_journal`) once the
    buffered PTs are in a shard. When a store is opened, the journals of writers that are gone become a shard, so a
    killed run loses only the requests in flight, and its rerun never asks again for what was answered.
    """

    def __init__(self, root: str | os.PathLike, readonly: bool = False):
        self.root = Path(root)
        self.readonly = readonly
        if self.root.exists() and not self.root.is_dir():
            raise PTStoreError(f"{self.root}: the PT store must be a directory, but this is a file")
        if not readonly:
            try:
                (self.root / "shards").mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise PTStoreError(f"{self.root}: cannot create the PT store ({err.strerror})") from None
        self._lock = contextlib.nullcontext() if readonly else FileLock(self.root / ".lock")
        self._manifest: dict[str, Any] = {}
        self._index: dict[tuple[str, str], _PairIndex] = {}
        self._unlisted: list[dict] = []
        """Readonly: shards adopted in memory only (and their specs, below)."""
        self._unlisted_specs: dict[str, dict] = {}
        self._skipped: set[str] = set()
        """Readonly: unreadable shards left where they are and ignored."""
        self._owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._held: dict[str, set[str]] = {}
        self._journal: Any = None
        """This writer's open (and locked) journal file, while it holds PTs not yet in a shard."""
        """Input keys this object has claimed, by "teacher_fp:spec_fp"."""
        with self._lock:
            self._reload()
            self._adopt_unlisted()
            if not readonly:
                self._recover_journals()

    # Queries -------------------------------------------------------------------------------------

    def missing(self, teacher_fp: str, spec: DecodingSpec, sources: Sequence[str]) -> list[MissingPT]:
        """The PTs of `sources` (samples 0..spec.num_per_input-1) not stored yet, in input order; repeated
        sources count once."""
        index = self._pair_index(teacher_fp, spec.fingerprint())
        todo = []
        for source, key in _unique_keys(sources).items():
            stored = index.where.get(key, {})
            todo += [MissingPT(key, i, source) for i in range(spec.num_per_input) if i not in stored]
        return todo

    def get(
        self, teacher_fp: str, spec: DecodingSpec | str, sources: Sequence[str], every_index: bool = False
    ) -> dict[str, list[PTRecord]]:
        """The stored PTs of `sources` with index < spec.num_per_input: {input_key: records by sample index}.

        Inputs with nothing stored are absent; see `missing` for what is left to generate. `every_index` returns
        every stored PT of the inputs, however many (for inspection; `spec` may then be a spec fingerprint).
        """
        spec_fp = spec if isinstance(spec, str) else spec.fingerprint()
        index = self._pair_index(teacher_fp, spec_fp)
        rows_by_file: dict[str, list[int]] = {}
        for key in _unique_keys(sources).values():
            for sample_index, (file, row) in index.where.get(key, {}).items():
                if every_index or sample_index < spec.num_per_input:
                    rows_by_file.setdefault(file, []).append(row)
        pts: dict[str, list[PTRecord]] = {}
        for file, rows in rows_by_file.items():
            present = set(pq.read_schema(self.root / file).names)  # shards from before token_bytes lack it
            table = pq.read_table(self.root / file, columns=[c for c in _RECORD_COLUMNS if c in present]).take(rows)
            for record in table.to_pylist():
                pts.setdefault(record["input_key"], []).append(PTRecord(**record))
        return {key: sorted(records, key=lambda r: r.sample_index) for key, records in pts.items()}

    def stats(self) -> list[PTStats]:
        """One line per (teacher, spec) stored: inputs, PTs, teacher tokens, bytes on disk, top-k size."""
        self._reload()
        lines = []
        for (teacher_fp, spec_fp), entries in self._entries_by_pair().items():
            index = self._load_pair(teacher_fp, spec_fp)
            entries = [e for e in entries if e["file"] in index.files]  # without shards set aside just now
            lines.append(
                PTStats(
                    teacher_fp=teacher_fp,
                    spec_fp=spec_fp,
                    spec_name=self._manifest["specs"].get(spec_fp, {}).get("name", "unknown"),
                    inputs=len(index.where),
                    pts=sum(len(stored) for stored in index.where.values()),
                    tokens=sum(e["tokens"] for e in entries),
                    bytes=sum(e["bytes"] for e in entries),
                    topk=max((e["topk"] for e in entries), default=0),
                )
            )
        return lines

    def pair_stats(self, teacher_fp: str, spec: DecodingSpec) -> PTStats | None:
        """`stats` of one (teacher, spec); None when nothing is stored for it."""
        key = (teacher_fp, spec.fingerprint())
        return next((s for s in self.stats() if (s.teacher_fp, s.spec_fp) == key), None)

    def spec(self, spec_fp: str) -> DecodingSpec | None:
        """The spec stored under fingerprint `spec_fp` (as first added; counts may differ from later calls); None
        for PTs adopted from shards written before shards carried their spec, until the spec is used again."""
        self._reload()
        fields = self._manifest["specs"].get(spec_fp)
        return DecodingSpec(**fields) if fields is not None else None

    # Writing -------------------------------------------------------------------------------------

    def add(self, teacher_fp: str, spec: DecodingSpec, records: Sequence[PTRecord]) -> Path | None:
        """Store `records` as one new shard and return its path; PTs already stored (or repeated in `records`)
        are skipped, and None is returned when nothing was new. Safe against crashes and concurrent writers."""
        if self.readonly:
            raise RuntimeError(f"{self.root}: opened read-only")
        for record in records:
            record.check()
        spec_fp = spec.fingerprint()
        with self._lock:
            index = self._pair_index(teacher_fp, spec_fp)  # under the lock: includes every other writer's shards
            new, seen = [], set()
            for r in records:
                if (r.input_key, r.sample_index) not in seen and r.sample_index not in index.where.get(r.input_key, {}):
                    seen.add((r.input_key, r.sample_index))
                    new.append(r)
            if not new:
                return None
            columns = {name: [getattr(r, name) for r in new] for name in _RECORD_COLUMNS}
            columns.update(teacher_fp=[teacher_fp] * len(new), spec_fp=[spec_fp] * len(new))
            schema = SCHEMA.with_metadata({_SPEC_METADATA: json.dumps(dataclasses.asdict(spec))})
            table = pa.Table.from_pydict(columns, schema=schema)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            data = sink.getvalue().to_pybytes()
            file = f"shards/{uuid.uuid4().hex}.parquet"
            write_atomic(self.root / file, data)
            entry = _shard_entry(file, teacher_fp, spec_fp, table, data)
            manifest = {
                **self._manifest,
                "specs": {spec_fp: dataclasses.asdict(spec), **self._manifest["specs"]},
                "shards": [*self._manifest["shards"], entry],
            }
            self._write_manifest(manifest)  # the commit point: before it, the shard is not listed
            self._manifest = manifest
            index.add(file, [r.input_key for r in new], [r.sample_index for r in new])
        return self.root / file

    # The journal: a paid teacher's answers, kept from the moment they arrive -------------------

    def journal(self, teacher_fp: str, spec: DecodingSpec, records: Sequence[PTRecord]) -> None:
        """Append `records` to this writer's journal, one fsynced line each. See [journal note]."""
        if self.readonly:
            raise RuntimeError(f"{self.root}: opened read-only")
        if self._journal is None:
            path = self.root / "journal" / f"{self._owner}.jsonl"
            path.parent.mkdir(exist_ok=True)
            self._journal = open(path, "a")  # noqa: SIM115 (held, and locked, until its PTs are in a shard)
            fcntl.flock(self._journal, fcntl.LOCK_EX)  # held while this writer lives: see `_recover_journals`
        lines = "".join(
            json.dumps({"teacher_fp": teacher_fp, "spec": dataclasses.asdict(spec), "record": _to_json(r)}) + "\n"
            for r in records
        )
        self._journal.write(lines)
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def clear_journal(self) -> None:
        """Forget this writer's journal: everything in it has been `add`ed."""
        if self._journal is not None:
            (self.root / "journal" / f"{self._owner}.jsonl").unlink(missing_ok=True)
            self._journal.close()  # (releases the lock)
            self._journal = None

    def _recover_journals(self) -> None:
        """Add the journaled PTs of writers that are gone (killed before their shard) to the store, then drop their
        journals; a line cut by the kill is skipped (its answer is lost, as one in flight). A writer holds an
        exclusive lock on its journal while it lives (the system drops it when the process ends, even killed), so
        a journal that can be locked is a dead writer's."""
        folder = self.root / "journal"
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            with open(path, "a+") as held:
                try:
                    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer's
                self._recover_journal(path)
                path.unlink()

    def _recover_journal(self, path: Path) -> None:
        """Add the PTs journaled in `path` (grouped by teacher and spec)."""
        groups: dict[tuple[str, str], tuple[DecodingSpec, list[PTRecord]]] = {}
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                spec, record = DecodingSpec(**entry["spec"]), _from_json(entry["record"])
            except (ValueError, KeyError, TypeError):
                continue
            groups.setdefault((entry["teacher_fp"], spec.fingerprint()), (spec, []))[1].append(record)
        for (teacher_fp, _), (spec, records) in groups.items():
            self.add(teacher_fp, spec, records)
        if groups:
            log.warning("%s: %d journaled PTs of a writer that stopped early were added", self.root,
                        sum(len(r) for _, r in groups.values()))  # fmt: skip

    # Claims: independent writers skip each other's inputs --------------------------------------

    def claim(self, teacher_fp: str, spec_fp: str, keys: Sequence[str]) -> set[str]:
        """Claim the inputs `keys` of (teacher, spec) for this store object to generate, except those another live
        writer holds; returns the keys granted. See [claims note]."""
        with self._lock:
            taken = set()
            for owner, claim in self._claims().items():
                if owner != self._owner:
                    taken.update(claim["keys"].get(f"{teacher_fp}:{spec_fp}", ()))
            granted = set(keys) - taken
            self._held.setdefault(f"{teacher_fp}:{spec_fp}", set()).update(granted)
            self._write_claim()
        return granted

    def release(self) -> None:
        """Drop this store object's claims (its PTs are stored, or it gives up)."""
        if self._held:
            with self._lock:
                self._held.clear()
                (self.root / "claims" / f"{self._owner}.json").unlink(missing_ok=True)

    def _claims(self) -> dict[str, dict]:
        """The live claims by owner; stale ones (owner gone, or not renewed for CLAIM_TTL_S) are deleted."""
        claims = {}
        for path in sorted((self.root / "claims").glob("*.json")):
            try:
                claim = json.loads(path.read_text())
                alive = time.time() - claim["time"] < CLAIM_TTL_S and _process_alive(claim["host"], claim["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                alive = False  # unreadable: a claim is only a hint, never data
            if alive:
                claims[path.stem] = claim
            else:
                path.unlink(missing_ok=True)
        return claims

    def _write_claim(self) -> None:
        claim = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        claim["keys"] = {pair: sorted(keys) for pair, keys in self._held.items()}
        path = self.root / "claims" / f"{self._owner}.json"
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")  # renamed whole, not fsynced: a claim is a hint, never data
        tmp.write_text(json.dumps(claim))
        os.replace(tmp, path)

    # Internals -----------------------------------------------------------------------------------

    def _reload(self) -> None:
        """Re-read the manifest (other processes may have added shards) and forget indexes it invalidates."""
        path = self.root / "manifest.json"
        manifest = _read_manifest(path) if path.exists() else {"format": _MANIFEST_FORMAT, "specs": {}, "shards": []}
        listed = {e["file"] for e in manifest["shards"]}
        manifest["shards"] += [e for e in self._unlisted if e["file"] not in listed]
        manifest["shards"] = [e for e in manifest["shards"] if e["file"] not in self._skipped]
        manifest["specs"] = {**self._unlisted_specs, **manifest["specs"]}
        self._manifest = manifest
        files = self._entries_by_pair()
        for pair, index in list(self._index.items()):
            current = [e["file"] for e in files.get(pair, [])]
            if current[: len(index.files)] != index.files:  # a shard was set aside: rebuild on next use
                del self._index[pair]

    def _entries_by_pair(self) -> dict[tuple[str, str], list[dict]]:
        pairs: dict[tuple[str, str], list[dict]] = {}
        for entry in self._manifest["shards"]:
            pairs.setdefault((entry["teacher_fp"], entry["spec_fp"]), []).append(entry)
        return pairs

    def _pair_index(self, teacher_fp: str, spec_fp: str) -> _PairIndex:
        self._reload()
        return self._load_pair(teacher_fp, spec_fp)

    def _load_pair(self, teacher_fp: str, spec_fp: str) -> _PairIndex:
        """The index of (teacher, spec), reading the key columns of shards it has not seen (checking each)."""
        index = self._index.setdefault((teacher_fp, spec_fp), _PairIndex())
        for entry in self._entries_by_pair().get((teacher_fp, spec_fp), [])[len(index.files) :]:
            try:  # a shard that cannot be *read* (permissions, I/O) raises: only bad content is set aside
                data = (self.root / entry["file"]).read_bytes()
                if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise ValueError("checksum mismatch")
                keys = pq.read_table(pa.BufferReader(data), columns=["input_key", "sample_index"])
                if keys.num_rows != entry["rows"]:
                    raise ValueError(f"{keys.num_rows} rows, the manifest says {entry['rows']}")
            except (FileNotFoundError, ValueError, pa.ArrowException) as err:
                self._set_aside(entry["file"], str(err), entry["rows"])
                continue
            index.add(entry["file"], keys["input_key"].to_pylist(), keys["sample_index"].to_pylist())
        return index

    def _set_aside(self, file: str, reason: str, rows: int | None) -> None:
        """Stop counting an unreadable shard: moved to quarantine/ and dropped from the manifest (readonly: skipped
        in memory). Its PTs are reported missing, so `generate` makes them again."""
        pts = f"its {rows} PTs" if rows is not None else "its PTs"
        if self.readonly:
            log.warning("%s: unreadable PT shard (%s); skipped (%s count as missing)", self.root / file, reason, pts)
            self._skipped.add(file)
        else:
            with self._lock:
                quarantine = self.root / "quarantine"
                quarantine.mkdir(exist_ok=True)
                if (self.root / file).exists():
                    os.replace(self.root / file, quarantine / Path(file).name)
                path = self.root / "manifest.json"
                if path.exists():
                    manifest = _read_manifest(path)
                    manifest["shards"] = [e for e in manifest["shards"] if e["file"] != file]
                    self._write_manifest(manifest)
            log.warning(
                "%s: unreadable PT shard (%s); moved to %s/, %s will be generated again",
                self.root / file, reason, quarantine, pts,
            )  # fmt: skip
        self._manifest["shards"] = [e for e in self._manifest["shards"] if e["file"] != file]

    def _adopt_unlisted(self) -> None:
        """List the complete shards the manifest lacks (a writer crashed before its commit, or the manifest was
        lost), reading their rows and spec from the shards themselves; set aside those that cannot be read."""
        folder = self.root / "shards"
        listed = {entry["file"] for entry in self._manifest["shards"]} | self._skipped
        unlisted = [p for p in sorted(folder.iterdir()) if f"shards/{p.name}" not in listed] if folder.is_dir() else []
        adopted, specs = [], {}
        for path in unlisted:
            try:
                entry, spec = _entry_of_shard(path)
            except (ValueError, pa.ArrowException) as err:
                self._set_aside(f"shards/{path.name}", str(err), None)
                continue
            adopted.append(entry)
            if spec is not None:
                specs[entry["spec_fp"]] = spec
        if not adopted:
            return
        log.warning(
            "%s: %d PT shards (%d PTs) were not in the manifest (an interrupted run, or a lost manifest); %s",
            self.root, len(adopted), sum(e["rows"] for e in adopted),
            "using them without writing (read-only)" if self.readonly else "adding them to it",
        )  # fmt: skip
        if self.readonly:
            self._unlisted, self._unlisted_specs = adopted, specs
            self._reload()
            return
        manifest = {
            **self._manifest,
            "specs": {**specs, **self._manifest["specs"]},
            "shards": [*self._manifest["shards"], *adopted],
        }
        self._write_manifest(manifest)
        self._manifest = manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        write_atomic(self.root / "manifest.json", json.dumps(manifest, indent=1).encode())


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at `path`, checked; a `PTStoreError` saying how to recover when it cannot be used."""
    recover = (
        "nothing was changed; to recover, move it aside (mv manifest.json manifest.json.bad) and rerun: the store "
        "rebuilds its manifest from the shards"
    )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise PTStoreError(f"{path}: unreadable PT store manifest (not UTF-8 text); {recover}") from None
    except json.JSONDecodeError as err:
        raise PTStoreError(
            f"{path}: unreadable PT store manifest ({err.msg} at line {err.lineno}); {recover}"
        ) from None
    if isinstance(manifest, dict) and "format" in manifest and manifest["format"] != _MANIFEST_FORMAT:
        raise PTStoreError(
            f"{path}: PT store manifest format {manifest['format']!r}, this distilgen reads {_MANIFEST_FORMAT}"
        )
    valid = (
        isinstance(manifest, dict)
        and isinstance(manifest.get("specs"), dict)
        and isinstance(manifest.get("shards"), list)
        and all(isinstance(e, dict) and e.keys() >= _ENTRY_KEYS for e in manifest["shards"])
    )
    if not valid:
        raise PTStoreError(f"{path}: not a PT store manifest (expected format, specs and shards); {recover}")
    return manifest


def _entry_of_shard(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The manifest entry of a complete shard file, and its spec's fields when the shard carries them."""
    if path.suffix != ".parquet":
        raise ValueError("not a shard (an incomplete write)")
    data = path.read_bytes()
    table = pq.read_table(pa.BufferReader(data))
    if not set(SCHEMA.names) - set(_ADDED_COLUMNS) <= set(table.column_names):
        raise ValueError("not a PT shard (columns differ)")
    pairs = {(t, s) for t, s in zip(table["teacher_fp"].to_pylist(), table["spec_fp"].to_pylist(), strict=True)}
    if len(pairs) != 1:
        raise ValueError(f"{len(pairs)} (teacher, spec) pairs; a shard holds one")
    ((teacher_fp, spec_fp),) = pairs
    spec = (table.schema.metadata or {}).get(_SPEC_METADATA)
    entry = _shard_entry(f"shards/{path.name}", teacher_fp, spec_fp, table, data)
    return entry, json.loads(spec) if spec is not None else None


def _to_json(record: PTRecord) -> dict[str, Any]:
    """A record as JSON (bytes as hex), for the journal."""
    fields = dataclasses.asdict(record)
    if record.token_bytes is not None:
        fields["token_bytes"] = [b.hex() for b in record.token_bytes]
    if record.topk_bytes is not None:
        fields["topk_bytes"] = [[b.hex() for b in position] for position in record.topk_bytes]
    return fields


def _from_json(fields: dict[str, Any]) -> PTRecord:
    if fields.get("token_bytes") is not None:
        fields["token_bytes"] = [bytes.fromhex(h) for h in fields["token_bytes"]]
    if fields.get("topk_bytes") is not None:
        fields["topk_bytes"] = [[bytes.fromhex(h) for h in position] for position in fields["topk_bytes"]]
    return PTRecord(**fields)


def _shard_entry(file: str, teacher_fp: str, spec_fp: str, table: pa.Table, data: bytes) -> dict[str, Any]:
    """The manifest entry of the shard `file` holding `table`, written as the Parquet bytes `data`."""

    def most(column: str) -> int:  # k at the position with the most candidates (0: absent, an older shard)
        if column not in table.column_names:
            return 0
        return pc.max(pc.list_value_length(pc.list_flatten(table[column]))).as_py() or 0

    def total(column: str) -> int:
        return pc.sum(pc.list_value_length(table[column])).as_py() or 0 if column in table.column_names else 0

    return {
        "file": file,
        "teacher_fp": teacher_fp,
        "spec_fp": spec_fp,
        "rows": table.num_rows,
        "tokens": total("token_ids") + total("token_bytes"),
        "topk": max(most("topk_ids"), most("topk_bytes")),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, even after a crash; a failed
    write (a full disk) leaves no partial file and names the path."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def _unique_keys(sources: Sequence[str]) -> dict[str, str]:
    """{source: input_key} in first-seen order, each source once."""
    return {source: input_key(source) for source in dict.fromkeys(sources)}


# ---------------------------------------------------------------------------------------------
# Training schedule: which target each example trains on at each epoch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingTarget:
    """One training item: an example with a target, the gold one or one of the teacher's PTs."""

    example_id: str
    source: str
    text: str
    kind: Literal["gold", "teacher_pt"]
    pt: PTRecord | None = None
    """The PT (its sample_index, teacher tokens and top-k) when kind is teacher_pt."""


def pt_schedule(
    examples: Sequence[Example],
    pts: Mapping[str, Sequence[PTRecord]],
    k: int,
    epoch: int,
    include_gold: bool = True,
) -> list[TrainingTarget]:
    """The targets of `examples` at `epoch`: PT number epoch % k of each, plus the gold target of labeled ones.

    A pure function of its arguments. Over k epochs each example sees each of its first k PTs once, a different
    one every epoch (the study's several-PTs-per-input setup), then the cycle repeats. Unlabeled examples only
    yield their PT. Items come in example order, the gold target before the PT; shuffling is the loader's job.

    Args:
        examples: labeled and unlabeled examples (`target` None).
        pts: {input_key: records}, as `PTStore.get` returns them.
        k: PTs to cycle through per example (>= 1); each example needs samples 0..k-1.
        epoch: 0-based epoch.
        include_gold: also train on the gold target of labeled examples.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pt_index = epoch % k
    items = []
    for example in examples:
        if include_gold and example.target is not None:
            items.append(TrainingTarget(example.id, example.source, example.target, "gold"))
        by_index = {record.sample_index: record for record in pts.get(input_key(example.source), ())}
        if pt_index not in by_index:
            have = sorted(i for i in by_index if i < k)
            raise ValueError(
                f"example {example.id}: needs PTs 0..{k - 1}, the store has {have or 'none'}; generate them first"
            )
        record = by_index[pt_index]
        items.append(TrainingTarget(example.id, example.source, record.text, "teacher_pt", record))
    return items


# ---------------------------------------------------------------------------------------------
# Diversity of the PTs (`distilgen pts show`)
# ---------------------------------------------------------------------------------------------


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over `texts` (whitespace words), 0-1; 0.0 when there is no n-gram."""
    ngrams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def self_bleu(texts: Sequence[str]) -> float:
    """Mean sentence BLEU (sacreBLEU, 0-100) of each text against all the others: 100 when all are equal.

    The PTs of one input: a low self-BLEU means diverse PTs. Needs at least two texts.
    """
    import sacrebleu

    if len(texts) < 2:
        raise ValueError(f"self-BLEU needs at least 2 texts, got {len(texts)}")
    bleu = sacrebleu.BLEU(effective_order=True)
    scores = [bleu.sentence_score(text, [*texts[:i], *texts[i + 1 :]]).score for i, text in enumerate(texts)]
    return sum(scores) / len(scores)


def pt_diversity(pts: Mapping[str, Sequence[PTRecord]]) -> dict[str, float]:
    """Counts, lengths and diversity of stored PTs ({input_key: records}); distinct-n and self-BLEU are
    computed among the PTs of each input, then averaged over inputs (self-BLEU over inputs with >= 2 PTs)."""
    groups = [[r.text for r in records] for records in pts.values() if records]
    if not groups:
        return {"inputs": 0, "pts": 0}
    words = [len(text.split()) for text in itertools.chain.from_iterable(groups)]
    tokens = [len(r.token_ids) for records in pts.values() for r in records]
    stats = {
        "inputs": len(groups),
        "pts": len(words),
        "pts_per_input": len(words) / len(groups),
        "words_mean": statistics.fmean(words),
        "words_min": min(words),
        "words_max": max(words),
        "tokens_mean": statistics.fmean(tokens),
        "distinct_1": statistics.fmean(distinct_n(g, 1) for g in groups),
        "distinct_2": statistics.fmean(distinct_n(g, 2) for g in groups),
    }
    several = [g for g in groups if len(g) >= 2]
    if several:
        stats["self_bleu"] = statistics.fmean(self_bleu(g) for g in several)
    return stats


def gold_agreement(split: Sequence[Example], pts: Mapping[str, Sequence[PTRecord]]) -> str:
    """ "; against gold: BLEU b, chrF c" of every PT of the labeled inputs against their references (whether a
    teacher's PTs are worth training on: an instruct teacher's prompt and decoding are judged here), or ""."""
    from distilgen.metrics import compute_metrics

    pairs = [(r.text, list(e.references)) for e in split if e.references for r in pts.get(input_key(e.source), [])]
    if not pairs:
        return ""
    scores = compute_metrics(["bleu", "chrf"], [text for text, _ in pairs], [refs for _, refs in pairs])
    return f"; against gold: BLEU {scores['bleu']:.1f}, chrF {scores['chrf']:.1f}"


def describe_store(store: PTStore, splits: Mapping[str, Sequence[Example]], examples: int = 2) -> list[str]:
    """`distilgen pts show`: per (teacher, spec) in the store, counts, lengths and diversity per split, and the
    PTs of a few inputs. Lines of text."""
    lines = []
    for stats in store.stats():
        spec = store.spec(stats.spec_fp)
        topk = f", top-{stats.topk} log-probs" if stats.topk else ""
        kind = spec.kind if spec is not None else "settings not recorded"
        lines.append(
            f"teacher {stats.teacher_fp[:12]}  spec {stats.spec_name} ({kind}, {stats.spec_fp[:12]}): "
            f"{stats.inputs} inputs, {stats.pts} PTs, {stats.tokens} tokens, {stats.bytes / 1e6:.2f} MB{topk}"
        )
        shown = 0
        for name, split in splits.items():
            sources = list(dict.fromkeys(e.source for e in split))
            pts = store.get(stats.teacher_fp, stats.spec_fp, sources, every_index=True)
            div = pt_diversity(pts)
            line = f"  {name}: {div['inputs']}/{len(sources)} inputs with PTs, {div['pts']} PTs"
            if div["pts"]:
                line += (
                    f", {div['pts_per_input']:.2f} per input; words mean {div['words_mean']:.1f} "
                    f"(min {div['words_min']}, max {div['words_max']}); distinct-1 {div['distinct_1']:.3f}, "
                    f"distinct-2 {div['distinct_2']:.3f}"
                )
                line += f"; self-BLEU {div['self_bleu']:.1f}" if "self_bleu" in div else ""
                line += gold_agreement(split, pts)
            lines.append(line)
            for source in sources:
                if shown >= examples:
                    break
                if input_key(source) in pts:
                    shown += 1
                    lines.append(f"    input: {source[:160]}{'...' if len(source) > 160 else ''}")
                    lines += [f"      PT {r.sample_index}: {r.text}" for r in pts[input_key(source)]]
    return lines or ["the store is empty"]
