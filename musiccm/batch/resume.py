"""Which ids of an output are finished: a metric row AND its audio object, matching what the row recorded.

Cheap by default: one listing of `{output}/audio/` (one LIST request per 1000 objects on S3, no GETs)
gives every object's size; an id is done when its newest metric row's `bytes` equals the size of
`audio/{id}.{format}`. This is sound because audio writes are atomic (an object is either absent or
a whole clip) and the metric row is written only after its audio exists; a size check catches a
clip replaced by a different one (FLAC sizes depend on content). `verify=True` also re-reads each
object and compares its sha256 with the recorded one (one GET per clip, in a thread pool) for
outputs that other tools may have touched.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from musiccm import storage
from musiccm.results import read_metrics

_TMP_SUFFIX_LEN = len(".tmp-") + 32


@dataclass
class ResumeState:
    """Finished ids and why the other recorded ids are not finished."""

    done: set[str] = field(default_factory=set)
    recorded: int = 0  # ids with a metric row
    missing_audio: int = 0  # metric row but no audio object
    mismatched: int = 0  # audio object whose size (or sha256, with verify) differs from the row


def audio_sizes(output: str) -> dict[str, int]:
    """File name → size in bytes of every object directly under `{output}/audio/`."""
    fs, path = storage.pyarrow_fs(storage.join(output, "audio"))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as exc:
        raise storage.StorageError(f"{storage.join(output, 'audio')}: cannot list: {exc}") from exc
    sizes = {}
    for info in infos:
        name = info.base_name
        if info.type == pafs.FileType.File and ".tmp-" not in name[-_TMP_SUFFIX_LEN:]:
            sizes[name] = info.size
    return sizes


def _sha256_matches(uri: str, expected: str) -> bool:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest() == expected


def resume_state(output: str, verify: bool = False, workers: int = 16) -> ResumeState:
    """Read the newest metric row per id and check it against the audio objects."""
    rows = read_metrics(output, columns=["id", "format", "bytes", "sha256", "finished_at"])
    state = ResumeState(recorded=rows.num_rows)
    if rows.num_rows == 0:
        return state
    sizes = audio_sizes(output)
    candidates = []
    for row_id, fmt, n_bytes, sha in zip(*(rows.column(c).to_pylist() for c in ("id", "format", "bytes", "sha256")),
                                         strict=True):
        size = sizes.get(f"{row_id}.{fmt}")
        if size is None:
            state.missing_audio += 1
        elif size != n_bytes:
            state.mismatched += 1
        else:
            candidates.append((row_id, storage.join(output, "audio", f"{row_id}.{fmt}"), sha))
    if verify and candidates:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            ok = list(pool.map(lambda c: _sha256_matches(c[1], c[2]), candidates))
        state.mismatched += ok.count(False)
        candidates = [c for c, good in zip(candidates, ok, strict=True) if good]
    state.done = {c[0] for c in candidates}
    return state
