"""Split manifests: the project's CSV format, conversion from the original EPIC pickles, validation, and
the domain registry.

The project's manifest is a CSV file with one row per clip (action segment) and these columns
(see README, "Manifest format"):

=================  ======  ============================================================================
column             type    meaning
=================  ======  ============================================================================
id                 str     clip id: MM-SADA ``uid`` or EPIC-100 ``narration_id``; unique in the file
participant_id     str     kitchen / participant, e.g. ``P08``
video_id           str     e.g. ``P08_01``
narration          str     free text (may be empty)
start_timestamp    str     ``HH:MM:SS.ss``
stop_timestamp     str     ``HH:MM:SS.ss``
start_frame        int     first RGB frame, 1-based (EPIC frame numbering)
stop_frame         int     last RGB frame, >= start_frame
fps                float   frames per second of the video (from the EPIC video-info tables)
verb               str     verb text (may be empty)
verb_class         int     0 .. verb_classes-1, or -1 when unknown (unlabelled split)
noun               str     noun text (may be empty)
noun_class         int     0 .. noun_classes-1, or -1 when unknown / not annotated
=================  ======  ============================================================================

Only ``id``, ``video_id``, ``start_frame`` and ``stop_frame`` are required in a user's file; the others are
filled (``participant_id`` from the video id, ``fps`` from the shipped video-info table, classes -1).

The originals are the MM-SADA pickles (``D{1,2,3}_{train,test}.pkl``, 10 columns, RangeIndex) and the
EPIC-KITCHENS-100 UDA pickles (indexed by ``narration_id``; 14 columns, or 7 in the ``*_timestamps`` files).
Both are CC BY-NC 4.0 (University of Bristol); see ``manifests/LICENSE.md``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from featstore.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_DIR = PROJECT_ROOT / "manifests"
REGISTRY_FILE = MANIFEST_DIR / "registry.json"

COLUMNS = [
    "id", "participant_id", "video_id", "narration", "start_timestamp", "stop_timestamp",
    "start_frame", "stop_frame", "fps", "verb", "verb_class", "noun", "noun_class",
]
REQUIRED = ["id", "video_id", "start_frame", "stop_frame"]
INT_COLUMNS = ["start_frame", "stop_frame", "verb_class", "noun_class"]
STR_COLUMNS = ["id", "participant_id", "video_id", "narration", "start_timestamp", "stop_timestamp", "verb", "noun"]
# The largest magnitude an integer column may hold: frame numbers go through float64 in the window sampler (exact up
# to 2**53); class ids are stored as int32.
INT_LIMITS = {"start_frame": 2 ** 53, "stop_frame": 2 ** 53, "verb_class": 2 ** 31 - 1, "noun_class": 2 ** 31 - 1}

# Class-space sizes of the datasets the project knows (class lists in manifests/).
MMSADA_VERBS = 8
EPIC100_VERBS, EPIC100_NOUNS = 97, 300

# MM-SADA domains, as read from the pickles (the paper's text lists them in another order).
MMSADA_DOMAINS = {"D1": "P08", "D2": "P01", "D3": "P22"}
EPIC100_FILES = {
    "source_train": "EPIC_100_uda_source_train.pkl",
    "source_val": "EPIC_100_uda_source_val.pkl",
    "source_test": "EPIC_100_uda_source_test_timestamps.pkl",
    "target_train": "EPIC_100_uda_target_train_timestamps.pkl",
    "target_val": "EPIC_100_uda_target_val.pkl",
    "target_test": "EPIC_100_uda_target_test_timestamps.pkl",
}
# EPIC-100 UDA domains: the trainer's --source/--target take these names.  target_val is the labelled
# target set used for evaluation; target_test (no labels) is what the challenge's test.json is written for.
EPIC100_DOMAINS = {
    "epic100_source": {"train": "source_train", "test": "source_val"},
    "epic100_target": {"train": "target_train", "test": "target_val", "challenge": "target_test"},
}
# The demo kitchens that `adapt demo-data` generates (files under manifests/demo/, not tracked by git).
DEMO_DOMAINS = ("K1", "K2", "K3")


# ----------------------------------------------------------------------------------------------------------
# Reading, normalising and validating


def _fmt_row(path, line: int, clip_id=None) -> str:
    where = f"{path}: row {line}"
    return where + (f" (id {clip_id})" if clip_id is not None else "")


def _as_written(value) -> str:
    """A cell's value for a message: a number as the file wrote it, anything else quoted."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return repr(value)
        return value.strip()
    return str(value.item() if hasattr(value, "item") else value)


def _int_column(raw: pd.Series, col: str, source, ids) -> np.ndarray:
    """``raw`` (text from a CSV, numbers from a pickle) as int64; the first non-integer or out-of-range value raises
    a :class:`UserError` naming its row and printing the value as written."""
    values = pd.to_numeric(raw, errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy() | (values.to_numpy() % 1 != 0))
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{_fmt_row(source, i + 2, ids[i])}: {col} {_as_written(raw.iloc[i])} is not an integer")
    limit = INT_LIMITS[col]
    arr = values.to_numpy()
    if arr.dtype.kind == "u":
        over = arr > limit
    else:
        over = (arr > limit) | (arr < -limit)
    bad = np.flatnonzero(over)
    if len(bad):
        i = int(bad[0])
        what = ("a frame number is 1 .. 2**53 = 9007199254740992" if col.endswith("_frame")
                else f"a class id is -1 .. {limit}")
        raise UserError(f"{_fmt_row(source, i + 2, ids[i])}: {col} {_as_written(raw.iloc[i])} is out of range "
                        f"({what})")
    return arr.astype(np.int64)


def normalise(df: pd.DataFrame, source: str | Path, video_fps: dict[str, float] | None = None) -> pd.DataFrame:
    """Bring a table with at least the required columns into the project's column set and dtypes.

    Rows keep their order; ``source`` names the file in error messages.
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise UserError(f"{source}: missing column {', '.join(repr(c) for c in missing)} "
                        f"(a manifest needs {', '.join(REQUIRED)})")
    out = pd.DataFrame(index=range(len(df)))
    for col in COLUMNS:
        if col in df.columns:
            out[col] = df[col].to_numpy()
    if "participant_id" not in out:
        out["participant_id"] = [str(v).split("_")[0] for v in out["video_id"]]
    for col in STR_COLUMNS:
        if col not in out:
            out[col] = ""
        out[col] = out[col].fillna("").astype(str)
    for col in ("verb_class", "noun_class"):
        if col not in out:
            out[col] = -1
    # integer columns: reject non-integers with the row that holds them
    for col in INT_COLUMNS:
        out[col] = _int_column(pd.Series(out[col].to_numpy(), dtype=object), col, source, out["id"].to_numpy())
    if "fps" not in out:
        out["fps"] = np.nan
    out["fps"] = pd.to_numeric(out["fps"], errors="coerce").astype(np.float64)
    if video_fps is None:
        video_fps = load_video_fps()
    unknown = out["fps"].isna()
    if unknown.any():
        out.loc[unknown, "fps"] = out.loc[unknown, "video_id"].map(video_fps).astype(np.float64)
    return out[COLUMNS]


def validate(df: pd.DataFrame, source: str | Path, verb_classes: int | None, noun_classes: int | None) -> None:
    """Check a normalised manifest; the first problem raises a one-line :class:`UserError` naming the row.

    Rows are numbered as lines of the CSV file (the header is row 1).
    """
    if not len(df):
        raise UserError(f"{source}: no clips (the manifest has a header and no rows)")
    ids = df["id"].to_numpy()
    if (df["id"] == "").any():
        i = int(np.flatnonzero((df["id"] == "").to_numpy())[0])
        raise UserError(f"{_fmt_row(source, i + 2)}: empty id")
    dup = pd.Series(ids).duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        first = int(np.flatnonzero(ids == ids[i])[0])
        raise UserError(f"{_fmt_row(source, i + 2, ids[i])}: duplicate id (first seen in row {first + 2})")
    start, stop = df["start_frame"].to_numpy(), df["stop_frame"].to_numpy()
    bad = np.flatnonzero(start < 1)
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{_fmt_row(source, i + 2, ids[i])}: start_frame {start[i]} < 1 (frames are 1-based)")
    bad = np.flatnonzero(stop < start)
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{_fmt_row(source, i + 2, ids[i])}: stop_frame {stop[i]} is before start_frame {start[i]}")
    for col, n in (("verb_class", verb_classes), ("noun_class", noun_classes)):
        values = df[col].to_numpy()
        upper = n if n is not None else np.iinfo(np.int64).max
        bad = np.flatnonzero((values < -1) | (values >= upper))
        if len(bad):
            i = int(bad[0])
            rng = f"-1..{n - 1}" if n is not None else ">= -1"
            raise UserError(f"{_fmt_row(source, i + 2, ids[i])}: {col} {values[i]} out of range {rng}")
    fps = df["fps"].to_numpy()
    bad = np.flatnonzero(~np.isnan(fps) & (fps <= 0))
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{_fmt_row(source, i + 2, ids[i])}: fps {fps[i]} must be positive")


def from_epic_pickle(path: str | Path) -> pd.DataFrame:
    """Read an original MM-SADA or EPIC-100 UDA pickle into the project's columns (not yet validated)."""
    path = Path(path)
    try:
        raw = pd.read_pickle(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
        raise UserError(f"{path}: cannot read as a pandas pickle ({type(e).__name__}: {e})") from None
    if not isinstance(raw, pd.DataFrame):
        raise UserError(f"{path}: expected a pandas DataFrame, found {type(raw).__name__}")
    df = raw.copy()
    if "uid" in df.columns:  # MM-SADA
        df["id"] = df["uid"].astype(str)
    elif df.index.name == "narration_id" or "narration_id" in df.columns:  # EPIC-100
        df = df.reset_index() if df.index.name == "narration_id" else df
        df["id"] = df["narration_id"].astype(str)
    return df


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a manifest file (the project's CSV or an original EPIC pickle) without validating it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such manifest file")
    if path.suffix in (".pkl", ".pickle"):
        return from_epic_pickle(path)
    _check_field_counts(path)
    # integer columns are read as text so that a message prints a value as written (a 20-digit frame number
    # would otherwise arrive as a float); index_col=False: never take the first column for an index
    text = {c: str for c in ("id", "video_id", "participant_id", *INT_COLUMNS)}
    try:
        return pd.read_csv(path, dtype=text, keep_default_na=False, na_values={"fps": [""]}, index_col=False)
    except Exception as e:  # noqa: BLE001
        why = " ".join(str(e).split())
        raise UserError(f"{path}: cannot read as CSV ({type(e).__name__}: {why})") from None


def _check_field_counts(path: Path) -> None:
    """The first row with more fields than the header has columns raises a :class:`UserError` naming its row (a
    line number of the file).  Without this, pandas takes the first column for an index when the first data row
    has one field too many, and every message after that names the wrong id and column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            columns = 0
            for header in reader:
                if header:
                    columns = len(header)
                    break
            start = reader.line_num + 1
            for row in reader:
                if len(row) > columns:
                    raise UserError(f"{path}: row {start}: {len(row)} fields, more than the header's {columns} "
                                    f"columns; remove the extra values, or quote a value that holds a comma")
                start = reader.line_num + 1
    except (UnicodeDecodeError, csv.Error):
        return  # not text the csv module reads: pandas says why below


def read_manifest(path: str | Path, verb_classes: int | None = EPIC100_VERBS,
                  noun_classes: int | None = EPIC100_NOUNS) -> pd.DataFrame:
    """Read, normalise and validate a manifest file; returns the table in the project's columns."""
    df = normalise(read_table(path), path)
    validate(df, path, verb_classes, noun_classes)
    return df


def to_csv_text(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df[COLUMNS].to_csv(buf, index=False, float_format="%.10g", lineterminator="\n")
    return buf.getvalue()


def manifest_sha256(df: pd.DataFrame) -> str:
    """sha256 of the manifest's canonical CSV text: the same clips give the same hash whatever file they came from."""
    return hashlib.sha256(to_csv_text(df).encode()).hexdigest()


def load_video_fps() -> dict[str, float]:
    """Per-video fps from the shipped video-info table (EPIC-55 and EPIC-100 videos)."""
    path = MANIFEST_DIR / "video_info.csv"
    if not path.is_file():
        return {}
    table = pd.read_csv(path)
    return dict(zip(table["video_id"], table["fps"].astype(float)))


# ----------------------------------------------------------------------------------------------------------
# Conversion of the originals and the registry


def convert_originals(src: str | Path, out: str | Path = MANIFEST_DIR) -> dict:
    """Convert the original pickles under ``src`` (the layout of ``shared/data/manifests``) into CSV files under
    ``out`` plus ``video_info.csv``, the class lists and ``registry.json``.  Returns the registry."""
    src, out = Path(src), Path(out)
    mm, e100, e55 = src / "mmsada", src / "epic100", src / "epic55"
    for d in (mm, e100 / "UDA_annotations", e55):
        if not d.is_dir():
            raise UserError(f"{d}: missing (expected the layout of shared/data/manifests: mmsada/, epic100/, epic55/)")
    out.mkdir(parents=True, exist_ok=True)

    info55 = pd.read_csv(e55 / "EPIC_video_info.csv").rename(columns={"video": "video_id"})
    info100 = pd.read_csv(e100 / "EPIC_100_video_info.csv")
    info = pd.concat([info100[["video_id", "fps", "duration", "resolution"]],
                      info55[["video_id", "fps", "duration", "resolution"]]]).drop_duplicates("video_id")
    info = info.sort_values("video_id")
    info.to_csv(out / "video_info.csv", index=False, float_format="%.10g", lineterminator="\n")
    fps = dict(zip(info["video_id"], info["fps"].astype(float)))

    for name in ("EPIC_100_verb_classes.csv", "EPIC_100_noun_classes.csv"):
        (out / "epic100").mkdir(exist_ok=True)
        (out / "epic100" / name).write_bytes((e100 / name).read_bytes())

    registry: dict = {"splits": {}, "domains": {}}
    (out / "mmsada").mkdir(exist_ok=True)
    for dom, participant in MMSADA_DOMAINS.items():
        for role in ("train", "test"):
            name = f"{dom}_{role}"
            original = mm / f"{name}.pkl"
            df = normalise(from_epic_pickle(original), original, fps)
            validate(df, original, MMSADA_VERBS, None)
            found = sorted(df["participant_id"].unique())
            if found != [participant]:
                raise UserError(f"{original}: expected participant {participant}, found {found}")
            rel = f"mmsada/{name}.csv"
            (out / rel).write_text(to_csv_text(df))
            registry["splits"][name] = _entry(df, rel, "mmsada", dom, True, MMSADA_VERBS, 0, original.name)
        registry["domains"][dom] = {"train": f"{dom}_train", "test": f"{dom}_test", "dataset": "mmsada"}

    (out / "epic100").mkdir(exist_ok=True)
    for name, fname in EPIC100_FILES.items():
        original = e100 / "UDA_annotations" / fname
        df = normalise(from_epic_pickle(original), original, fps)
        validate(df, original, EPIC100_VERBS, EPIC100_NOUNS)
        labelled = bool((df["verb_class"] >= 0).all())
        rel = f"epic100/{name}.csv"
        (out / rel).write_text(to_csv_text(df))
        domain = "epic100_source" if name.startswith("source") else "epic100_target"
        registry["splits"][name] = _entry(df, rel, "epic100", domain, labelled, EPIC100_VERBS, EPIC100_NOUNS,
                                          original.name)
    for dom, roles in EPIC100_DOMAINS.items():
        registry["domains"][dom] = {**roles, "dataset": "epic100"}

    for dom in DEMO_DOMAINS:
        for role in ("train", "test"):
            registry["splits"][f"{dom}_{role}"] = {
                "file": f"demo/{dom}_{role}.csv", "dataset": "demo", "domain": dom, "labelled": True,
                "verb_classes": None, "noun_classes": 0, "clips": None, "original": "generated by `adapt demo-data`",
            }
        registry["domains"][dom] = {"train": f"{dom}_train", "test": f"{dom}_test", "dataset": "demo"}
    (out / "registry.json").write_text(json.dumps(registry, indent=1) + "\n")
    return registry


def _entry(df, rel, dataset, domain, labelled, verbs, nouns, original) -> dict:
    return {
        "file": rel, "dataset": dataset, "domain": domain, "labelled": labelled, "verb_classes": verbs,
        "noun_classes": nouns, "clips": int(len(df)), "videos": int(df["video_id"].nunique()),
        "participants": sorted(df["participant_id"].unique().tolist()), "original": original,
        "sha256": manifest_sha256(df),
    }


@dataclass
class Split:
    """A resolved split: a registry entry or a user's manifest file."""

    name: str
    path: Path
    dataset: str = "custom"
    domain: str = ""
    labelled: bool | None = None
    verb_classes: int | None = None
    noun_classes: int | None = None
    info: dict = field(default_factory=dict)

    def read(self) -> pd.DataFrame:
        """The validated table; class ids are checked against the split's class space where it is known (a
        registered split, a demo manifest, ``--verb-classes``), else only against -1 (unlabelled) and up."""
        nouns = self.noun_classes or None
        if self.dataset == "demo" and not self.path.is_file():
            raise UserError(f"{self.path}: demo split {self.name} not generated yet; run `adapt demo-data` first")
        return read_manifest(self.path, self.verb_classes, nouns)

    def class_counts(self, df: pd.DataFrame) -> tuple[int, int]:
        """(verb classes, noun classes) of this split's class space: a registered split's, else counted from the
        file (the largest id + 1; 0 for a column with no label)."""
        def counted(col):
            return int(df[col].max()) + 1 if len(df) and (df[col] >= 0).any() else 0
        return self.verb_classes or counted("verb_class"), self.noun_classes or counted("noun_class")


def split_kind_of(name: str) -> str:
    """The split kind a name implies: ``*_train`` -> ``train`` (training windows), anything else -> ``test``."""
    return "train" if str(name).endswith("_train") else "test"


def load_registry() -> dict:
    if not REGISTRY_FILE.is_file():
        raise UserError(f"{REGISTRY_FILE}: missing; run `adapt convert-manifests ../shared/data/manifests`")
    return json.loads(REGISTRY_FILE.read_text())


def resolve_split(name_or_path: str | Path) -> Split:
    """A split name from the registry (``D1_train``, ``target_val``, ``K1_test``) or a manifest file's path."""
    text = str(name_or_path)
    registry = load_registry()
    if text in registry["splits"]:
        e = registry["splits"][text]
        if e["dataset"] == "demo":
            meta = MANIFEST_DIR / "demo" / "classes.json"
            verbs = json.loads(meta.read_text())["verb_classes"] if meta.is_file() else None
        else:
            verbs = e["verb_classes"]
        return Split(text, MANIFEST_DIR / e["file"], e["dataset"], e["domain"], e["labelled"], verbs,
                     e["noun_classes"], e)
    path = Path(text)
    if path.suffix in (".csv", ".pkl", ".pickle") or path.exists():
        if not path.is_file():
            raise UserError(f"{path}: no such manifest file")
        for name, e in registry["splits"].items():  # a registered split's file given by its path
            if (MANIFEST_DIR / e["file"]).resolve() == path.resolve():
                return resolve_split(name)
        for name, e in registry["splits"].items():  # an original annotation file (the challenge's pickles, ...)
            if e.get("original") and e["original"] == path.name and e["dataset"] != "demo":
                known = resolve_split(name)  # its split's class space, dataset, domain and kind; this file's rows
                return Split(name, path, known.dataset, known.domain, known.labelled, known.verb_classes,
                             known.noun_classes, known.info)
        meta = path.parent / "classes.json"  # a manifest of the demo layout (classes.json beside it)
        verbs = json.loads(meta.read_text()).get("verb_classes") if meta.is_file() else None
        return Split(path.stem, path, verb_classes=verbs)
    known = ", ".join(sorted(registry["splits"]))
    raise UserError(f"unknown split {text!r}: give a manifest file's path or one of {known}")


def resolve_domain(name: str) -> dict:
    """A domain name (``D1``, ``epic100_target``, ``K2``) -> {'train': split, 'test': split, ...}."""
    registry = load_registry()
    if name in registry["domains"]:
        return registry["domains"][name]
    raise UserError(f"unknown domain {name!r}: one of {', '.join(sorted(registry['domains']))} "
                    f"(or give split names / manifest paths)")


def summarise(split: Split, df: pd.DataFrame | None = None) -> dict:
    """The row that `adapt manifests` prints for a split."""
    if df is None:
        df = split.read()
    labelled = bool(len(df)) and bool((df["verb_class"] >= 0).all())
    verbs, nouns = split.class_counts(df)
    return {
        "name": split.name, "dataset": split.dataset, "domain": split.domain or ",".join(
            sorted(df["participant_id"].unique())[:4]),
        "clips": int(len(df)), "videos": int(df["video_id"].nunique()), "labelled": labelled,
        "verb_classes": verbs, "noun_classes": nouns,
        "classes_present": int(df.loc[df["verb_class"] >= 0, "verb_class"].nunique()),
        "file": str(split.path),
    }
