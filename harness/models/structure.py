"""Finding a decoder's editable modules from the loaded model itself, for architectures the adapter table does not
name (docs/models.md).

The rules, in order (each names what it found, so that provenance can show how the modules were chosen):

* **blocks**: the ``nn.ModuleList`` of decoder blocks inside ``get_decoder()`` (else ``base_model``): the list whose
  children all share one class and whose length is the config's number of layers (else the longest such list),
  the shallowest one when several qualify;
* **model width** ``d``: the config's ``hidden_size`` (``n_embd``, ``d_model``), else the input embeddings' width;
* **MLP output projection**: in each block, the MLP child (named ``mlp``/``ffn``/``feed_forward``..., or a class
  named ``*MLP``/``*FeedForward``; blocks that keep their MLP linears directly, as OPT's ``fc1``/``fc2``, use the
  block minus its attention) must hold exactly one linear that maps a width other than ``d`` back to ``d``
  (several: the one named like an output projection, ``down_proj``/``fc2``/``c_proj``/``dense_4h_to_h``/...).
  ``nn.Linear`` stores its weight ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]`` (``transposed``);
* **attention output projection**: in the attention child (``self_attn``/``attention``/``attn``..., or a class
  named ``*Attention``), the linear that maps to ``d`` named like an output projection, else the last one;
* **embeddings**: ``get_input_embeddings()``.

A mixture-of-experts MLP (a router and experts, as Mixtral's or Qwen-MoE's) has no single output projection that
ROME/MEMIT-style editors could edit; it is refused, as is a block whose MLP output cannot be identified, with a
one-line :class:`StructureError` that says why and what to pass to ``--arch-override``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

ATTN_NAME = re.compile(r"(^|_)(self_?attn|self_?attention|attn|attention|mixer)$", re.I)
MLP_NAME = re.compile(r"(^|_)(mlp|ffn|ff|feed_?forward|fc|mlp_block|dense_?mlp)$", re.I)
MLP_OUT_NAME = re.compile(r"(^|[._])(down_proj|fc2|fc_out|c_proj|dense_4h_to_h|w2|wo|out_proj|dense_out|proj_out)$")
ATTN_OUT_NAME = re.compile(r"(^|[._])(o_proj|out_proj|dense|c_proj|wo|o|out)$")
MOE_CLASS = re.compile(r"(moe|experts?|router|sparse)", re.I)


class StructureError(ValueError):
    """The model's modules could not be found by structure (one line: why, and what to override)."""


@dataclass
class Found:
    """What structure detection found; ``notes`` say how, one line per module (recorded in provenance)."""

    layers: str | None = None
    mlp_out: str | None = None
    attn_out: str | None = None
    embed: str | None = None
    transposed: bool = False
    n_layers: int | None = None
    notes: dict[str, str] = field(default_factory=dict)


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(d_in, d_out, transposed) of a linear-like module: ``nn.Linear`` (and subclasses: FalconLinear, quantised
    linears) or GPT-2's ``Conv1D`` (weight stored ``[in, out]``); None for anything else."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) and not hasattr(weight, "shape"):
        return None
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features), False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(weight, "ndim", 0) == 2:
        return int(weight.shape[0]), int(weight.shape[1]), True
    return None


def config_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def model_width(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    emb = _input_embeddings(model)
    weight = getattr(emb, "weight", None)
    return int(weight.shape[-1]) if weight is not None and weight.ndim == 2 else None


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return emb if isinstance(emb, nn.Module) else None


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            dec = get()
        except (AttributeError, NotImplementedError, TypeError):
            dec = None
        if isinstance(dec, nn.Module):
            return dec
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its qualified name in ``model`` (the first one, for shared modules)."""
    out: dict[int, str] = {}
    for name, module in model.named_modules():
        out.setdefault(id(module), name)
    return out


def find_blocks(model: nn.Module, names: dict[int, str] | None = None) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks; StructureError when there is none."""
    names = names if names is not None else _names(model)
    decoder = _decoder(model)
    want = config_layers(model)
    lists = []
    for _, m in decoder.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and id(m) in names:
            classes = {type(c) for c in m}
            if len(classes) == 1 and any(True for _ in m[0].parameters()):
                lists.append(m)
    if not lists:
        raise StructureError(f"no list of decoder blocks (an nn.ModuleList of one block class) in "
                             f"{type(decoder).__name__}")
    exact = [m for m in lists if want is not None and len(m) == want]
    pool = exact or [m for m in lists if len(m) == max(len(x) for x in lists)]
    best = min(pool, key=lambda m: names[id(m)].count("."))
    return names[id(best)], best


def _children_by_role(block: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """(attention children, MLP children) of a block, by name or class name."""
    attn, mlp = [], []
    for name, child in block.named_children():
        cls = type(child).__name__
        if ATTN_NAME.search(name) or ("Attention" in cls and not isinstance(child, nn.ModuleList)):
            attn.append((name, child))
        elif MLP_NAME.search(name) or re.search(r"(MLP|FeedForward|Moe|MoE|Experts)", cls):
            mlp.append((name, child))
    return attn, mlp


def is_moe(module: nn.Module) -> str | None:
    """Why ``module`` (an MLP) is a mixture of experts, or None: a router/experts submodule or class, a list of
    experts, or expert weights stacked in a 3-D parameter."""
    for name, sub in module.named_modules():
        cls = type(sub).__name__
        last = name.rsplit(".", 1)[-1]
        if MOE_CLASS.search(cls) or last in ("experts", "router", "shared_expert") or "expert" in last:
            return f"{cls} at {name or '.'}" if name else cls
    for name, p in module.named_parameters():
        if p.ndim >= 3:
            return f"a {p.ndim}-D expert weight {name} {tuple(p.shape)}"
    return None


def _pick(cands: list[tuple[str, nn.Module, tuple[int, int, bool]]], prefer: re.Pattern) -> list:
    named = [c for c in cands if prefer.search(c[0])]
    return named or cands


def find_mlp_out(block: nn.Module, d: int) -> tuple[str, bool, str]:
    """(name relative to the block, transposed, how) of a block's MLP output projection; StructureError (why)."""
    attn, mlp = _children_by_role(block)
    if len(mlp) > 1:
        mlp = [c for c in mlp if any(linear_dims(m) for m in c[1].modules())] or mlp
    if mlp:
        scope_name, scope = mlp[0]
        moe = is_moe(scope)
        if moe:
            detail = "" if moe == type(scope).__name__ else f" ({moe})"
            raise StructureError(f"its MLP {scope_name!r} ({type(scope).__name__}) is a mixture of experts{detail}: "
                                 "there is no single MLP output projection to edit")
        modules = [(f"{scope_name}.{n}" if n else scope_name, m) for n, m in scope.named_modules()]
        where = f"the MLP child {scope_name!r}"
    else:
        skip = tuple(f"{n}." for n, _ in attn) + tuple(n for n, _ in attn)
        modules = [(n, m) for n, m in block.named_modules() if n and not n.startswith(skip)]
        moe = next((why for n, m in modules if "." not in n and (why := is_moe(m))), None)
        if moe:
            raise StructureError(f"its MLP is a mixture of experts ({moe}): there is no single MLP output "
                                 "projection to edit")
        where = "the block (no MLP child; attention excluded)"
    cands = [(n, m, dims) for n, m in modules if (dims := linear_dims(m)) and dims[1] == d]
    wide = [c for c in cands if c[2][0] != d]          # the MLP's hidden width back to the model width
    cands = _pick(wide or cands, MLP_OUT_NAME)
    if not cands:
        raise StructureError(f"no linear in {where} maps back to the model width {d}")
    if len(cands) > 1:
        listed = ", ".join(f"{n} {c[0]}->{c[1]}" for n, _, c in cands)
        raise StructureError(f"{len(cands)} linears in {where} map back to the model width {d} ({listed}); "
                             "cannot tell which is the MLP output")
    name, module, (d_in, d_out, transposed) = cands[0]
    how = (f"the {type(module).__name__} in {where} mapping the MLP width {d_in} back to the model width {d_out}"
           + (" (weight stored [in, out])" if transposed else ""))
    return name, transposed, how


def find_attn_out(block: nn.Module, d: int) -> tuple[str, str] | None:
    """(name relative to the block, how) of the attention output projection, or None."""
    attn, _ = _children_by_role(block)
    for scope_name, scope in attn:
        cands = [(f"{scope_name}.{n}" if n else scope_name, m, dims) for n, m in scope.named_modules()
                 if (dims := linear_dims(m)) and dims[1] == d]
        if cands:
            named = [c for c in cands if ATTN_OUT_NAME.search(c[0])]
            name, module, (d_in, d_out, _) = (named or cands)[-1]
            rule = "named as an output projection" if named else "the last one"
            return name, f"the {type(module).__name__} of attention {scope_name!r} mapping {d_in} to {d_out}, {rule}"
    return None


def detect(model: nn.Module, need: tuple[str, ...] = ("layers", "mlp_out", "attn_out", "embed")) -> Found:
    """Find the modules in ``need`` from ``model``'s structure; :class:`StructureError` (one line) when the blocks or
    the MLP output projection cannot be found, or the MLP is a mixture of experts."""
    names = _names(model)
    found = Found()
    layers_name, blocks = find_blocks(model, names)
    found.n_layers = len(blocks)
    found.layers = f"{layers_name}.{{}}"
    found.notes["layers"] = (f"{layers_name}: the nn.ModuleList of {len(blocks)} {type(blocks[0]).__name__} in "
                             f"{type(_decoder(model)).__name__}")
    emb = _input_embeddings(model)
    if emb is not None and id(emb) in names:
        found.embed = names[id(emb)]
        found.notes["embed"] = f"{found.embed}: get_input_embeddings()"
    elif "embed" in need:
        raise StructureError("get_input_embeddings() names no module of the model")
    d = model_width(model)
    if d is None:
        raise StructureError("cannot tell the model width (no hidden_size in the config, no input embeddings)")
    if "mlp_out" in need:
        picks = []
        for i, block in enumerate(blocks):
            try:
                picks.append(find_mlp_out(block, d))
            except StructureError as e:
                raise StructureError(f"in block {i} ({type(block).__name__}) {e}") from None
        if len({(n, t) for n, t, _ in picks}) > 1:
            differ = sorted({n for n, _, _ in picks})
            raise StructureError(f"the MLP output projection differs between blocks ({', '.join(differ)})")
        name, found.transposed, how = picks[0]
        found.mlp_out = f"{layers_name}.{{}}.{name}"
        found.notes["mlp_out"] = f"{name}: {how}"
    if "attn_out" in need:
        attn = find_attn_out(blocks[0], d)
        if attn is not None:
            found.attn_out = f"{layers_name}.{{}}.{attn[0]}"
            found.notes["attn_out"] = f"{attn[0]}: {attn[1]}"
    return found
