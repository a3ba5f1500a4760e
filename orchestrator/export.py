"""`charforge jobs export`: runs' sample batches (and best checkpoints) in one archive.

The archive holds `README.txt`, `manifest.json` and every selected run's batches under
`runs/<run-id>/samples/<batch-id>.jsonl` (plus `runs/<run-id>/checkpoints/step-<n>.pt` with
`include_checkpoints`), all inside one top folder `charforge-export-<export-id>/`. Member names
are built by `workers.keys` from hex ids, never from run names or other user strings.

It streams: each member is copied from storage in chunks and hashed on the way, so thousands of
samples never sit in memory. The manifest comes first (readers can stop after it); it lists the
recorded sha256 of every member, and each member is checked against it while copied: an object
that changed since it was recorded aborts the export. The archive is written to a temp file
beside the destination and renamed into place (or uploaded once, for `s3://`), so a failure
never leaves a half-written archive. Layout and manifest fields: docs/sampling.md.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel

from orchestrator.archive import Destination, Member, atomic_file, write_archive
from schemas.errors import StorageError, UserError
from schemas.views import ArtifactView, RunView
from workers import keys
from workers.storage import Storage, check_key, file_sha256, open_storage, unwritable_reason

FORMATS = keys.FORMATS
MANIFEST_VERSION = 1


class ExportResult(BaseModel):
    export_id: str
    destination: str  # the local path written, or s3://bucket/key
    url: str  # a presigned URL for S3 destinations, a file:// URI otherwise
    format: str
    runs: int
    batches: int
    samples: int
    checkpoints: int
    size: int
    sha256: str


def export_runs(
    runs: Sequence[RunView],
    storage: Storage,
    out: str | None,
    *,
    fmt: str | None = None,
    include_checkpoints: bool = False,
    out_storage_factory: Callable[[str], Storage] | None = None,
) -> ExportResult:
    """Write one archive of `runs` to `out`: a local path (a file, or an existing folder),
    `s3://bucket/key`, or None for `exports/<id>.<fmt>` in `storage` itself."""
    fmt = resolve_format(out, fmt)
    if not runs:
        raise UserError("nothing to export: no runs selected")
    if include_checkpoints and fmt == "jsonl":
        raise UserError("--include-checkpoints needs --format tar.gz or zip (jsonl holds text only)")
    runs = list({run.id: run for run in runs}.values())  # a run named twice is exported once
    export_id = secrets.token_hex(8)
    dest = resolve_destination(out, fmt, export_id, storage, out_storage_factory)
    top = f"charforge-export-{export_id}"
    members, manifest = plan(runs, storage, include_checkpoints, export_id, fmt)
    readme = readme_text(manifest, top if fmt != "jsonl" else None).encode()
    if fmt != "jsonl":
        readme_member = Member("README.txt", "", len(readme), hashlib.sha256(readme).hexdigest())
        manifest["members"].insert(0, _member_entry(readme_member))
    with atomic_file(dest) as (tmp, final):
        write_archive(tmp, fmt, top, manifest, readme, members, storage)
        size, sha256 = tmp.stat().st_size, file_sha256(tmp)
        url = final(tmp)
    totals = manifest["totals"]
    return ExportResult(
        export_id=export_id, destination=dest.label, url=url, format=fmt, runs=len(runs),
        batches=totals["batches"], samples=totals["samples"], checkpoints=totals["checkpoints"],
        size=size, sha256=sha256,
    )


# Archive names that say another format: writing tar.gz into `x.rar` would mislead whoever opens it.
OTHER_ARCHIVES = (".rar", ".7z", ".tar", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".bz2", ".xz", ".zst", ".gz")


def resolve_format(out: str | None, fmt: str | None) -> str:
    """The format asked for, or the one `out`'s name ends in, or tar.gz; a clash is an error."""
    suffix = next((f for f in FORMATS if out and out.lower().endswith("." + f)), None)
    other = next((o for o in OTHER_ARCHIVES if out and out.lower().endswith(o)), None)
    if suffix is None and other is not None and not Path(out or "").expanduser().is_dir():  # a folder: we name
        raise UserError(f"--out {out!r} ends in {other}, which charforge does not write: "
                        f"name it .{' or .'.join(FORMATS)}")
    chosen = fmt or suffix or "tar.gz"
    if chosen not in FORMATS:
        raise UserError(f"unknown export format {chosen!r}; choose one of: {', '.join(FORMATS)}")
    if suffix and suffix != chosen:
        raise UserError(f"--out {out!r} ends in .{suffix} but --format is {chosen}: make them agree")
    return chosen


def resolve_destination(
    out: str | None, fmt: str, export_id: str, storage: Storage,
    factory: Callable[[str], Storage] | None,
) -> Destination:
    default_name = f"charforge-export-{export_id}.{fmt}"
    if out is None:
        key = keys.export(export_id, fmt)
        return Destination(None, storage, key, f"{storage.url}/{key}")
    if out.startswith("s3://"):
        bucket, _, key = out[len("s3://"):].partition("/")
        if not bucket:
            raise UserError(f"--out {out!r} names no bucket: use s3://bucket/key")
        if not key or key.endswith("/"):
            key += default_name
        try:
            check_key(key)
        except StorageError:
            raise UserError(
                f"--out {out!r}: an S3 key may hold only letters, digits, '.', '_', '-' and '/'"
            ) from None
        target = (factory or _default_factory)(f"s3://{bucket}")
        return Destination(None, target, key, f"s3://{bucket}/{key}")
    path = Path(out).expanduser()
    if path.is_dir():
        path = path / default_name
    elif not path.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {path.parent} does not exist")
    reason = unwritable_reason(path)
    if reason is not None:
        raise UserError(reason)
    return Destination(path.resolve(), None, None, str(path.resolve()))


def _default_factory(url: str) -> Storage:
    from orchestrator.settings import load_settings

    return open_storage(url, endpoint_url=load_settings().s3_endpoint_url)


# --- what goes in ----------------------------------------------------------------------------


def plan(
    runs: Sequence[RunView], storage: Storage, include_checkpoints: bool, export_id: str, fmt: str
) -> tuple[list[Member], dict[str, Any]]:
    """The members to copy, in order, and the manifest that describes them."""
    members: list[Member] = []
    entries = []
    for run in runs:
        batches = [(a, _batch_member(run.id, a)) for a in run.sample_batches]
        best = _best_checkpoint(run, storage) if include_checkpoints else None
        members += [m for _, m in batches] + ([best[1]] if best else [])
        entries.append(_run_entry(run, batches, best))
    manifest = {
        "format": "charforge-export",
        "version": MANIFEST_VERSION,
        "export_id": export_id,
        "archive_format": fmt,
        "created_at": datetime.now(UTC).isoformat(),
        "totals": {
            "runs": len(entries),
            "batches": sum(len(e["batches"]) for e in entries),
            "samples": sum(b["n"] or 0 for e in entries for b in e["batches"]),
            "checkpoints": sum(1 for e in entries if e["checkpoint"]),
        },
        "runs": entries,
        "members": [_member_entry(m) for m in members],
    }
    return members, manifest


def _member_entry(member: Member) -> dict[str, Any]:
    return {"name": member.name, "size": member.size, "sha256": member.sha256}


def _batch_member(run_id: str, artifact: ArtifactView) -> Member:
    batch_id = PurePosixPath(artifact.key).name.removesuffix(".jsonl")
    try:
        name = keys.samples(run_id, batch_id)
    except ValueError:
        raise StorageError(f"run {run_id}: {artifact.key!r} is not a sample batch key") from None
    return Member(name, artifact.key, artifact.size, artifact.sha256)


def _checkpoint_step(artifact: ArtifactView) -> int | None:
    step = artifact.meta.get("step")
    if step is None:
        stem = PurePosixPath(artifact.key).name
        digits = stem.removeprefix("step-").removesuffix(".pt")
        step = int(digits) if digits.isdigit() else None
    return int(step) if step is not None else None


def _best_checkpoint(run: RunView, storage: Storage) -> tuple[ArtifactView, Member] | None:
    """The stored checkpoint with the lowest validation loss (else the latest step).

    Training prunes old checkpoints, so only those still in storage are candidates.
    """
    present = [a for a in run.checkpoints if _checkpoint_step(a) is not None and storage.exists(a.key)]
    if not present:
        return None

    def rank(a: ArtifactView) -> tuple[float, int]:
        loss = a.meta.get("val_loss")
        return (loss if loss is not None else float("inf"), -(_checkpoint_step(a) or 0))

    best = min(present, key=rank)
    name = keys.checkpoint(run.id, _checkpoint_step(best) or 0)
    return best, Member(name, best.key, best.size, best.sha256)


def _run_entry(
    run: RunView, batches: list[tuple[ArtifactView, Member]],
    best: tuple[ArtifactView, Member] | None,
) -> dict[str, Any]:
    steps = [s for s in (_checkpoint_step(a) for a in run.checkpoints) if s is not None]
    spec = run.spec or {}
    return {
        "id": run.id,
        "name": run.name,
        "status": str(run.status.value),
        "created_at": run.created_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "repos": run.repos,
        "corpus": run.corpus,
        "model": spec.get("model"),
        "train": spec.get("train"),
        "sample": spec.get("sample"),
        "final_train_loss": run.metrics.get("train_loss"),
        "final_val_loss": run.metrics.get("val_loss"),
        "best_val_loss": run.best_val_loss,
        "checkpoint_step": max(steps) if steps else None,
        "batches": [_batch_entry(a, m) for a, m in batches],
        "checkpoint": None if best is None else {
            "member": best[1].name, "step": _checkpoint_step(best[0]),
            "val_loss": best[0].meta.get("val_loss"),
        },
    }


def _batch_entry(artifact: ArtifactView, member: Member) -> dict[str, Any]:
    meta = artifact.meta
    fields = ("batch_id", "n", "checkpoint_step", "checkpoint_key", "seed", "options", "language",
              "metrics", "corpus_metrics")
    return {"member": member.name, **{f: meta.get(f) for f in fields}}


def readme_text(manifest: dict[str, Any], top: str | None) -> str:
    """README.txt of an archive with top folder `top`; for jsonl (top None), the line layout."""
    totals = manifest["totals"]
    lines = [
        "charforge export",
        "================",
        f"export id: {manifest['export_id']}   created: {manifest['created_at']}",
        (f"{totals['runs']} runs, {totals['batches']} sample batches, {totals['samples']} samples,"
         f" {totals['checkpoints']} checkpoints"),
        "",
    ]
    if top is None:
        lines += [
            "Line 1: this manifest (\"type\": \"manifest\"): runs (id, name, repos and commits,",
            "corpus, model, losses, sample options and metrics) and the sha256 of every batch.",
            "Then every batch's lines verbatim, in manifest order: one JSON object per sample",
            "(\"type\": \"sample\"): text, options, seed, checkpoint {key, step}, language, metrics.",
        ]
    else:
        lines += [
            f"Everything is inside the folder {top}/:",
            "  manifest.json      runs (id, name, repos and commits, corpus, model, losses,",
            "                     sample options and metrics) and the sha256 of every member",
            "  runs/<run-id>/samples/<batch-id>.jsonl   one JSON object per sample:",
            "                     text, options, seed, checkpoint {key, step}, language, metrics",
            "  runs/<run-id>/checkpoints/step-<n>.pt    with --include-checkpoints: the run's best",
            "                     checkpoint; torch.load(path, weights_only=True) reads it",
        ]
    lines += ["", "Runs in this export:"]
    for run in manifest["runs"]:
        loss = run["best_val_loss"]
        shown = f"{loss:.4f} nats/char" if loss is not None else "n/a"
        lines.append(f"  {run['id']}  {json.dumps(run['name'])}  best val loss {shown}"
                     f"  {len(run['batches'])} batches")
    if top is not None:
        lines += ["", "Check a member: sha256sum <member>, and compare with manifest.json's members."]
    return "\n".join(lines) + "\n"
