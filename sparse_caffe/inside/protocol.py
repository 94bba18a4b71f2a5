"""The records that cross the process boundary of a measurement, each defined once: the host writes
a RunSpec into a run folder, an executor (a local pycaffe subprocess, or a container) runs the one
child main (sparse_caffe.inside.child) on that folder, and the child writes a RawResult, or an
error record and exits with ERROR_EXIT. A WeightsRecord says which weights were measured.

Every record is a small frozen class with __slots__, to_json() and from_json(); from_json checks
the schema version, that every required key is there, that no unknown key is, and each value's
type, and refuses anything else with one RecordError line naming the record and the key.

Python-3.6-clean (the Docker image ships it): no dataclasses, no `from __future__ import
annotations`; imports only the standard library and sparse_caffe.errors.
"""
import json
import os

from ..errors import UserError

SCHEMA = 2  # bump when a record changes shape (2: no "prepare"/"prepared" kinds)

# A run folder: the host writes SPEC_FILE; the child writes RAW_FILE, or ERROR_FILE and exits
# ERROR_EXIT.
SPEC_FILE = "spec.json"
RAW_FILE = "raw.json"
ERROR_FILE = "error.json"
ERROR_EXIT = 2


class RecordError(UserError):
    """A record that is not what its class says (a missing, unknown or mistyped key)."""


_REQUIRED = object()


class Field(object):
    """One key of a record: its name, the types its value may have (None among them: optional)
    and its default (_REQUIRED: none). A field typed `list` holds a tuple and is written as a
    JSON list; one typed with a Record class holds that record."""

    __slots__ = ("name", "types", "default")

    def __init__(self, name, types, default=_REQUIRED):
        self.name = name
        self.types = types if isinstance(types, tuple) else (types,)
        self.default = default


class Record(object):
    """Base of the typed records: frozen, compared by value, to/from JSON, validated on load."""

    __slots__ = ()
    FIELDS = ()
    WHAT = "record"
    VERSIONED = True  # a top-level record carries the schema version; a nested one does not
    OMIT_NONE = False  # to_json leaves out optional keys whose value is None

    def __init__(self, **values):
        for field in self.FIELDS:
            if field.name in values:
                value = values.pop(field.name)
            elif field.default is not _REQUIRED:
                value = field.default
            else:
                raise RecordError("{} has no {!r}".format(self.WHAT, field.name))
            object.__setattr__(self, field.name, self._checked(field, value))
        if values:
            raise RecordError("{} has no key {!r} (known: {})".format(
                self.WHAT, sorted(values)[0], ", ".join(f.name for f in self.FIELDS)))
        self.validate()

    def _checked(self, field, value):
        if value is None:
            if type(None) in field.types:
                return None
            raise RecordError("{}: {!r} must not be empty".format(self.WHAT, field.name))
        for kind in field.types:
            if kind is type(None):
                continue
            if isinstance(kind, type) and issubclass(kind, Record):
                if isinstance(value, kind):
                    return value
                if isinstance(value, dict):
                    return kind.from_json(value)
                continue
            if kind is list and isinstance(value, (list, tuple)):
                return tuple(value)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if kind is int and isinstance(value, bool):
                continue
            if isinstance(value, kind):
                return value
        raise RecordError("{}: {!r} must be {}, got {!r}".format(
            self.WHAT, field.name, " or ".join(t.__name__ for t in field.types), value))

    def validate(self):
        """Cross-field rules of a subclass; RecordError when broken."""

    def __setattr__(self, name, value):
        raise AttributeError("{} is frozen".format(self.WHAT))

    def __eq__(self, other):
        return type(self) is type(other) and self.to_json() == other.to_json()

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        return "{}({})".format(type(self).__name__, ", ".join(
            "{}={!r}".format(f.name, getattr(self, f.name)) for f in self.FIELDS))

    def replace(self, **changes):
        """A copy with `changes` (validated as a new record)."""
        values = {f.name: getattr(self, f.name) for f in self.FIELDS}
        values.update(changes)
        return type(self)(**values)

    def to_json(self):
        data = {"schema": SCHEMA} if self.VERSIONED else {}
        for field in self.FIELDS:
            value = getattr(self, field.name)
            if value is None and self.OMIT_NONE:
                continue
            data[field.name] = _plain(value)
        return data

    @classmethod
    def from_json(cls, data):
        if not isinstance(data, dict):
            raise RecordError("{} must be a JSON object, got {!r}".format(cls.WHAT, data))
        data = dict(data)
        if cls.VERSIONED:
            schema = data.pop("schema", None)
            if schema != SCHEMA:
                raise RecordError("{} has schema {!r}, this code reads {}: the host and the child "
                                  "run different versions of sparse-caffe".format(
                                      cls.WHAT, schema, SCHEMA))
        return cls(**data)

    def write(self, path):
        """This record as JSON at `path`, written whole (a temporary name, then renamed)."""
        from ..files import atomic_write_json
        atomic_write_json(str(path), self.to_json())

    @classmethod
    def read(cls, path):
        """The record in the JSON file at `path`; RecordError for a file that is not one."""
        try:
            with open(str(path)) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise RecordError("cannot read {} from {}: {}".format(cls.WHAT, path, exc))
        return cls.from_json(data)


def _plain(value):
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class WeightsRecord(Record):
    """Which weights a run measured, as results.json records them: the kind ("synthetic",
    "skimcaffe", "open_nsfw", "open_nsfw-pruned", "file"), whether they are synthetic, the file,
    its SHA-256 and a description; a model's licence file, SkimCaffe's git blob id, a synthetic
    model's seed and target input sparsity, where they apply."""

    __slots__ = ("kind", "synthetic", "path", "sha256", "description", "license", "blob_id",
                 "seed", "target_input_zeros")
    WHAT = "the weights record"
    VERSIONED = False
    OMIT_NONE = True
    FIELDS = (Field("kind", str), Field("synthetic", bool), Field("path", str),
              Field("sha256", str), Field("description", str),
              Field("license", (str, type(None)), None),
              Field("blob_id", (str, type(None)), None),
              Field("seed", (int, type(None)), None),
              Field("target_input_zeros", (dict, type(None)), None))


# A RunSpec's weights: one of these, or a .caffemodel's absolute path. auto: SkimCaffe's if
# cached, else the synthetic default (open_nsfw pruned for resnet50-1by2); pruned and unpruned:
# open_nsfw (resnet50-1by2 only).
WEIGHT_KEYWORDS = ("auto", "skimcaffe", "synthetic", "pruned", "unpruned")


# What a RunSpec asks the child to do, and the keys each kind needs beyond the defaults.
KINDS = {
    "net": ("net",),            # prepare the net, then measure it (./inv bench, natively or
                                # in a container)
    "layer": ("shape",),        # one synthetic layer on every path (./inv bench-layer)
    "tune": ("net", "prototxt_out", "caffemodel_out", "prototxt_header"),  # ./inv tune
}


class RunSpec(Record):
    """What one measurement runs: the net, its weights and images, the paths, the rounds; for one
    layer its shape and sparsity; for tune where the deploy prototxt and weights go. The other children
    run on a pycaffe net (check-baseline's plain loop, the memory probe) read a "net" RunSpec."""

    __slots__ = ("kind", "net", "weights", "paths", "backend", "batch", "threads", "images",
                 "repeats", "warmup", "layers", "transform", "fc_path", "pytorch", "cache_dir",
                 "auto_path", "shape",
                 "weight_zeros", "input_zeros", "seed", "prototxt_out", "caffemodel_out",
                 "prototxt_header")
    WHAT = "the run spec"
    FIELDS = (
        Field("kind", str),
        Field("net", (str, type(None)), None),
        Field("weights", str, "auto"),  # a keyword, or a .caffemodel's absolute path
        Field("paths", list, ("dense",)),
        Field("backend", str, "openmp"),
        Field("batch", int, 1),
        Field("threads", int, 1),
        Field("images", (str, int, type(None)), None),  # None: the shipped photographs
        Field("repeats", int, 20),
        Field("warmup", int, 3),
        Field("layers", (str, type(None)), None),  # a regular expression over convolution names
        Field("transform", str, "fold"),
        Field("fc_path", str, "dense"),
        Field("pytorch", bool, False),
        Field("cache_dir", (str, type(None)), None),
        Field("auto_path", (str, type(None)), None),
        Field("shape", (str, type(None)), None),
        Field("weight_zeros", float, 0.98),
        Field("input_zeros", float, 0.5),
        Field("seed", int, 0),
        Field("prototxt_out", (str, type(None)), None),
        Field("caffemodel_out", (str, type(None)), None),
        Field("prototxt_header", (str, type(None)), None),
    )

    def validate(self):
        if self.kind not in KINDS:
            raise RecordError("the run spec's kind {!r} is none of {}".format(
                self.kind, ", ".join(sorted(KINDS))))
        for name in KINDS[self.kind]:
            if getattr(self, name) is None:
                raise RecordError("a {!r} run spec needs {!r}".format(self.kind, name))
        if not self.paths or self.paths[0] != "dense":
            raise RecordError("the run spec's paths must start with dense, got {!r}".format(
                list(self.paths)))
        for name in ("batch", "repeats", "threads"):
            if getattr(self, name) < 1:
                raise RecordError("the run spec's {} must be at least 1".format(name))
        if self.warmup < 0:
            raise RecordError("the run spec's warmup cannot be negative")


class RawResult(Record):
    """What the child measured, before statistics: for a net ("net"), per path its rounds' times,
    phases, counters and differences from dense, the plan, the probe and the BLAS as loaded, the
    weights and images; for one layer ("layer"), the layer bench's record."""

    __slots__ = ("kind", "blas_runtime", "machine_probe", "environment", "weights", "images",
                 "layers", "net_layers", "shapes", "paths", "plan", "pytorch", "baselines",
                 "agreement_tolerance", "backends_in_build", "onednn", "layer")
    WHAT = "the raw result"
    NET_KEYS = ("weights", "images", "layers", "net_layers", "shapes", "paths",
                "agreement_tolerance", "backends_in_build", "onednn")
    FIELDS = (
        Field("kind", str),
        Field("blas_runtime", dict),
        Field("machine_probe", dict),
        Field("environment", (dict, type(None)), None),  # the child's software (the image's)
        Field("weights", (WeightsRecord, type(None)), None),
        Field("images", (dict, type(None)), None),
        Field("layers", (list, type(None)), None),
        Field("net_layers", (list, type(None)), None),
        Field("shapes", (dict, type(None)), None),
        Field("paths", (dict, type(None)), None),
        Field("plan", (dict, type(None)), None),
        Field("pytorch", (dict, type(None)), None),
        Field("baselines", (dict, type(None)), None),
        Field("agreement_tolerance", (float, type(None)), None),
        Field("backends_in_build", (list, type(None)), None),
        Field("onednn", (str, type(None)), None),
        Field("layer", (dict, type(None)), None),
    )

    def validate(self):
        required = {"net": self.NET_KEYS, "layer": ("layer",)}.get(self.kind)
        if required is None:
            raise RecordError("the raw result's kind {!r} is neither net nor layer".format(
                self.kind))
        for name in required:
            if getattr(self, name) is None:
                raise RecordError("a {!r} raw result needs {!r}".format(self.kind, name))


class ErrorRecord(Record):
    """A child's failure, one line for the user (written as ERROR_FILE, exit ERROR_EXIT)."""

    __slots__ = ("message",)
    WHAT = "the error record"
    FIELDS = (Field("message", str),)


def end_child(folder, compute):
    """How every child ends: compute() returns a record (a RawResult), a plain JSON object (the
    children outside measurement: tune, the memory probe, the plain loop) or None; it goes to
    RAW_FILE in `folder` and the child exits 0. A UserError's message goes to ERROR_FILE and
    the child exits ERROR_EXIT (stderr is the user's terminal, for progress). Returns the exit
    status."""
    try:
        result = compute()
    except UserError as exc:
        ErrorRecord(message=str(exc)).write(os.path.join(str(folder), ERROR_FILE))
        return ERROR_EXIT
    target = os.path.join(str(folder), RAW_FILE)
    if isinstance(result, Record):
        result.write(target)
    elif result is not None:  # a child outside measurement (tune's facts, a memory probe)
        from ..files import atomic_write_json
        atomic_write_json(target, result)
    return 0


def read_error(folder):
    """The one line a failed child left in `folder`, or None if it left none."""
    path = os.path.join(str(folder), ERROR_FILE)
    if not os.path.isfile(path):
        return None
    return ErrorRecord.read(path).message
