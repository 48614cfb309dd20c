"""EasyEdit hyper-parameter files (``hparams/ROME/gpt2-xl.yaml``, ``hparams/MEMIT/llama-7b.yaml``, ...) mapped onto
this harness's editors (``--hparams-file EDITOR=PATH.yaml``).

Every key of the file ends up in exactly one of four places, and :meth:`EasyEditHparams.record` says which, so the
run JSON shows what the file became:

* ``hparams``: the editor's own hyper-parameters. ``layers: [17]`` becomes ``layer: 17`` for single-layer editors
  (ROME, R-ROME, FT-L with one layer) and stays ``layers`` for MEMIT-style editors; any other key that names a field
  of the editor's ``Hparams`` (``v_num_grad_steps``, ``v_lr``, ``kl_factor``, ``mom2_update_weight``,
  ``clamp_norm_factor``, ``context_template_length_params``, ``lr``, ``num_steps``, ...) is taken as is.
* ``arch_override``: ``rewrite_module_tmp`` -> ``mlp_out`` (FT's template names the ``.weight``; the suffix is
  dropped) and ``layer_module_tmp`` -> ``layers``, the fields of ``--arch-override``.
* ``stats``: ``mom2_n_samples`` -> ``stats_tokens`` and ``mom2_dataset`` -> ``stats_corpus`` (``wikipedia`` ->
  ``wikitext``, WikiText-2 being the Wikipedia text at hand). ROME's ``mom2_n_samples`` counts text samples; the
  harness counts tokens, so 100,000 samples become 100,000 tokens (the harness's default), a smaller sample.
* ``matched``: keys whose value is what the harness does anyway (``fact_token: subject_last``, ``v_loss_layer`` at
  the last layer, ``mom2_dtype: float32``, FT's ``objective_optimization: prompt_last``, zero ``weight_decay`` /
  ``kl_factor`` for FT).
* ``ignored``, each with a warning saying why: keys the harness sets elsewhere (``model_name`` is ``--model``,
  ``device`` is ``--device``, ``stats_dir`` is ``--cache-dir``, ``fp16`` is ``--dtype`` ...), module names it does not
  use (``mlp_module_tmp``, ``attn_module_tmp``: EasyEdit names the attention block, the harness's ``attn_out`` is its
  output projection; ``ln_f_module``, ``lm_head_module``), values it cannot honour (FT's ``norm_constraint: false``,
  FT-M's ``objective_optimization: target_new``, another ``fact_token``) and keys no field matches.

A file for another method (``alg_name``) than the editor it is given to is an error, and so is a module template
that names no module of the loaded model (a GPT-2 file on a Llama model), each in one line naming file and key.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .base import Editor, HparamsError, _coerce, load_hparams

# EasyEdit's alg_name -> harness editor name
ALG_NAMES: dict[str, str] = {"rome": "rome", "r-rome": "r_rome", "r_rome": "r_rome", "memit": "memit", "ft": "ft_l",
                             "ft-l": "ft_l", "alphaedit": "alphaedit", "emmet": "emmet", "d4s": "d4s"}
# keys the harness takes from elsewhere, and where
ELSEWHERE: dict[str, str] = {
    "model_name": "the model is --model",
    "device": "the device is --device",
    "stats_dir": "statistics are cached under --cache-dir",
    "model_parallel": "multi-GPU placement is --device-map",
    "fp16": "the dtype is --dtype",
    "mlp_module_tmp": "the harness edits the MLP output projection (rewrite_module_tmp)",
    "attn_module_tmp": "EasyEdit names the attention block; the harness's attn_out is its output projection "
                       "(set it with --arch-override attn_out=...)",
    "ln_f_module": "the final norm is the model's own",
    "lm_head_module": "the output head is the model's get_output_embeddings()",
    "layer_selection": "MEMIT-style editors spread the update over all listed layers",
    "batch_size": "edits per editor call is --batch-size",
    "max_length": "prompts are not truncated (a prompt over the context is an error)",
    "model_class": "the model class comes from its config",
    "tokenizer_class": "the tokenizer comes with the model",
    "tokenizer_name": "the tokenizer comes with the model",
}
CORPORA: dict[str, str] = {"wikipedia": "wikitext", "wikitext": "wikitext", "wikitext-2": "wikitext"}


class EasyEditHparamsWarning(UserWarning):
    """A key of an EasyEdit hyper-parameter file that the harness does not use."""


@dataclass
class EasyEditHparams:
    """What an EasyEdit YAML became for one editor (module docstring)."""

    path: str
    editor: str
    alg_name: str | None
    hparams: dict[str, Any] = field(default_factory=dict)
    arch_override: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)         # stats_tokens, stats_corpus
    matched: dict[str, Any] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)       # key -> why

    def record(self) -> dict[str, Any]:
        """JSON-serialisable summary for the run JSON."""
        return dataclasses.asdict(self)

    def build(self, editor_cls: type[Editor], family: str, n_layers: int | None = None,
              overrides: dict[str, Any] | None = None) -> Any:
        """The editor's Hparams: family file, then this file's values, then ``--hparam`` overrides."""
        return load_hparams(editor_cls, family, {**self.hparams, **(overrides or {})}, n_layers=n_layers)


def _fields(editor_cls: type[Editor]) -> set[str]:
    hp = editor_cls.Hparams
    return {f.name for f in dataclasses.fields(hp)} if dataclasses.is_dataclass(hp) else set()


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HparamsError(f"--hparams-file {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise HparamsError(f"--hparams-file {path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise HparamsError(f"--hparams-file {path}: expected a mapping of hyper-parameters, got "
                           f"{type(data).__name__}")
    return data


def _layers(out: EasyEditHparams, value: Any, fields: set[str], where: str) -> None:
    layers = value if isinstance(value, list) else [value]
    if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise HparamsError(f"{where}: 'layers' should be a list of layer indices, got {value!r}")
    if "layer" in fields and len(layers) == 1:
        out.hparams["layer"] = layers[0]
    elif "layers" in fields:
        out.hparams["layers"] = list(layers)
    elif "layer" in fields:
        raise HparamsError(f"{where}: editor {out.editor!r} edits one layer, the file lists {layers}; "
                           "keep one layer in 'layers'")
    else:
        out.ignored["layers"] = f"editor {out.editor!r} has no layer hyper-parameter"


def _matches(out: EasyEditHparams, key: str, value: Any, n_layers: int | None) -> bool:
    """Whether ``key: value`` is what the harness does anyway (then recorded in ``matched``)."""
    ft = out.editor == "ft_l"
    same = {
        "fact_token": value == "subject_last",
        "mom2_dtype": value == "float32",
        "v_loss_layer": n_layers is not None and value in (n_layers - 1, -1),
        "objective_optimization": ft and value == "prompt_last",
        "weight_decay": ft and value == 0,
        "kl_factor": ft and value == 0,
        # MEMIT-style editors always whiten with C; ROME-style ones take mom2_adjustment as a hyper-parameter
        "mom2_adjustment": value is True and out.editor in ("memit", "alphaedit", "emmet", "d4s"),
    }.get(key, False)
    if same:
        out.matched[key] = value
    return same


def _why_not(key: str, value: Any, editor: str, n_layers: int | None) -> str:
    if key in ELSEWHERE:
        return ELSEWHERE[key]
    return {
        "fact_token": f"the harness reads the subject's last token (subject_last), not {value!r}",
        "v_loss_layer": "the v* loss is read at the model's output" + ("" if n_layers is None else
                                                                         f" (layer {n_layers - 1})"),
        "mom2_dtype": "second moments are accumulated in float32",
        "objective_optimization": "the harness's FT is FT-L (prompt_last); FT-M (target_new) is not implemented",
        "norm_constraint": "unconstrained FT (norm_constraint: false) is not FT-L; the family file's epsilon is kept",
    }.get(key, f"editor {editor!r} has no hyper-parameter {key!r}")


def _map_key(out: EasyEditHparams, key: str, value: Any, fields: set[str], n_layers: int | None, where: str) -> None:
    if key == "layers":
        _layers(out, value, fields, where)
    elif key == "rewrite_module_tmp":
        out.arch_override["mlp_out"] = str(value).removesuffix(".weight")
    elif key == "layer_module_tmp":
        out.arch_override["layers"] = str(value)
    elif key == "mom2_n_samples":
        out.stats["stats_tokens"] = int(value)
    elif key == "mom2_dataset":
        if str(value).lower() in CORPORA:
            out.stats["stats_corpus"] = CORPORA[str(value).lower()]
        else:
            out.ignored[key] = f"no corpus named {value!r} here (use --stats-corpus)"
    elif _matches(out, key, value, n_layers):
        pass
    elif key in fields and key not in ELSEWHERE and not (key == "norm_constraint" and value is False):
        out.hparams[key] = value
    else:
        out.ignored[key] = _why_not(key, value, out.editor, n_layers)


def alg_editor(alg: Any) -> str:
    """The harness editor an ``alg_name`` stands for: EasyEdit's names (``ALG_NAMES``), else the name itself as an
    editor name (a third-party editor's own files set ``alg_name: <its name>``; case and ``-``/``_`` aside), through
    the editor aliases."""
    from ..editor_aliases import canonical_editor
    key = str(alg).strip().lower()
    return ALG_NAMES.get(key) or canonical_editor(key.replace("-", "_"))


def map_easyedit_hparams(path: str | os.PathLike[str], editor_cls: type[Editor], *, n_layers: int | None = None,
                         warn: bool = True) -> EasyEditHparams:
    """Read an EasyEdit YAML for ``editor_cls`` (module docstring); warn once per ignored key."""
    p = Path(path)
    data = _read(p)
    where = f"--hparams-file {p}"
    alg = data.get("alg_name")
    if alg is not None and alg_editor(alg) != editor_cls.name:
        raise HparamsError(f"{where}: the file is for {alg!r}, not editor {editor_cls.name!r}; "
                           f"pass it as --hparams-file {alg_editor(alg)}={p}")
    out = EasyEditHparams(str(p), editor_cls.name, None if alg is None else str(alg))
    fields = _fields(editor_cls)
    for key, value in data.items():
        if key != "alg_name":      # "5e-1" is a string to YAML 1.1: read numbers as the command line does
            _map_key(out, str(key), _coerce(value), fields, n_layers, where)
    if warn:
        for key, why in out.ignored.items():
            warnings.warn(f"{p.name}: '{key}' ignored ({why})", EasyEditHparamsWarning, stacklevel=2)
    return out


def check_modules(mapping: EasyEditHparams, model, n_layers: int) -> None:
    """Fail in one line when a module template of the file names no module of ``model`` (checked at layer 0 and
    the last layer)."""
    for key, tmpl in (("rewrite_module_tmp", mapping.arch_override.get("mlp_out")),
                      ("layer_module_tmp", mapping.arch_override.get("layers"))):
        if tmpl is None:
            continue
        for layer in (0, n_layers - 1):
            try:
                model.get_submodule(tmpl.format(layer))
            except (AttributeError, IndexError, ValueError):
                raise HparamsError(f"--hparams-file {mapping.path}: {key} {tmpl!r} names no module of this "
                                   f"{type(model).__name__} (a file for another architecture?); fix the template "
                                   "or drop the key") from None


def check_arch(mapping: EasyEditHparams, model, adapter, n_layers: int) -> None:
    """:func:`check_modules`, then: the file's templates must be the run's adapter's (one architecture per run:
    a file naming other modules of the same model is pointed at ``--arch-override``)."""
    check_modules(mapping, model, n_layers)
    for key, field_name in (("rewrite_module_tmp", "mlp_out"), ("layer_module_tmp", "layers")):
        tmpl = mapping.arch_override.get(field_name)
        if tmpl is not None and tmpl != getattr(adapter, field_name):
            raise HparamsError(f"--hparams-file {mapping.path}: {key} {tmpl!r} is not the module the run edits "
                               f"({getattr(adapter, field_name)!r}); pass --arch-override {field_name}={tmpl} to "
                               "edit it (one architecture override for the whole run)")


def parse_hparams_file_option(item: str) -> tuple[str, Path]:
    """``EDITOR=PATH.yaml`` (the ``--hparams-file`` value) -> (editor name, path)."""
    editor, sep, path = item.partition("=")
    if not sep or not editor.strip() or not path.strip():
        raise HparamsError(f"--hparams-file {item!r}: expected EDITOR=PATH.yaml, e.g. rome=hparams/ROME/gpt2-xl.yaml")
    return editor.strip(), Path(path.strip()).expanduser()
